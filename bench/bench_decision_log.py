"""Decision-log benchmark: CPU time per decision of `DecisionLog.record` plus its writer thread.

    python bench/bench_decision_log.py                      # paced at 500 and 5,000 decisions/s, then a burst
    python bench/bench_decision_log.py --rates 200 --seconds 3
    python bench/bench_decision_log.py --impl /tmp/old_decision_log.py   # another version of the module
    git show HEAD:gateway/policy/decision_log.py > /tmp/before.py
    python bench/bench_decision_log.py --compare /tmp/before.py          # both, taking turns

One process, a temporary folder, no network. Each decision gets a fresh commit-shaped
input (what `gateway.intents.decide` builds for a commit: principal, tool, arguments,
envelope claims, intent summary, memory, request headers with an idempotency key, time,
rate limit) and a fresh `Decision`, as in the gateway. The figures are CPU time, not wall
time (the machine is shared): the whole process (`time.process_time`: the recording thread
and the writer thread, which share the GIL), minus the same loop that builds the inputs
and decisions without recording them. "record" is the recording thread alone (in the
gateway, the event loop), "writer" the rest. Paced runs record a few decisions every
millisecond or so, as a loaded gateway does; the burst records back to back (large batches).
Every line written is read back and counted. Figures are medians over --repeat rounds (and
the minimum); with --compare, the two implementations take turns in every round, so that
the load of a shared machine falls on both alike. The exit status is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.policy.decision import decision_from_result  # noqa: E402

RESULT = {
    "result": {
        "allow": True,
        "reasons": [],
        "require_approval": True,
        "approvals_required": 1,
    }
}


def commit_input(n: int) -> dict[str, Any]:
    """A fresh commit-shaped policy input, as `gateway.intents.decide` builds it."""
    task_id = f"task-{n // 10}"
    intent_id = str(uuid.uuid4())
    now = 1_780_000_000 + n // 100
    return {
        "action": "commit",
        "principal": {"sub": "agent-committer", "role": "committer", "iss": "gateway-dev"},
        "tool": {"name": "payments.transfer", "effect": "commit", "risk": "high"},
        "arguments": {
            "from_account": "acct-001",
            "to_account": "acct-002",
            "amount": 125.5 + n,
            "currency": "EUR",
            "reference": f"invoice-{n}",
        },
        "envelope": {
            "iss": "agent-planner",
            "sub": "agent-committer",
            "aud": "agent-gateway",
            "task_id": task_id,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 300,
            "goal_revision": 3,
            "schema_version": "1",
            "preconditions": ["balance checked", "payee verified"],
            "expected_artifact": "transfer receipt",
            "parent": task_id,
        },
        "intent": {
            "intent_id": intent_id,
            "task_id": task_id,
            "tool": "payments.transfer",
            "status": "verified",
            "proposer": "agent-worker",
            "verifier": "agent-verifier",
            "compensation": {"tool": "payments.refund", "arguments": {"reference": f"invoice-{n}"}},
            "depends_on": [{"namespace": "accounts", "key": "acct-001", "revision": 7}],
            "memory_writes": [{"namespace": "accounts", "key": "acct-001"}],
            "parent": None,
        },
        "approval": None,
        "memory": {f"goals/{task_id}": {"revision": 3}, "accounts/acct-001": {"revision": 7}},
        "request": {
            "method": "POST",
            "path": f"/intents/{intent_id}/commit",
            "headers": {
                "content-type": "application/json",
                "user-agent": "agent-sdk/1.4 python-httpx/0.28",
                "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
                "idempotency-key": f'"{uuid.uuid4().hex}"',
            },
        },
        "time": "2026-11-25T10:15:30.123456+00:00",
        "rate_limit": {"name": "commits", "limit": 100, "remaining": 42, "window": 60, "reset": 17.5},
    }


def load_module(path: Path | None) -> ModuleType:
    if path is None:
        from gateway.policy import decision_log

        return decision_log
    spec = importlib.util.spec_from_file_location("decision_log_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module: ModuleType | None, folder: Path, count: int, rate: float | None) -> tuple[float, float]:
    """(process CPU s, recording-thread CPU s) for `count` decisions; module None: inputs only."""
    log = module.DecisionLog(folder / "decisions.jsonl", instance_id="bench") if module else None
    per_tick = 1 if rate is None else max(1, round(rate / 1000))
    tick = None if rate is None else per_tick / rate
    labels = {"trace_id": "0af7651916cd43dd8448eb211c80319c"}
    process0, thread0, start = time.process_time(), time.thread_time(), time.monotonic()
    for n in range(count):
        decision = decision_from_result(RESULT, policy_version="sha256:0123456789abcdef")
        input = commit_input(n)
        if log is not None:
            log.record(decision, input, labels=labels, eval_ns=41_000)
        if tick is not None and n % per_tick == per_tick - 1:
            delay = start + (n // per_tick + 1) * tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    thread = time.thread_time() - thread0
    if log is not None:
        log.close()
    return time.process_time() - process0, thread


def cell(modules: list[ModuleType], count: int, rate: float | None, repeat: int) -> list[dict[str, float]]:
    """Per module: median and minimum CPU µs per decision; the modules take turns in every round."""
    totals: list[list[float]] = [[] for _ in modules]
    records: list[list[float]] = [[] for _ in modules]
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bench-decision-log-") as name:
            base_process, base_thread = run(None, Path(name), count, rate)
        for index, module in enumerate(modules):
            with tempfile.TemporaryDirectory(prefix="bench-decision-log-") as name:
                folder = Path(name)
                process, thread = run(module, folder, count, rate)
                lines = (folder / "decisions.jsonl").read_text(encoding="utf-8").splitlines()
                assert len(lines) == count, f"{len(lines)} lines for {count} decisions"
                json.loads(lines[-1])
            totals[index].append((process - base_process) / count * 1e6)
            records[index].append((thread - base_thread) / count * 1e6)
    figures = []
    for total, record in zip(totals, records, strict=True):
        median, median_record = statistics.median(total), statistics.median(record)
        figures.append(
            {"total": median, "record": median_record, "writer": median - median_record, "min": min(total)}
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", type=Path, help="a decision_log.py to measure instead of the package's")
    parser.add_argument("--compare", type=Path, help="another decision_log.py, measured in turn with --impl")
    parser.add_argument("--rates", default="500,5000", help="paced rates, decisions/s (comma-separated)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of a paced run")
    parser.add_argument("--burst", type=int, default=20_000, help="decisions in the burst run (0: none)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell; the median is printed")
    args = parser.parse_args()
    names = [str(args.impl or "gateway.policy.decision_log")]
    modules = [load_module(args.impl)]
    if args.compare:
        names.append(str(args.compare))
        modules.append(load_module(args.compare))
    with tempfile.TemporaryDirectory(prefix="bench-decision-log-") as name:
        for module in modules:  # warm-up: imports, caches
            run(module, Path(name), 500, None)
    cells: list[tuple[str, int, float | None]] = [
        (f"{float(rate):,.0f}/s", int(float(rate) * args.seconds), float(rate))
        for rate in args.rates.split(",")
        if rate
    ]
    if args.burst:
        cells.append(("burst", args.burst, None))
    print(f"CPU µs per decision (process CPU minus the same loop without the log), median of {args.repeat}")
    columns = ("load", "decisions", "total", "record", "writer", "min")
    print(f"{'implementation':>32} " + " ".join(f"{column:>9}" for column in columns))
    for label, count, rate in cells:
        for name, figures in zip(names, cell(modules, count, rate, args.repeat), strict=True):
            values = (figures["total"], figures["record"], figures["writer"], figures["min"])
            print(f"{name[-32:]:>32} {label:>9} {count:>9} " + " ".join(f"{value:>9.1f}" for value in values))


if __name__ == "__main__":
    main()
