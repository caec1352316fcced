"""The hash-chained ledger: appends, `ledger verify` naming a tampered entry, signed checkpoints, traces."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select, text, update

from gateway import ledger
from gateway.cli import main
from gateway.storage import Database
from gateway.storage.models import LedgerEntry, LedgerHead
from tests.protocol import Agents, commit_config, new_task, propose_and_verify


def write_config(tmp_path: Path, database_url: str, keys_dir: Path) -> Path:
    path = tmp_path / "ledger.toml"
    path.write_text(f'[gateway]\ndatabase = "{database_url}"\nkeys_dir = "{keys_dir}"\n', encoding="utf-8")
    return path


async def cli(*args: str) -> Result:
    # The CLI runs its own event loop, so it gets a thread of its own.
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def fill(db: Database, count: int) -> None:
    await ledger.ensure_head(db)
    for number in range(count):
        async with db.transaction() as session:
            await ledger.append(
                session,
                event="proposed",
                actor={"sub": "planner-1", "role": "planner"},
                task_id="t",
                intent_id=f"in_{number}",
                data={"n": number, "amount": 1.5},
            )


async def test_appends_chain_and_verify_passes(database: Database) -> None:
    await fill(database, 5)
    async with database.sessions() as session:
        rows = (await session.execute(select(LedgerEntry).order_by(LedgerEntry.seq))).scalars().all()
        head = await session.get(LedgerHead, 1)
    assert [row.seq for row in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == ledger.GENESIS
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(rows, rows[1:], strict=False))
    assert head is not None and (head.seq, head.hash) == (5, rows[-1].hash)
    report = await ledger.verify(database)
    assert report.ok and report.entries == 5


async def test_concurrent_appends_keep_one_chain(database: Database) -> None:
    await ledger.ensure_head(database)

    async def one(number: int) -> None:
        async with database.transaction() as session:
            await ledger.append(session, event="committed", intent_id=f"in_{number}")

    await asyncio.gather(*(one(number) for number in range(40)))
    report = await ledger.verify(database)
    assert report.ok and report.entries == 40


async def test_verify_names_the_edited_row(tmp_path: Path, database_url: str, keys_dir: Path) -> None:
    db = Database(database_url)
    try:
        await fill(db, 6)
        config = write_config(tmp_path, database_url, keys_dir)
        good = await cli("ledger", "verify", "--config", str(config))
        assert good.exit_code == 0, good.output
        assert "6 entries" in good.output
        async with db.transaction() as session:
            await session.execute(text("UPDATE ledger SET actor_sub = 'mallory' WHERE seq = 4"))
        bad = await cli("ledger", "verify", "--config", str(config))
        assert bad.exit_code == 1
        assert "seq 4" in bad.output
    finally:
        await db.close()


async def test_signed_checkpoint_catches_a_rewritten_chain(
    tmp_path: Path, database_url: str, keys_dir: Path
) -> None:
    db = Database(database_url)
    try:
        await fill(db, 4)
        config = write_config(tmp_path, database_url, keys_dir)
        out = tmp_path / "checkpoint.json"
        made = await cli("ledger", "checkpoint", "--config", str(config), "--out", str(out))
        assert made.exit_code == 0, made.output
        checkpoint = json.loads(out.read_text())
        assert checkpoint["seq"] == 4 and checkpoint["signature"]
        ok = await cli("ledger", "verify", "--config", str(config), "--checkpoint", str(out))
        assert ok.exit_code == 0 and "2 checkpoints" in ok.output, ok.output

        # Rewrite entry 2 and recompute every later hash and the head: the chain is
        # self-consistent again, but no longer the one the gateway signed.
        async with db.transaction() as session:
            rows = (await session.execute(select(LedgerEntry).order_by(LedgerEntry.seq))).scalars().all()
            prev = ledger.GENESIS
            for row in rows:
                if row.seq == 2:
                    row.data = {"n": 1, "amount": 1_000_000}
                row.prev_hash = prev
                row.hash = prev = ledger.chain_hash(row, prev)
            await session.flush()
            await session.execute(update(LedgerHead).where(LedgerHead.id == 1).values(hash=prev))
        assert (await ledger.verify(db)).entries == 4
        external = tmp_path / "only-file.json"
        external.write_text(out.read_text())
        async with db.transaction() as session:
            await session.execute(text("DELETE FROM ledger_checkpoints"))
        caught = await cli("ledger", "verify", "--config", str(config), "--checkpoint", str(external))
        assert caught.exit_code == 1
        assert "seq 4" in caught.output and "checkpoint" in caught.output

        forged = {**checkpoint, "hash": rows[-1].hash}
        external.write_text(json.dumps(forged))
        caught = await cli("ledger", "verify", "--config", str(config), "--checkpoint", str(external))
        assert caught.exit_code == 1 and "invalid signature" in caught.output
    finally:
        await db.close()


async def test_truncated_tail_is_caught_by_checkpoint(database: Database, keys_dir: Path) -> None:
    from gateway.keys import load_private_key, load_public_key

    await fill(database, 3)
    await ledger.write_checkpoint(database, load_private_key(keys_dir / "gateway.key.pem"))
    async with database.transaction() as session:
        second = await session.get(LedgerEntry, 2)
        assert second is not None
        await session.execute(text("DELETE FROM ledger WHERE seq = 3"))
        await session.execute(update(LedgerHead).where(LedgerHead.id == 1).values(seq=2, hash=second.hash))
    report = await ledger.verify(database, [load_public_key(keys_dir / "gateway.pub.pem")])
    assert not report.ok and report.bad_seq is not None and "removed" in (report.problem or "")


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


async def test_trace_follows_parents_from_the_effect_back(gw: Any, effects: Any) -> None:
    client, app, agents = gw
    task = new_task()
    first = await propose_and_verify(client, agents, task, "email.notify", {"n": 1})
    await client.post(f"/intents/{first}/commit", headers=agents.headers("committer", task, key="a"))
    response = await client.post(
        "/intents",
        json={"task_id": task, "tool": "email.notify", "arguments": {"n": 2}},
        headers=agents.headers("planner", task, parent=first),
    )
    second = response.json()["intent_id"]
    assert response.json()["parent"] == first
    await client.post(
        f"/intents/{second}/verify",
        json={"verdict": "accept", "reason": "ok"},
        headers=agents.headers("verifier", task),
    )
    await client.post(f"/intents/{second}/commit", headers=agents.headers("committer", task, key="b"))

    traced = await client.get(f"/trace/{second}", headers=agents.headers("worker", task))
    assert traced.status_code == 200, traced.text
    body = traced.json()
    assert body["task_id"] == task
    events = [(entry["intent_id"], entry["event"]) for entry in body["entries"]]
    assert events[:4] == [
        (first, "proposed"),
        (first, "verified"),
        (first, "commit_started"),
        (first, "committed"),
    ]
    assert events[-1] == (second, "committed")
    by_seq = {entry["seq"]: entry for entry in body["entries"]}
    caused = [link for link in body["links"] if link["kind"] == "caused_by"]
    assert len(caused) == 1
    assert (
        by_seq[caused[0]["from"]]["intent_id"] == second and by_seq[caused[0]["to"]]["event"] == "committed"
    )
    assert (await client.get("/trace/in_missing", headers=agents.headers("worker", task))).status_code == 404

    page = await client.get(
        "/ledger", params={"task_id": task, "limit": 3}, headers=agents.headers("worker", task)
    )
    assert len(page.json()["entries"]) == 3 and page.json()["next_after"] == page.json()["entries"][-1]["seq"]
    rest = await client.get(
        "/ledger",
        params={"task_id": task, "after": page.json()["next_after"]},
        headers=agents.headers("worker", task),
    )
    assert len(rest.json()["entries"]) == 5
    assert (await client.get("/ledger")).status_code == 401
    assert (await ledger.verify(app.state.gateway.db)).ok
