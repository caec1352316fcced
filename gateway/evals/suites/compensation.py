"""Compensation: a late step fails after earlier steps succeeded; undo them in reverse, once."""

from __future__ import annotations

import asyncio

from gateway.evals.harness import Check, Harness, events
from gateway.evals.scorecard import Outcome
from gateway.evals.suites import delta, run_scenarios

STEP, UNDO, FAILING = "email.reserve", "email.release", "email.notify"


async def compensate_twice(h: Harness, check: Check) -> None:
    for round_ in range(h.rounds):
        task = h.task("compensate")
        count = h.rng.randint(2, 4)
        intents = []
        for index in range(count):
            arguments = {"slot": index, "task": task}
            compensation = {"tool": UNDO, "arguments": {"undo": index, "task": task}}
            intent = await h.ready_intent(task, STEP, arguments, compensation=compensation)
            answer = await h.commit(task, intent, h.key())
            check.expect(answer.status == 200, f"round {round_}: step {index} answered {answer.status}")
            intents.append(intent)
        failing = await h.ready_intent(task, FAILING, {"fail": True, "task": task})
        failed = await h.commit(task, failing, h.key())
        check.expect(
            failed.status == 200 and failed.body.get("status") == "failed",
            f"round {round_}: the failing step answered {failed.status}",
        )
        before = await h.upstream_calls()
        answers = await asyncio.gather(
            *(
                h.request(
                    "POST",
                    f"/tasks/{task}/compensate",
                    headers=h.headers("committer", task, sub=f"committer-{i}", key=h.key()),
                )
                for i in range(max(2, h.workers // 2))
            )
        )
        check.expect(
            all(a.status in (200, 409) for a in answers),
            f"round {round_}: answers {[a.status for a in answers]}",
        )
        final = await h.request(
            "POST", f"/tasks/{task}/compensate", headers=h.headers("committer", task, key=h.key())
        )
        after = await h.upstream_calls()
        check.expect(
            final.status == 200 and final.body.get("status") == "compensated",
            f"round {round_}: the last compensate answered {final.status} {final.raw[:120]!r}",
        )
        calls = delta(before, after, UNDO)
        check.duplicate_effects += max(calls - count, 0)
        check.expect(calls == count, f"round {round_}: {count} steps, {calls} compensating calls")
        check.expect(delta(before, after, STEP) == 0, f"round {round_}: a step ran again during compensation")
        effects = [
            e for e in await h.upstream_effects() if e["tool"] == UNDO and e["arguments"].get("task") == task
        ]
        order = [e["arguments"]["undo"] for e in effects]
        check.expect(order == list(range(count - 1, -1, -1)), f"round {round_}: compensated in order {order}")
        entries = await h.ledger(task_id=task)
        done = [e["intent_id"] for e in events(entries, "compensated")]
        check.expect(
            done == list(reversed(intents)),
            f"round {round_}: ledger compensated {len(done)} in order {done == list(reversed(intents))}",
        )


async def run(h: Harness) -> list[Outcome]:
    return await run_scenarios("compensation", h, [("compensate-twice", compensate_twice)])
