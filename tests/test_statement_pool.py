"""The statement pool (`Database.pg_one`): asyncpg's own pool beside SQLAlchemy's, on the
local PostgreSQL. The commit protocol's one-statement steps all run here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from gateway.storage import Database
from gateway.storage.db import DatabaseClosed, PgStatement
from tests.conftest import PG_ADMIN_DSN, create_pg_database, drop_pg_database

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_name() -> AsyncIterator[str]:
    name = await create_pg_database()
    try:
        yield name
    finally:
        await drop_pg_database(name)


def url(name: str, query: str = "") -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}{query}"


async def connections_to(name: str) -> int:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        return int(
            await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
            )
        )
    finally:
        await admin.close()


async def connections_left(name: str) -> int:
    """After close: a backend may take a moment to leave pg_stat_activity."""
    for _ in range(30):
        if (count := await connections_to(name)) == 0:
            return 0
        await asyncio.sleep(0.1)
    return count


SLEEP = PgStatement("SELECT pg_backend_pid() AS pid, pg_sleep(CAST(:seconds AS float8)) AS slept")


async def test_statements_share_a_bounded_pool_apart_from_sqlalchemys(pg_name: str) -> None:
    db = Database(url(pg_name), statement_pool_size=3)
    try:
        rows = await asyncio.gather(*(db.pg_one(SLEEP, {"seconds": 0.05}) for _ in range(12)))
        assert len({row["pid"] for row in rows}) == 3  # 12 statements, never more than 3 connections
        assert await connections_to(pg_name) == 3
        pool = db.engine.sync_engine.pool
        assert pool.checkedin() == 0 and pool.checkedout() == 0  # SQLAlchemy's pool was never used
    finally:
        await db.close()
    assert await connections_left(pg_name) == 0  # close() closes the statement pool too


async def test_json_values_go_in_as_text_and_come_back_parsed(pg_name: str) -> None:
    db = Database(url(pg_name))
    try:
        row = await db.pg_one(
            PgStatement("SELECT CAST(:value AS json) AS value, CAST(NULL AS json) AS missing"),
            {"value": '{"amount": 12, "to": ["a", "é"]}'},
        )
        assert row["value"] == {"amount": 12, "to": ["a", "é"]}
        assert row["missing"] is None
    finally:
        await db.close()


@pytest.mark.parametrize(("query", "named"), [("", True), ("?prepared_statement_cache_size=0", False)])
async def test_the_urls_statement_cache_option_reaches_the_pool(
    pg_name: str, query: str, named: bool
) -> None:
    """0 (for PgBouncer in transaction mode) leaves no named prepared statement on the server."""
    db = Database(url(pg_name, query), statement_pool_size=1)
    try:
        await db.pg_one(SLEEP, {"seconds": 0})
        await db.pg_one(SLEEP, {"seconds": 0})
        row = await db.pg_one(PgStatement("SELECT count(*) AS prepared FROM pg_prepared_statements"), {})
        assert (row["prepared"] > 0) is named
    finally:
        await db.close()


async def test_a_failed_or_cancelled_statement_leaves_its_connection_usable(pg_name: str) -> None:
    db = Database(url(pg_name), statement_pool_size=1)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await db.pg_one(PgStatement("SELECT 1 / CAST(:zero AS integer) AS x"), {"zero": 0})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(db.pg_one(SLEEP, {"seconds": 30}), 0.2)
        started = asyncio.get_running_loop().time()
        row = await db.pg_one(PgStatement("SELECT 2 AS two"), {})
        assert row["two"] == 2
        assert asyncio.get_running_loop().time() - started < 10  # the 30 s sleep was cancelled
    finally:
        await db.close()


async def test_closing_waits_for_a_statement_in_flight_then_drops_it(
    pg_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.storage.db.CLOSE_SECONDS", 0.5)
    db = Database(url(pg_name), statement_pool_size=1)
    slow = asyncio.create_task(db.pg_one(SLEEP, {"seconds": 30}))
    await asyncio.sleep(0.3)  # the statement is running
    loop = asyncio.get_running_loop()
    started = loop.time()
    await db.close()
    assert 0.4 < loop.time() - started < 5  # waited, but not for the 30 s
    with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError, ConnectionError)):
        await slow


async def test_a_statement_waits_for_a_connection_at_most_the_pool_timeout(
    pg_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.storage.db.POOL_TIMEOUT", 0.3)
    db = Database(url(pg_name), statement_pool_size=1)
    try:
        busy = asyncio.create_task(db.pg_one(SLEEP, {"seconds": 3}))
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await db.pg_one(PgStatement("SELECT 1 AS one"), {})
        assert loop.time() - started < 2
        await busy
    finally:
        await db.close()


async def test_no_statement_runs_after_close(pg_name: str) -> None:
    db = Database(url(pg_name))
    await db.pg_one(PgStatement("SELECT 1 AS one"), {})
    await db.close()
    with pytest.raises(DatabaseClosed):
        await db.pg_one(PgStatement("SELECT 1 AS one"), {})
    assert await connections_left(pg_name) == 0  # no pool was opened again
