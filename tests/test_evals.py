"""The collision evals pass against a fresh gateway, and each suite catches its protection's absence.

The failing runs switch a protection off by monkeypatching it inside the test; the
gateway runs in this process (uvicorn in a thread), so the patch applies to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.evals import EvalOptions, run_evals

SMALL = {"workers": 4, "rounds": 1, "delay": 0.02, "seed": 7, "progress": False}


def run(*suites: str, **options: Any) -> Any:
    return run_evals(EvalOptions(suites=list(suites), **{**SMALL, **options}))


def test_all_suites_pass_in_process() -> None:
    card = run("race", "staleness", "replay", "escalation", "compensation")
    assert card.ok, card.text()
    summary = {s.name: s.summary() for s in card.suites}
    assert all(s["duplicate_effects"] == 0 and s["lost_writes"] == 0 for s in summary.values())
    assert summary["race"]["requests"] > 0


def test_cli_writes_report_and_exits_zero(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gateway.cli import main

    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--suite",
            "escalation",
            "--workers",
            "2",
            "--rounds",
            "1",
            "--seed",
            "3",
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "escalation" in result.output
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["suites"][0]["suite"] == "escalation"


def test_unknown_suite_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown suite"):
        run("nope")


def _failed(card: Any, suite: str) -> Any:
    result = card.suite(suite)
    assert not card.ok and result.failed >= 1, card.text()
    return result


def test_race_and_replay_catch_a_reservation_that_always_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.commits import execute

    async def always_reserved(*args: Any, **kwargs: Any) -> Any:
        return execute.Ticket()

    monkeypatch.setattr(execute, "_reserve_once", always_reserved)
    card = run("race", "replay")
    assert _failed(card, "race").summary()["duplicate_effects"] > 0
    assert _failed(card, "replay").summary()["duplicate_effects"] > 0


def test_race_catches_lost_writes_without_revision_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.memory import commits, store

    async def fresh(*args: Any, **kwargs: Any) -> None:
        return None

    async def nothing_stale(*args: Any, **kwargs: Any) -> list[Any]:
        return []

    # Both layers: the check before the tool call, and the re-check as the writes land.
    monkeypatch.setattr(store, "require_fresh", fresh)
    monkeypatch.setattr(commits, "stale", nothing_stale)
    result = _failed(run("race", workers=4), "race")
    assert result.summary()["lost_writes"] > 0


def test_staleness_catches_a_goal_check_that_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import memory

    class AnyRevision(int):
        def __eq__(self, other: object) -> bool:
            return True

        def __ne__(self, other: object) -> bool:
            return False

        __hash__ = int.__hash__

    install = memory.install

    def lenient_install(gateway: Any) -> None:
        install(gateway)

        async def any_revision(task_id: str) -> int:
            return AnyRevision(0)

        gateway.envelopes.goal_revision_of = any_revision
        verify = gateway.envelopes.verify

        async def verify_with_the_goal_store(header: Any, principal: Any, **_: Any) -> Any:
            return await verify(header, principal)  # not the revision a commit read with its intent

        gateway.envelopes.verify = verify_with_the_goal_store

    monkeypatch.setattr(memory, "install", lenient_install)
    result = _failed(run("staleness"), "staleness")
    assert [o.scenario for o in result.outcomes if not o.passed] == ["stale-goal"]


def test_staleness_catches_a_dependency_check_that_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.memory import commits, store

    async def nothing_stale(*args: Any, **kwargs: Any) -> list[Any]:
        return []

    # The freshness check everywhere it runs: verify, the reservation, the memory claim.
    monkeypatch.setattr(store, "stale", nothing_stale)
    monkeypatch.setattr(commits, "stale", nothing_stale)
    result = _failed(run("staleness"), "staleness")
    assert "stale-dependency" in [o.scenario for o in result.outcomes if not o.passed]


def test_escalation_catches_a_role_check_that_always_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from gateway.commits import execute

    begin = execute.begin

    async def role_blind(gateway: Any, request: Any) -> Any:
        # Every caller of the commit endpoint is taken for a committer, by the
        # endpoint's own check and by the policy alike.
        step = await begin(gateway, request)
        step.principal = dataclasses.replace(step.principal, role="committer")
        return step

    monkeypatch.setattr(execute, "begin", role_blind)
    result = _failed(run("escalation"), "escalation")
    assert "committer-only-tool" in [o.scenario for o in result.outcomes if not o.passed]


def test_compensation_catches_a_claim_that_always_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    # `gateway.commits.compensate` is also the endpoint function's name: fetch the module.
    compensate = importlib.import_module("gateway.commits.compensate")

    async def always_claimed(*args: Any, **kwargs: Any) -> int:
        return 1

    monkeypatch.setattr(compensate, "_claim", always_claimed)
    result = _failed(run("compensation", workers=4), "compensation")
    assert result.summary()["duplicate_effects"] > 0


@pytest.mark.slow
@pytest.mark.postgres
async def test_all_suites_pass_against_three_postgres_replicas(tmp_path: Path) -> None:
    import asyncio

    from gateway.evals.environment import config_toml, upstream
    from gateway.keys import generate_dev_keys
    from tests.conftest import create_pg_database, drop_pg_database
    from tests.processes import gateways

    name = await create_pg_database()
    keys = tmp_path / "keys"
    generate_dev_keys(keys)
    try:
        with upstream() as upstream_url:
            config = tmp_path / "gateway.toml"
            database = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
            config.write_text(config_toml(database=database, upstream_url=upstream_url, keys_dir=keys))
            with gateways(config, 3) as replicas:
                options = EvalOptions(
                    url=",".join(r.url for r in replicas),
                    upstream_url=upstream_url,
                    keys_dir=keys,
                    **SMALL,
                )
                card = await asyncio.to_thread(run_evals, options)
        assert card.ok, card.text()
    finally:
        await drop_pg_database(name)
