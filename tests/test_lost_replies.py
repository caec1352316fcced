"""A reservation can commit on the server while its caller is gone (a cancelled request) or
never hears back (a lost reply). Neither may leave the intent `executing` with nobody to
run it: the reservation and the call run as one unit that a cancelled request does not
cut, and the recovery sweep marks an `executing` intent of its own instance that nothing
in that instance runs `unknown` (never runs it)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import select

from gateway.storage.models import GatewayInstance, Intent, LedgerEntry
from tests.protocol import Agents, commit_config, new_task, propose_and_verify


@pytest.fixture
async def gw(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Any, Agents, str]]:
    from gateway.app import create_app

    app = create_app(commit_config(tmp_path, database_url, upstream[0], keys_dir))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, app, Agents(keys_dir), database_url


async def statuses(gateway: Any) -> dict[str, str]:
    async with gateway.db.reading() as session:
        return {row.intent_id: row.status for row in (await session.execute(select(Intent))).scalars()}


async def set_intents(gateway: Any, iids: tuple[str, ...], **values: Any) -> None:
    async with gateway.db.transaction() as session:
        for iid in iids:
            intent = await session.get(Intent, iid)
            assert intent is not None
            for name, value in values.items():
                setattr(intent, name, value)


async def sweep_with_in_flight(gateway: Any, iid: str) -> int:
    """One sweep while `iid` counts as in flight in this gateway."""
    with gateway.working_on(iid):
        return int(await gateway.recovery.sweep())


async def test_the_sweep_marks_its_own_executing_intent_with_nothing_in_flight_unknown(
    gw: Any, effects: Any
) -> None:
    client, app, agents, _ = gw
    gateway = app.state.gateway
    task = new_task()
    lost = await propose_and_verify(client, agents, task, "email.notify", {"n": "lost"})
    running = await propose_and_verify(client, agents, task, "email.notify", {"n": "running"})
    # What a reservation leaves when it commits on the server and its reply is lost.
    await set_intents(gateway, (lost, running), status="executing", executor=gateway.instance_id)
    assert await sweep_with_in_flight(gateway, running) == 1  # `running` is still executed here
    assert await statuses(gateway) == {lost: "unknown", running: "executing"}
    async with gateway.db.reading() as session:
        events = (await session.execute(select(LedgerEntry).where(LedgerEntry.intent_id == lost))).scalars()
        last = list(events)[-1]
    assert (last.event, last.data["reason"]) == ("unknown", "its executor has no call in flight for it")
    retry = await client.post(
        f"/intents/{lost}/commit", headers=agents.headers("committer", task, key="k-lost")
    )
    assert retry.status_code == 502
    assert retry.json()["type"].endswith("/commit-outcome-unknown")
    assert "no call in flight" in retry.json()["detail"]
    assert effects.calls["email.notify"] == 0  # never run, not even by the retry


# PostgreSQL only: the reservation is held up on the ledger head's row lock.
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_commit_whose_request_is_cancelled_mid_reservation_still_runs_exactly_once(
    gw: Any, effects: Any
) -> None:
    client, app, agents, database_url = gw
    gateway = app.state.gateway
    task = new_task()
    iid = await propose_and_verify(client, agents, task, "email.notify", {"n": "cancelled"})
    headers = agents.headers("committer", task, key="k-cancel")
    blocker = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("SELECT seq FROM ledger_head WHERE id = 1 FOR UPDATE")
        request = asyncio.create_task(client.post(f"/intents/{iid}/commit", headers=headers))
        for _ in range(100):  # until the reservation waits for the head's lock
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting, "the reservation never reached the ledger head"
        request.cancel()  # the caller goes away while the reservation is blocked
        with pytest.raises(asyncio.CancelledError):
            await request
        await holding.rollback()
    finally:
        await blocker.close()
    for _ in range(200):
        if (await statuses(gateway))[iid] == "committed":
            break
        await asyncio.sleep(0.05)
    assert (await statuses(gateway))[iid] == "committed"
    assert effects.calls["email.notify"] == 1
    replay = await client.post(f"/intents/{iid}/commit", headers=headers)
    assert replay.status_code == 200 and replay.json()["status"] == "committed"
    assert replay.headers.get("idempotent-replayed") == "true"
    assert effects.calls["email.notify"] == 1


async def test_the_sweep_marks_its_own_running_compensation_with_nothing_in_flight_unknown(
    gw: Any, effects: Any
) -> None:
    client, app, agents, _ = gw
    gateway = app.state.gateway
    task = new_task()
    left = await propose_and_verify(client, agents, task, "email.reserve", {"n": "left"})
    running = await propose_and_verify(client, agents, task, "email.reserve", {"n": "running"})
    await set_intents(
        gateway,
        (left, running),
        status="compensating",
        compensation_status="running",
        compensation_executor=gateway.instance_id,
    )
    assert await sweep_with_in_flight(gateway, running) == 1
    async with gateway.db.reading() as session:
        found = {
            row.intent_id: row.compensation_status
            for row in (await session.execute(select(Intent))).scalars()
        }
    assert found == {left: "unknown", running: "running"}
    assert effects.calls["email.release"] == 0


async def test_a_compensation_whose_request_is_cancelled_mid_call_still_finishes_once(
    gw: Any, effects: Any
) -> None:
    client, app, agents, _ = gw
    gateway = app.state.gateway
    task = new_task()
    iid = await propose_and_verify(client, agents, task, "email.reserve", {"n": 1, "delay": 1.0})
    committed = await client.post(
        f"/intents/{iid}/commit", headers=agents.headers("committer", task, key=iid)
    )
    assert committed.json()["status"] == "committed"
    headers = agents.headers("committer", task, key="undo")
    request = asyncio.create_task(client.post(f"/tasks/{task}/compensate", headers=headers))
    for _ in range(100):  # until the compensating call (1 s at the upstream) is under way
        async with gateway.db.reading() as session:
            intent = await session.get(Intent, iid)
        if intent is not None and intent.compensation_status == "running":
            break
        await asyncio.sleep(0.02)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    for _ in range(200):
        async with gateway.db.reading() as session:
            intent = await session.get(Intent, iid)
        if intent is not None and intent.status == "compensated":
            break
        await asyncio.sleep(0.05)
    assert intent is not None and (intent.status, intent.compensation_status) == ("compensated", "done")
    assert effects.calls["email.release"] == 1
    again = await client.post(f"/tasks/{task}/compensate", headers=headers)  # the key was released
    assert again.status_code == 200 and again.json()["status"] == "compensated"
    assert effects.calls["email.release"] == 1


async def test_a_sweep_during_a_live_commit_leaves_it_alone(gw: Any, effects: Any) -> None:
    client, app, agents, _ = gw
    gateway = app.state.gateway
    task = new_task()
    iid = await propose_and_verify(client, agents, task, "email.notify", {"n": 1, "delay": 1.0})
    request = asyncio.create_task(
        client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="k-live"))
    )
    for _ in range(100):  # until the tool call (1 s at the upstream) is under way
        if (await statuses(gateway))[iid] == "executing":
            break
        await asyncio.sleep(0.02)
    assert await gateway.recovery.sweep() == 0
    response = await request
    assert response.status_code == 200 and response.json()["status"] == "committed"
    async with gateway.db.reading() as session:
        events = (
            await session.execute(select(LedgerEntry.event).where(LedgerEntry.intent_id == iid))
        ).scalars()
        assert "unknown" not in list(events)
    assert effects.calls["email.notify"] == 1


async def busy_elsewhere(gateway: Any, iid: str) -> None:
    """The intent is executing on another replica that is alive."""
    fresh = datetime.now(UTC)
    async with gateway.db.transaction() as session:
        session.add(
            GatewayInstance(
                instance_id="elsewhere", node="other-host/boot", pid=1, started_at=fresh, heartbeat_at=fresh
            )
        )
        intent = await session.get(Intent, iid)
        assert intent is not None
        intent.status, intent.executor = "executing", "elsewhere"


async def test_a_refusal_nobody_waits_for_any_more_is_logged_as_such(
    gw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, app, agents, _ = gw
    gateway = app.state.gateway
    gateway.commit_wait = 0.5
    task = new_task()
    iid = await propose_and_verify(client, agents, task, "email.notify", {"n": 1})
    await busy_elsewhere(gateway, iid)
    caplog.set_level(logging.INFO)
    request = asyncio.create_task(
        client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="k-gone"))
    )
    await asyncio.sleep(0.1)
    request.cancel()  # the caller goes away while its commit waits for the other replica
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.sleep(1.0)  # the wait runs out: a 409 that nobody receives
    gc.collect()
    await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("ended with commit-in-progress" in r.getMessage() for r in caplog.records)


async def test_a_stopping_gateway_stops_waiting_for_another_replicas_commit(gw: Any) -> None:
    client, app, agents, _ = gw
    gateway = app.state.gateway
    gateway.commit_wait = 30
    task = new_task()
    iid = await propose_and_verify(client, agents, task, "email.notify", {"n": 1})
    await busy_elsewhere(gateway, iid)
    request = asyncio.create_task(
        client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="k-stop"))
    )
    await asyncio.sleep(0.2)
    gateway.stopping = True
    try:
        response = await asyncio.wait_for(request, 2)
    finally:
        gateway.stopping = False
    assert response.status_code == 409
    assert response.json()["type"].endswith("/commit-in-progress")
