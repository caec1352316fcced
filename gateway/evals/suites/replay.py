"""Replay: duplicate proposals and commits injected after partial success, old and new keys."""

from __future__ import annotations

import asyncio

from gateway.evals.harness import Check, EvalSetupError, Harness, events
from gateway.evals.scorecard import Outcome
from gateway.evals.suites import delta, run_scenarios

TOOL = "email.notify"


async def duplicate_commits(h: Harness, check: Check) -> None:
    for round_ in range(h.rounds):
        task = h.task("replay")
        arguments = {"to": "replay@example.com", "round": round_, "n": h.rng.randint(0, 10**6)}
        proposals = await asyncio.gather(
            *(h.propose(task, TOOL, arguments) for _ in range(max(h.workers // 2, 2)))
        )
        ids = {p.body.get("intent_id") for p in proposals if isinstance(p.body, dict)}
        check.expect(len(ids) == 1, f"round {round_}: duplicate proposals made {len(ids)} intents")
        check.expect(
            sorted(p.status for p in proposals).count(201) == 1,
            f"round {round_}: proposal answers {sorted(p.status for p in proposals)} (want one 201)",
        )
        intent = str(next(iter(ids)))
        if (await h.verify(task, intent)).status != 200:
            raise EvalSetupError(f"verify of {intent} refused")
        before = await h.upstream_calls()
        old_key = h.key()
        first = await h.commit(task, intent, old_key)
        check.expect(first.status == 200, f"round {round_}: first commit answered {first.status}")
        # After the success: the planner proposes again, and the committer retries, old and new keys.
        again = await h.propose(task, TOOL, arguments)
        check.expect(again.status == 200, f"round {round_}: re-proposal answered {again.status} (want 200)")
        retries = await asyncio.gather(
            *(h.commit(task, intent, old_key if i % 2 == 0 else h.key()) for i in range(h.workers))
        )
        after = await h.upstream_calls()
        calls = delta(before, after, TOOL)
        check.duplicate_effects += max(calls - 1, 0)
        check.expect(calls == 1, f"round {round_}: the tool was called {calls} times")
        check.expect(
            all(r.raw == first.raw for r in retries),
            f"round {round_}: replayed answers differ from the first ({sorted({r.status for r in retries})})",
        )
        committed = events(await h.ledger(intent_id=intent), "committed", intent)
        check.expect(len(committed) == 1, f"round {round_}: {len(committed)} committed ledger entries")


async def partial_success(h: Harness, check: Check) -> None:
    """A two-step plan where step 1 committed; the whole plan is re-run with new keys."""
    for round_ in range(h.rounds):
        task = h.task("partial")
        steps = [{"to": f"step{i}@example.com", "round": round_} for i in range(2)]
        first = await h.ready_intent(task, TOOL, steps[0])
        before = await h.upstream_calls()
        done = await h.commit(task, first, h.key())
        check.expect(done.status == 200, f"round {round_}: step 1 answered {done.status}")
        # The orchestrator lost the answer and re-runs both steps: proposals and commits again.
        ids = [await h.ready_intent_or_existing(task, TOOL, step) for step in steps]
        answers = await asyncio.gather(*(h.commit(task, i, h.key()) for i in ids for _ in range(2)))
        after = await h.upstream_calls()
        calls = delta(before, after, TOOL)
        check.duplicate_effects += max(calls - 2, 0)
        check.expect(calls == 2, f"round {round_}: two steps made {calls} tool calls")
        check.expect(ids[0] == first, f"round {round_}: the re-proposal of step 1 is a new intent")
        check.expect(
            answers[0].raw == done.raw and answers[1].raw == done.raw, f"round {round_}: step 1 not replayed"
        )
        check.expect(
            all(a.status in (200, 409) for a in answers),
            f"round {round_}: answers {[a.status for a in answers]}",
        )
        entries = await h.ledger(task_id=task)
        for intent in set(ids):
            count = len(events(entries, "committed", intent))
            check.expect(count == 1, f"round {round_}: {intent} has {count} committed entries")


async def run(h: Harness) -> list[Outcome]:
    return await run_scenarios(
        "replay", h, [("duplicate-commits", duplicate_commits), ("partial-success", partial_success)]
    )
