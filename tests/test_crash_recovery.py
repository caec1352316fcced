"""A gateway that dies mid-commit leaves the intent `unknown`, never executed twice."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.storage.models import GatewayInstance, Intent, LedgerEntry
from tests.processes import GatewayProcess, ledger_verify, write_config
from tests.protocol import Agents, commit_config, new_task, propose_and_verify

pytestmark = pytest.mark.slow


async def wait_for(predicate: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_sigkill_mid_commit_leaves_intent_unknown_and_never_reruns(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], effects: Any, keys_dir: Path
) -> None:
    config = write_config(
        tmp_path / "gateway.toml", database_url=database_url, upstream_url=upstream[0], keys_dir=keys_dir
    )
    agents = Agents(keys_dir)
    task = new_task()
    first = GatewayProcess(config).start()
    try:
        first.wait_ready()
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
            iid = await propose_and_verify(client, agents, task, "email.notify", {"delay": 2.0})
            commit = asyncio.create_task(
                client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="k"))
            )
            await wait_for(lambda: effects.calls["email.notify"] == 1)  # the upstream is working on it
            first.kill()
            with contextlib.suppress(httpx.HTTPError):
                await commit
    finally:
        first.kill()

    second = GatewayProcess(config).start()  # a restart on the same machine
    try:
        second.wait_ready()
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
            state: dict[str, Any] = {}
            for _ in range(100):
                state = (await client.get(f"/intents/{iid}", headers=agents.headers("worker", task))).json()
                if state["status"] != "executing":
                    break
                await asyncio.sleep(0.1)
            assert state["status"] == "unknown"
            assert [item["event"] for item in state["history"]][-2:] == ["commit_started", "unknown"]
            retried = await client.post(
                f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="k")
            )
            other = await client.post(
                f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="new")
            )
            assert retried.status_code == 502, retried.text
            assert retried.json()["type"].endswith("/commit-outcome-unknown")
            assert other.content == retried.content
            await asyncio.sleep(2.5)  # the killed call's upstream work has finished by now
            assert effects.calls["email.notify"] == 1
    finally:
        second.stop()
    verified = ledger_verify(config)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.fixture
async def gw(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Any, Agents]]:
    from gateway.app import create_app

    app = create_app(commit_config(tmp_path, database_url, upstream[0], keys_dir))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, app, Agents(keys_dir)


async def test_sweep_marks_work_of_a_silent_replica_unknown(gw: Any, effects: Any) -> None:
    """A replica on another host whose heartbeat stopped: its executing intents become unknown."""
    client, app, agents = gw
    gateway = app.state.gateway
    task = new_task()
    live = await propose_and_verify(client, agents, task, "email.notify", {"n": "live"})
    dead = await propose_and_verify(client, agents, task, "email.notify", {"n": "dead"})
    stale = datetime.now(UTC) - timedelta(seconds=gateway.recovery.ttl + 5)
    fresh = datetime.now(UTC)
    async with gateway.db.transaction() as session:
        session.add(
            GatewayInstance(
                instance_id="elsewhere-old",
                node="other-host/boot",
                pid=1,
                started_at=stale,
                heartbeat_at=stale,
            )
        )
        session.add(
            GatewayInstance(
                instance_id="elsewhere-live",
                node="other-host/boot",
                pid=1,
                started_at=fresh,
                heartbeat_at=fresh,
            )
        )
        for iid, executor in ((dead, "elsewhere-old"), (live, "elsewhere-live")):
            intent = await session.get(Intent, iid)
            assert intent is not None
            intent.status, intent.executor = "executing", executor
    assert await gateway.recovery.sweep() == 1
    async with gateway.db.sessions() as session:
        statuses = {row.intent_id: row.status for row in (await session.execute(select(Intent))).scalars()}
        events = (
            await session.execute(select(LedgerEntry.event).where(LedgerEntry.intent_id == dead))
        ).scalars()
        assert list(events)[-1] == "unknown"
    assert statuses == {dead: "unknown", live: "executing"}
    assert effects.calls["email.notify"] == 0
