"""Engine and sessions, and schema upgrades through Alembic."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event, text
from sqlalchemy.dialects.postgresql import asyncpg as postgresql_asyncpg
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql import ClauseElement, Select

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Any constant works: it only has to be the same in every replica.
_MIGRATION_LOCK = 7_143_020_011


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# Seconds a statement waits for a pooled connection before it fails (both pools).
POOL_TIMEOUT = 10.0


def create_engine(url: str, *, pool_size: int = 10, max_overflow: int = 10) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and ":memory:" not in path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 10})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # Small pools: several replicas share one server (PostgreSQL allows 100 connections by
    # default), and a 2-core gateway gains nothing from more concurrent transactions.
    # No pre-ping: it costs a round trip per checkout (measured: 14 % of a commit's time);
    # connections are recycled instead, and a dead one fails its request, not the next.
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=POOL_TIMEOUT, pool_recycle=1800
    )


class PgStatement:
    """SQL with `:name` parameters, turned into asyncpg's positional `$n` once."""

    # A quoted literal is matched first, so a colon inside one is left alone.
    _PARAMETER = re.compile(r"'[^']*'|(?<![:\w]):([A-Za-z_]\w*)")

    def __init__(self, sql: str) -> None:
        self.names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] is None:
                return match[0]
            if match[1] not in self.names:
                self.names.append(match[1])
            return f"${self.names.index(match[1]) + 1}"

        self.sql = self._PARAMETER.sub(number, sql)
        self.constants: dict[str, Any] = {}

    @classmethod
    def of(cls, statement: ClauseElement) -> PgStatement:
        """A SQLAlchemy Core statement, compiled for PostgreSQL once."""
        compiled = statement.compile(dialect=_PG_DIALECT)
        made = cls("")
        made.sql, made.names = str(compiled), list(compiled.positiontup or [])
        made.constants = {name: value for name, value in compiled.params.items() if value is not None}
        return made

    def arguments(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] if name in params else self.constants[name] for name in self.names]


_PG_DIALECT = postgresql_asyncpg.dialect()
# How long closing waits for statements still running before it drops their connections.
CLOSE_SECONDS = 10.0


async def _json_codec(connection: asyncpg.Connection) -> None:
    """`json` as SQLAlchemy's asyncpg dialect sets it up: text in, parsed values out."""
    await connection.set_type_codec(
        "json", encoder=str.encode, decoder=_json_loads, schema="pg_catalog", format="binary"
    )


def _json_loads(value: bytes) -> Any:
    return json.loads(value)


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """Only single statements run on the statement pool: no session state outlives one.

    asyncpg's default reset costs a round trip per return; a connection returned inside a
    transaction (a cancelled statement) is still rolled back by asyncpg first.
    """


class DatabaseClosed(RuntimeError):
    """A statement after `Database.close()`."""


class Database:
    def __init__(
        self, url: str, *, pool_size: int = 10, max_overflow: int = 10, statement_pool_size: int = 10
    ) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        self.statement_pool_size = statement_pool_size
        self._statements: asyncpg.Pool | None = None
        self._statements_opening = asyncio.Lock()
        self._closed = False
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # Reads outside a transaction: no BEGIN / ROLLBACK round trips around one SELECT.
        # SQLite's driver begins one only before a write, so
        # there the plain engine already does it, and switching the isolation level costs
        # three more hops to aiosqlite's thread (about 1 ms of CPU per read here).
        self._autocommit = (
            self.engine
            if self.dialect == "sqlite"
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._readers = async_sessionmaker(self._autocommit, expire_on_commit=False)
        self._sqlite_writer = asyncio.Lock()
        self._compiled: dict[Select[Any], PgStatement] = {}

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        if self.dialect == "sqlite":
            # SQLite has one writer; taking turns here avoids deferred-transaction
            # upgrade deadlocks (SQLITE_BUSY that busy_timeout cannot resolve).
            async with self._sqlite_writer:
                async with self.sessions() as session, session.begin():
                    yield session
            return
        async with self.sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only, each statement on its own (autocommit)."""
        async with self._readers() as session:
            yield session

    async def first(self, statement: Select[Any], params: dict[str, Any]) -> Mapping[str, Any] | None:
        """The first row of a read, by column name: on PostgreSQL straight from the driver."""
        if self.dialect == "postgresql":
            compiled = self._compiled.get(statement)
            if compiled is None:
                compiled = self._compiled[statement] = PgStatement.of(statement)
            row = await self.pg_one(compiled, params)
            return None if row is None else dict(row.items())
        async with self._autocommit.connect() as connection:
            found = (await connection.execute(statement, params)).first()
            return None if found is None else dict(found._mapping)

    async def pg_one(self, statement: PgStatement, params: dict[str, Any]) -> Any:
        """Run one PostgreSQL statement as its own transaction on the driver (asyncpg) itself.

        One round trip, on a connection of the statement pool (`db_statement_pool_size`), without
        SQLAlchemy's per-statement and per-checkout work: through the engine's pool, checkout
        and return cost three times the driver's own work for the statement. Returns the
        first row (an asyncpg Record) or None.
        """
        pool = self._statements or await self._open_statements()
        # The driver runs a statement outside any transaction as its own.
        async with pool.acquire(timeout=POOL_TIMEOUT) as connection:
            return await connection.fetchrow(statement.sql, *statement.arguments(params))

    async def pg_all(self, statement: PgStatement, params: dict[str, Any]) -> list[Any]:
        """As `pg_one`, but every row (asyncpg Records)."""
        pool = self._statements or await self._open_statements()
        async with pool.acquire(timeout=POOL_TIMEOUT) as connection:
            return await connection.fetch(statement.sql, *statement.arguments(params))

    async def _open_statements(self) -> asyncpg.Pool:
        async with self._statements_opening:
            if self._closed:  # never a new pool that nothing would close
                raise DatabaseClosed("the database connections are closed (the gateway is stopping)")
            if self._statements is None:
                args, options = self.engine.dialect.create_connect_args(self.engine.url)
                # The URL's options as SQLAlchemy hands them to asyncpg.connect; this one is
                # SQLAlchemy's own name for asyncpg's statement cache size.
                cache = int(options.pop("prepared_statement_cache_size", 100))
                self._statements = await asyncpg.create_pool(
                    *args,
                    min_size=0,
                    max_size=self.statement_pool_size,
                    statement_cache_size=cache,
                    init=_json_codec,
                    reset=_nothing_to_reset,
                    **options,
                )
            return self._statements

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def close(self) -> None:
        self._closed = True
        pool, self._statements = self._statements, None
        if pool is not None:
            try:  # close() waits for every statement in flight to come back
                await asyncio.wait_for(pool.close(), CLOSE_SECONDS)
            except TimeoutError:
                pool.terminate()
        await self.engine.dispose()


def _alembic_config(connection: Connection) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Several replicas may start at once; one migrates, the others wait.
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
    command.upgrade(_alembic_config(connection), "head")


async def upgrade_database(url: str) -> None:
    async with _sqlite_migration_lock(url):
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(_upgrade)
        finally:
            await engine.dispose()


@asynccontextmanager
async def _sqlite_migration_lock(url: str) -> AsyncIterator[None]:
    """Processes starting at once on one SQLite file migrate in turn (PostgreSQL: an advisory lock).

    Without it, two of them could both see an empty file and both create the tables."""
    path = url.split("///", 1)[-1] if url.startswith("sqlite") else ""
    if not path or ":memory:" in path:
        yield
        return
    lock_path = Path(path + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = await asyncio.to_thread(os.open, lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
