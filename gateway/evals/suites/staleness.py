"""Staleness: a worker acts on a delayed goal or dependency after another committed an update.

The worker's handoff (goal revision) or plan (`depends_on` revision) was current when
it was issued; the update lands first, then the worker's commit arrives `delay`
seconds late. It must be refused before the tool is called.
"""

from __future__ import annotations

import asyncio

from gateway.evals.harness import Call, Check, EvalSetupError, Harness, events
from gateway.evals.scorecard import Outcome
from gateway.evals.suites import delta, run_scenarios

TOOL = "email.notify"


def _problem(answer: Call) -> str:
    return str(answer.body.get("type", "")).rsplit("/", 1)[-1] if isinstance(answer.body, dict) else ""


async def _write(h: Harness, task: str, namespace: str, key: str, value: str, **kwargs: int) -> None:
    answer = await h.memory_set(task, namespace, key, value, **kwargs)
    if answer.status != 200:
        raise EvalSetupError(f"write of {namespace}/{key} answered {answer.status}: {answer.raw[:200]!r}")


async def _late_commit(
    h: Harness, check: Check, label: str, task: str, intent: str, want: str, **kw: int
) -> None:
    await asyncio.sleep(h.delay)
    before = await h.upstream_calls()
    answer = await h.commit(task, intent, h.key(), **kw)
    after = await h.upstream_calls()
    check.expect(
        answer.status == 409 and _problem(answer) == want,
        f"{label}: the late commit answered {answer.status} {_problem(answer)} (want 409 {want})",
    )
    calls = delta(before, after, TOOL)
    check.expect(calls == 0, f"{label}: the tool was called {calls} times")
    committed = events(await h.ledger(intent_id=intent), "committed", intent)
    check.expect(not committed, f"{label}: the stale intent has a committed ledger entry")


async def stale_goal(h: Harness, check: Check) -> None:
    for round_ in range(h.rounds):
        task = h.task("stale-goal")
        await _write(h, task, "goals", task, "send the weekly digest", goal_revision=0)
        intent = await h.ready_intent(
            task, TOOL, {"to": "team@example.com", "round": round_}, goal_revision=1
        )
        await _write(h, task, "goals", task, "cancelled: do not send", goal_revision=1)  # the planner revises
        await _late_commit(h, check, f"round {round_}", task, intent, "stale-goal", goal_revision=1)


async def stale_dependency(h: Harness, check: Check) -> None:
    for round_ in range(h.rounds):
        task = h.task("stale-dep")
        key = f"dep-{h.run_id}-{round_}-{h.rng.randint(0, 10**6)}"
        await _write(h, h.task("dep-writer"), "evals", key, "plan A")
        depends_on = [{"namespace": "evals", "key": key, "revision": 1}]
        plan = {"to": "ops@example.com", "plan": "A"}
        intent = await h.ready_intent(task, TOOL, plan, depends_on=depends_on)
        await _write(h, h.task("dep-writer"), "evals", key, "plan B", if_revision=1)
        await _late_commit(h, check, f"round {round_}", task, intent, "stale-dependency")


async def run(h: Harness) -> list[Outcome]:
    return await run_scenarios(
        "staleness", h, [("stale-goal", stale_goal), ("stale-dependency", stale_dependency)]
    )
