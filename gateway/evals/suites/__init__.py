"""The five suites; each is `async def run(h: Harness) -> list[Outcome]`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.evals.harness import Check, EvalSetupError, Harness
from gateway.evals.scorecard import Outcome

Scenario = Callable[[Harness, Check], Awaitable[None]]


async def run_scenarios(suite: str, h: Harness, scenarios: list[tuple[str, Scenario]]) -> list[Outcome]:
    outcomes = []
    for name, scenario in scenarios:
        check = Check()
        try:
            await scenario(h, check)
        except EvalSetupError as error:
            check.failures.append(f"setup refused: {error}")
        problems = await h.ledger_chain_problems()
        check.failures += problems
        outcomes.append(
            Outcome(
                suite, name, not check.failures, check.failures, check.duplicate_effects, check.lost_writes
            )
        )
    return outcomes


def delta(before: dict[str, int], after: dict[str, int], tool: str) -> int:
    return after.get(tool, 0) - before.get(tool, 0)
