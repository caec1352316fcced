"""Race: many committers on one intent, many writers on one memory key."""

from __future__ import annotations

import asyncio

from gateway.evals.harness import Check, Harness, events
from gateway.evals.scorecard import Outcome
from gateway.evals.suites import delta, run_scenarios

TOOL = "email.notify"


async def commit_race(h: Harness, check: Check) -> None:
    """The same intent committed concurrently by `workers` committers, each with its own key."""
    for round_ in range(h.rounds):
        task = h.task("race-commit")
        intent = await h.ready_intent(
            task, TOOL, {"to": f"r{round_}@example.com", "n": h.rng.randint(0, 10**6)}
        )
        before = await h.upstream_calls()
        answers = await asyncio.gather(
            *(h.commit(task, intent, h.key(), sub=f"committer-{i}") for i in range(h.workers))
        )
        after = await h.upstream_calls()
        calls = delta(before, after, TOOL)
        check.duplicate_effects += max(calls - 1, 0)
        check.expect(calls == 1, f"round {round_}: the tool was called {calls} times for one intent")
        done = [a for a in answers if a.status == 200]
        check.expect(bool(done), f"round {round_}: no committer got the result")
        check.expect(
            all(a.status in (200, 409) for a in answers),
            f"round {round_}: unexpected answers {sorted(a.status for a in answers)}",
        )
        check.expect(len({a.raw for a in done}) <= 1, f"round {round_}: committers got different results")
        entries = await h.ledger(intent_id=intent)
        committed = len(events(entries, "committed", intent))
        check.expect(committed == 1, f"round {round_}: {committed} committed ledger entries")


async def memory_race(h: Harness, check: Check) -> None:
    """Writers race on one key with `if_revision`; each landed write must sit on its base."""
    namespace, key = "evals", f"race-{h.run_id}-{h.rng.randint(0, 10**6)}"
    landed: list[tuple[int, str]] = []

    async def writer(index: int) -> None:
        # Every contended attempt lets exactly one writer through, so a writer may lose up
        # to `workers - 1` times per write; the budget bounds a livelocked gateway.
        for attempt in range(h.rounds * (h.workers + 2) * 2):
            base = await h.memory_revision(namespace, key)
            value = f"w{index}-{attempt}"
            answer = await h.memory_set(
                h.task("race-mem"), namespace, key, value, if_revision=base, sub=f"committer-{index}"
            )
            if answer.status == 200 and answer.body.get("status") == "committed":
                landed.append((base, value))
                if sum(1 for _, v in landed if v.startswith(f"w{index}-")) >= h.rounds:
                    return
            elif answer.status == 409:
                await asyncio.sleep(h.rng.uniform(0, 0.02))  # jitter: the losers do not retry in lockstep
            else:
                check.failures.append(
                    f"writer {index}: unexpected answer {answer.status} {answer.raw[:200]!r}"
                )
                return

    await asyncio.gather(*(writer(i) for i in range(h.workers)))
    wanted = h.workers * h.rounds
    check.expect(len(landed) >= wanted, f"only {len(landed)} of {wanted} writes landed")
    history = await h.memory_history(namespace, key)
    at = {entry.get("value"): int(entry["revision"]) for entry in history}
    for base, value in landed:
        if at.get(value) != base + 1:
            check.lost_writes += 1
    check.expect(
        check.lost_writes == 0,
        f"{check.lost_writes} of {len(landed)} landed writes were lost (overwritten from a stale base)",
    )
    revisions = sorted(int(e["revision"]) for e in history)
    check.expect(revisions == list(range(1, len(revisions) + 1)), f"revisions are not 1..n: {revisions[:10]}")
    check.expect(len(history) == len(landed), f"{len(landed)} writes acknowledged, {len(history)} in history")


async def run(h: Harness) -> list[Outcome]:
    return await run_scenarios("race", h, [("commit-race", commit_race), ("memory-race", memory_race)])
