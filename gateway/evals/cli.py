"""`agent-gateway eval`: run the collision suites and print the scorecard."""

from __future__ import annotations

import sys
from pathlib import Path

import click

SUITE_NAMES = ("race", "staleness", "replay", "escalation", "compensation")


@click.command("eval")
@click.option(
    "--url", help="A running gateway (default: start one in-process on a temporary SQLite database)."
)
@click.option(
    "--upstream", "upstream_url", help="With --url: the counting tool upstream that gateway forwards to."
)
@click.option("--keys-dir", default="keys", show_default=True, help="With --url: that gateway's dev keys.")
@click.option(
    "--suite", "suites", multiple=True, type=click.Choice(SUITE_NAMES), help="Repeatable; default all."
)
@click.option("--report", type=click.Path(dir_okay=False), help="Also write the scorecard as JSON here.")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(2, 256))
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--delay",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 30),
    help="Seconds a delayed worker lags.",
)
@click.option("--seed", default=0, show_default=True, type=int)
def eval_command(
    url: str | None,
    upstream_url: str | None,
    keys_dir: str,
    suites: tuple[str, ...],
    report: str | None,
    workers: int,
    rounds: int,
    delay: float,
    seed: int,
) -> None:
    """Collision evals: races, stale goals, replays, escalation, compensation. Exit 1 on any failure."""
    from gateway.evals import EvalOptions, run_evals

    if url and not upstream_url:
        raise click.UsageError("--url needs --upstream: the eval checks effects at the tool upstream")
    options = EvalOptions(
        url=url,
        upstream_url=upstream_url,
        keys_dir=Path(keys_dir),
        suites=list(suites or SUITE_NAMES),
        workers=workers,
        rounds=rounds,
        delay=delay,
        seed=seed,
    )
    card = run_evals(options)
    click.echo(card.text())
    if report:
        Path(report).write_text(card.dumps() + "\n", encoding="utf-8")
    if not card.ok:
        sys.exit(1)
