"""A reservation can commit on the server while its caller is gone (a cancelled request) or
never hears back (a lost reply). Neither may leave the intent `executing` with nobody to
run it: the reservation and the call run as one unit that a cancelled request does not
cut, and the recovery sweep marks an `executing` intent of its own instance that nothing
in that instance runs `unknown` (never runs it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import select

from gateway.storage.models import Intent, LedgerEntry
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


async def test_the_sweep_marks_its_own_executing_intent_with_nothing_in_flight_unknown(
    gw: Any, effects: Any
) -> None:
    client, app, agents, _ = gw
    gateway = app.state.gateway
    task = new_task()
    lost = await propose_and_verify(client, agents, task, "email.notify", {"n": "lost"})
    running = await propose_and_verify(client, agents, task, "email.notify", {"n": "running"})
    # What a reservation leaves when it commits on the server and its reply is lost.
    async with gateway.db.transaction() as session:
        for iid in (lost, running):
            intent = await session.get(Intent, iid)
            assert intent is not None
            intent.status, intent.executor = "executing", gateway.instance_id
    gateway.in_flight[running] += 1  # this one is still being executed here
    try:
        assert await gateway.recovery.sweep() == 1
        assert await statuses(gateway) == {lost: "unknown", running: "executing"}
    finally:
        gateway.in_flight[running] -= 1
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
    async with gateway.db.transaction() as session:
        for iid in (left, running):
            intent = await session.get(Intent, iid)
            assert intent is not None
            intent.status, intent.compensation_status = "compensating", "running"
            intent.compensation_executor = gateway.instance_id
    gateway.in_flight[running] += 1
    try:
        assert await gateway.recovery.sweep() == 1
    finally:
        gateway.in_flight[running] -= 1
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
