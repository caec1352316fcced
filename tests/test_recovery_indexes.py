"""The recovery sweep runs every few seconds on every replica: its two queries must read a
partial index of in-flight rows, never scan `intents` or `idempotency_keys`, which only
grow (a day at 500 commits/s is 43 million rows). Real SQLite and PostgreSQL plans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, text

from gateway.commits.recovery import IN_FLIGHT, dead_task_keys
from gateway.storage import Database
from gateway.storage.models import IdempotencyRecord, Intent

ROWS = 3000


def intent(number: int, status: str, compensation_status: str | None = None) -> dict[str, Any]:
    at = datetime.now(UTC)
    return {
        "intent_id": f"in_{number:06d}",
        "task_id": f"task-{number // 10}",
        "tool": "email.notify",
        "arguments": {"n": number},
        "status": status,
        "proposer": {"sub": "planner", "role": "planner"},
        "executor": "gw-live" if status == "executing" else None,
        "compensation_status": compensation_status,
        "compensation_executor": "gw-dead" if compensation_status == "running" else None,
        "created_at": at,
        "updated_at": at,
    }


def key(
    number: int, *, state: str = "done", intent_id: str | None = "x", owner: str = "gw-live"
) -> dict[str, Any]:
    at = datetime.now(UTC)
    return {
        "scope": "caller",
        "key": f"k{number:06d}",
        "fingerprint": "f" * 64,
        "intent_id": intent_id,
        "state": state,
        "owner": owner,
        "created_at": at,
        "expires_at": at + timedelta(days=1),
    }


async def fill(db: Database) -> None:
    intents = [intent(n, "committed") for n in range(ROWS)]
    intents[17] = intent(17, "executing")
    intents[2500] = intent(2500, "executing")
    intents[900] = intent(900, "compensating", "running")
    intents[901] = intent(901, "compensated", "done")
    keys = [key(n) for n in range(ROWS)]
    keys[5] = key(5, state="pending", intent_id=None, owner="gw-dead")  # a task-level key, owner gone
    keys[6] = key(6, state="pending", intent_id=None, owner="gw-live")
    keys[7] = key(7, state="pending", owner="gw-dead")  # a commit key: resolved from its intent
    async with db.transaction() as session:
        await session.execute(insert(Intent.__table__), intents)
        await session.execute(insert(IdempotencyRecord.__table__), keys)
    async with db.engine.connect() as connection:
        await connection.execute(text("ANALYZE"))
        await connection.commit()


async def plan(db: Database, statement: Any) -> str:
    sql = str(statement.compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}))
    explain = "EXPLAIN QUERY PLAN " if db.dialect == "sqlite" else "EXPLAIN "
    async with db.engine.connect() as connection:
        rows = (await connection.execute(text(explain + sql))).all()
    return "\n".join(str(row[-1]) for row in rows)


async def test_the_sweep_reads_in_flight_intents_through_their_partial_index(database: Database) -> None:
    await fill(database)
    found = await plan(database, IN_FLIGHT)
    assert "ix_intents_in_flight" in found, found
    assert "Seq Scan" not in found, found
    async with database.reading() as session:
        rows = (await session.execute(IN_FLIGHT)).all()
    assert sorted((row.intent_id, row.status) for row in rows) == [
        ("in_000017", "executing"),
        ("in_000900", "compensating"),
        ("in_002500", "executing"),
    ]


async def test_dead_task_keys_are_found_through_their_partial_index(database: Database) -> None:
    await fill(database)
    statement = dead_task_keys({"gw-live"})
    found = await plan(database, statement)
    assert "ix_idempotency_keys_task_pending" in found, found
    assert "Seq Scan" not in found, found
    async with database.transaction() as session:
        await session.execute(statement)
    async with database.reading() as session:
        left = set((await session.execute(select(IdempotencyRecord.key))).scalars())
    assert "k000005" not in left  # pending, task-level, its owner gone: dropped
    assert {"k000006", "k000007"} <= left and len(left) == ROWS - 1
