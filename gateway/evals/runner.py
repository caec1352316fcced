"""Run the chosen suites against a target and build the scorecard."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.evals.environment import Target, in_process
from gateway.evals.harness import Harness
from gateway.evals.scorecard import Outcome, Progress, Scorecard, SuiteResult

Suite = Callable[[Harness], Awaitable[list[Outcome]]]


def suites() -> dict[str, Suite]:
    from gateway.evals.suites import compensation, escalation, race, replay, staleness

    return {
        "race": race.run,
        "staleness": staleness.run,
        "replay": replay.run,
        "escalation": escalation.run,
        "compensation": compensation.run,
    }


@dataclass
class EvalOptions:
    # None: start a gateway in-process on a temporary SQLite database. Comma-separated:
    # replicas sharing one database, called round-robin.
    url: str | None = None
    upstream_url: str | None = None  # the counting upstream the gateway at `url` forwards to
    keys_dir: Path = Path("keys")  # with `url`: the dev keys of that gateway (issuer + agents)
    suites: list[str] = field(default_factory=lambda: list(suites()))
    workers: int = 8
    rounds: int = 2
    delay: float = 0.05
    seed: int = 0
    progress: bool = True


@contextlib.contextmanager
def _target(options: EvalOptions) -> Iterator[Target]:
    if options.url is None:
        with in_process() as target:
            yield target
        return
    if options.upstream_url is None:
        raise ValueError("--upstream is required with --url: the eval reads the tool upstream's /_effects")
    urls = [url.strip().rstrip("/") for url in options.url.split(",") if url.strip()]
    yield Target(urls, options.upstream_url.rstrip("/"), options.keys_dir, None)


def run_evals(options: EvalOptions) -> Scorecard:
    unknown = sorted(set(options.suites) - set(suites()))
    if unknown:
        raise ValueError(f"unknown suite(s): {', '.join(unknown)}; choose from {', '.join(suites())}")
    with _target(options) as target:
        return asyncio.run(_run(options, target))


async def _run(options: EvalOptions, target: Target) -> Scorecard:
    card = Scorecard(
        settings={
            "url": options.url or "in-process (SQLite)",
            "workers": options.workers,
            "rounds": options.rounds,
            "delay": options.delay,
            "seed": options.seed,
        }
    )
    progress = Progress(len(options.suites), enabled=options.progress)
    limits = httpx.Limits(max_connections=max(16, options.workers * 4))
    timeout = httpx.Timeout(30.0)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False)
            )
            for url in target.urls
        ]
        upstream = await stack.enter_async_context(
            httpx.AsyncClient(base_url=target.upstream_url, timeout=timeout, trust_env=False)
        )
        for name in options.suites:
            # One generator per suite, seeded from the run seed and the suite's name: a suite's
            # choices do not change when another suite is added or left out.
            rng = random.Random(f"{options.seed}:{name}")  # noqa: S311 - choices, not secrets
            harness = Harness(
                clients,
                upstream,
                target.keys_dir,
                rng=rng,
                workers=options.workers,
                rounds=options.rounds,
                delay=options.delay,
                decision_log=target.decision_log,
            )
            result = SuiteResult(name)
            try:
                result.outcomes = await suites()[name](harness)
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as error:
                result.outcomes = [Outcome(name, "suite", False, [f"the suite crashed: {error!r}"])]
            result.latencies = harness.latencies
            card.suites.append(result)
            progress.step(name)
    return card
