"""Policy-decision benchmark: CPU per embedded decision with a memo hit, a memo miss
and the memo turned off, for a commit-shaped input on the repository's `policies/`.

    python bench/bench_policy.py               # 3000 decisions per cell
    python bench/bench_policy.py -n 10000      # more
    python bench/bench_policy.py --log         # with the decision log written to a temp file

One process, one event loop, a bounded loop per cell; CPU is the process's
(`time.process_time_ns`, all threads: the decision log's writer included), divided
by the number of decisions. Inputs are built before the clock starts:

    hit   the same commit, with fresh `time` and `request` (fields the policy does not read)
    miss  every commit a different `arguments.amount`, all under the approval limit (a key
          never seen: evaluated, then kept; the same Rego work as `hit` would do)
    off   the same inputs as `miss`, memo_size = 0 (every decision evaluated, as before the memo)

A measurement, not a test: the exit status is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.policy import DecisionLog
from gateway.policy.embedded import EmbeddedEngine

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def commit_input(n: int, amount: float) -> dict[str, Any]:
    """Shaped like gateway/intents.py::decide builds it for a commit."""
    return {
        "action": "commit",
        "principal": {"sub": "agent-committer", "role": "committer", "iss": "agent-gateway-dev"},
        "tool": {"name": "payments.transfer", "effect": "irreversible", "risk": "medium"},
        "arguments": {"to": "acct-42", "amount": amount, "currency": "EUR", "memo": "invoice 2025-001"},
        "envelope": {
            "iss": "planner-1",
            "sub": "agent-committer",
            "aud": "agent-gateway",
            "task_id": "task-7",
            "goal_revision": 3,
            "iat": 1735689600,
            "exp": 1735693200,
            "jti": "5f0c2a9e-9f7b-4c47-9a57-1f1f0f0e6a11",
            "schema_version": "1",
        },
        "intent": {
            "intent_id": "intent-1",
            "task_id": "task-7",
            "tool": "payments.transfer",
            "status": "verified",
            "proposer": "agent-planner",
            "verifier": "agent-verifier",
            "compensation": None,
            "depends_on": [{"namespace": "goals", "key": "task-7", "revision": 3}],
            "memory_writes": [],
            "parent": None,
        },
        "approval": None,
        "memory": {"goals/task-7": {"revision": 3}},
        "request": {
            "method": "POST",
            "path": f"/intents/intent-{n}/commit",
            "headers": {"traceparent": f"00-{n:032x}-{n:016x}-01"},
        },
        "time": f"2025-01-01T00:00:{n % 60:02d}.{n:06d}+00:00",
        "rate_limit": {"limit": 100, "remaining": 99 - n % 100, "reset": 60},
    }


async def cell(memo_size: int, inputs: list[dict[str, Any]], log_path: Path | None) -> tuple[float, int]:
    log = DecisionLog(log_path) if log_path is not None else None
    engine = EmbeddedEngine(POLICIES, decision_log=log, reload=False, memo_size=memo_size)
    await engine.start()
    try:
        for n in range(50):  # warm-up: this thread's interpreter, on inputs not measured
            await engine.decide(commit_input(n, 999.5))
        hits_before = engine.memo.hits
        started = time.process_time_ns()
        for value in inputs:
            await engine.decide(value)
        if log is not None:
            log.flush()
        spent = time.process_time_ns() - started
        return spent / len(inputs) / 1000, engine.memo.hits - hits_before
    finally:
        await engine.stop()
        if log is not None:
            log.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=3000, help="decisions per cell")
    parser.add_argument("--log", action="store_true", help="write the decision log (to a temp file)")
    parser.add_argument("--repeat", type=int, default=1, help="run every cell this many times")
    args = parser.parse_args()
    same = [commit_input(n, 250) for n in range(args.n)]
    fresh = [commit_input(n, 1 + n / 1000) for n in range(args.n)]
    with tempfile.TemporaryDirectory() as folder:
        log_path = Path(folder) / "decisions.jsonl" if args.log else None
        print(f"{args.n} commit decisions per cell, decision log {'on' if args.log else 'off'}")
        for _ in range(args.repeat):
            for name, size, inputs in [("hit", 4096, same), ("miss", 4096, fresh), ("off", 0, fresh)]:
                micros, hits = await cell(size, inputs, log_path)
                print(f"  {name:<5} {micros:8.1f} µs CPU per decision   (memo hits {hits})")


if __name__ == "__main__":
    asyncio.run(main())
