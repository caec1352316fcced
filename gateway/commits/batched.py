"""The one-statement steps of concurrent commits, run together: one statement, one
transaction, one WAL flush and one hold of the ledger head for the whole batch.

Each of a commit's two writes (`onestatement.reserve` and `onestatement.record`) goes
through a `Batcher`, one per step and database. While its statement runs, the calls that
arrive wait; then they go together, as one statement of `unnest`ed arrays. A call that
finds nothing running goes at once, alone, as the one-row statement of `onestatement`:
batches form only under load, and add no wait. A batch that waits for a row lock longer
than `STALL_SECONDS` no longer holds up the calls behind it (up to `MAX_RUNNING`
batches run at once).

A batch statement does for each of its rows what the one-row statement does, and leaves
a row it cannot do unchanged (the caller gets None and runs the general path), as the
one-row statement would. A batch never holds two calls for one intent or one key: the
later call waits for the next batch. Locks are taken in one order, as by every other
writer: the batch's intents first (sorted by id), then their keys (sorted), then the
ledger head, in the function `ledger_append_many` (migration 0002), which chains the
entries in input order. Batches therefore cannot deadlock with each other or with the
one-row and general paths, which lock one intent, then its key, then the head. The
purges of expired keys delete many keys in their own order and can: PostgreSQL then
aborts one side. An error the server reports for the statement (`rolled_back`) means
its transaction changed nothing, and every caller gets None, so each decides on the
general path.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from gateway import ledger
from gateway.idempotency import DONE, PENDING
from gateway.storage import Database
from gateway.storage.db import DatabaseClosed, PgStatement

# Rows per batch at most; the calls beyond it wait for the next batch.
BATCH_LIMIT = 32
# How long a batch may hold up the calls behind it (a batch runs in a few milliseconds,
# unless it waits for a row lock).
STALL_SECONDS = 0.05
# Batches of one step running at once, at most: a batch that stalls lets one more start,
# but batches stalled on the ledger head must not take every connection of the pool.
MAX_RUNNING = 2

_RESERVE_INPUT = (
    ("intent_id", "text"),
    ("scope", "text"),
    ("key", "text"),
    ("fingerprint", "text"),
    ("executor", "text"),
    ("at", "timestamptz"),
    ("expires_at", "timestamptz"),
    ("committer", "json"),
)
_RECORD_INPUT = (
    ("intent_id", "text"),
    ("status", "text"),
    ("result_status", "integer"),
    ("result_body", "text"),
    ("result_content_type", "text"),
    ("executor", "text"),
    ("at", "timestamptz"),
    ("response_headers", "json"),
    ("scope", "text"),
    ("key", "text"),
)


def _input(columns: tuple[tuple[str, str], ...]) -> str:
    """CTE `input`: one row per call (`n`: its place in the batch), its step's columns and its entry's."""
    every = (*columns, *((f"entry_{name}", kind) for name, kind in ledger.PG_MANY_INPUT))
    arrays = ", ".join(f"CAST(:{name}s AS {kind}[])" for name, kind in every)
    names = ", ".join(name for name, _ in every)
    # The names and types are this module's constants; every value is a bound array.
    return f"WITH input AS (SELECT * FROM unnest({arrays}) WITH ORDINALITY AS m({names}, n)),"  # noqa: S608


# `onestatement._RESERVE`, for many rows. The sorts make each kind of lock go in order:
# every intent is locked (and read) before the first key is claimed.
_RESERVE = PgStatement(
    _input(_RESERVE_INPUT)  # noqa: S608 - no value is written into the SQL
    + """
    target AS (
        SELECT intents.intent_id FROM intents JOIN input AS m ON intents.intent_id = m.intent_id
        WHERE intents.status IN ('verified', 'approved') AND EXISTS (SELECT 1 FROM ledger_head WHERE id = 1)
        ORDER BY intents.intent_id
        FOR UPDATE OF intents
    ), claimed AS (
        INSERT INTO idempotency_keys AS k (scope, key, fingerprint, intent_id, state, owner,
                                           created_at, expires_at)
        SELECT m.scope, m.key, m.fingerprint, m.intent_id, :pending, m.executor, m.at, m.expires_at
        FROM input AS m
        WHERE m.intent_id IN (SELECT intent_id FROM target)
        ORDER BY m.scope, m.key
        ON CONFLICT (scope, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, intent_id = EXCLUDED.intent_id, state = EXCLUDED.state,
            owner = EXCLUDED.owner, response_status = NULL, response_body = NULL,
            response_headers = NULL, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
        WHERE k.expires_at <= EXCLUDED.created_at
        RETURNING k.intent_id
    ), started AS (
        UPDATE intents
        SET status = 'executing', executor = m.executor, executing_since = m.at,
            committer = m.committer, updated_at = m.at
        FROM input AS m
        WHERE intents.intent_id = m.intent_id AND intents.intent_id IN (SELECT intent_id FROM claimed)
          AND intents.status IN ('verified', 'approved')
        RETURNING m.n
    ), done AS (
        SELECT m.* FROM input AS m WHERE m.n IN (SELECT n FROM started)
    )"""
    + ledger.pg_many_sql("done")
)

# `onestatement._RECORD`, for many rows: every intent, then every key, then the head.
_RECORD = PgStatement(
    _input(_RECORD_INPUT)  # noqa: S608 - no value is written into the SQL
    + """
    owned AS (
        SELECT intents.intent_id FROM intents JOIN input AS m ON intents.intent_id = m.intent_id
        WHERE intents.executor = m.executor AND intents.status IN ('executing', 'unknown')
          AND EXISTS (SELECT 1 FROM ledger_head WHERE id = 1)
        ORDER BY intents.intent_id
        FOR UPDATE OF intents
    ), recorded AS (
        UPDATE intents
        SET status = m.status, result_status = m.result_status, result_body = m.result_body,
            result_content_type = m.result_content_type, updated_at = m.at
        FROM input AS m
        WHERE intents.intent_id = m.intent_id AND intents.intent_id IN (SELECT intent_id FROM owned)
          AND intents.executor = m.executor AND intents.status IN ('executing', 'unknown')
        RETURNING m.n
    ), keyed AS (
        -- The subquery on `recorded` runs first, once: every intent before the first key.
        SELECT k.scope, k.key FROM idempotency_keys AS k
        JOIN input AS m ON k.scope = m.scope AND k.key = m.key
        WHERE (SELECT count(*) FROM recorded) >= 0
        ORDER BY k.scope, k.key
        FOR UPDATE OF k
    ), answered AS (
        UPDATE idempotency_keys AS k
        SET state = :done, response_status = m.result_status, response_body = m.result_body,
            response_headers = m.response_headers
        FROM input AS m
        WHERE k.scope = m.scope AND k.key = m.key AND (k.scope, k.key) IN (SELECT scope, key FROM keyed)
        RETURNING m.n
    ), done AS (
        -- And every key before the ledger head.
        SELECT m.* FROM input AS m
        WHERE m.n IN (SELECT n FROM recorded) AND (SELECT count(*) FROM answered) >= 0
    )"""
    + ledger.pg_many_sql("done")
)


@dataclass(eq=False)
class Call:
    """One commit's step: its own columns, its ledger entry, and where its answer goes."""

    values: dict[str, Any]
    entry: ledger.NewEntry
    entry_params: dict[str, Any]
    future: asyncio.Future[ledger.NewEntry | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def intent_id(self) -> str:
        return str(self.values["intent_id"])

    @property
    def key(self) -> tuple[str, str] | None:
        scope, key = self.values["scope"], self.values["key"]
        return (scope, key) if scope or key else None


One = Callable[[Database, Call], Awaitable[ledger.NewEntry | None]]
Many = Callable[[Database, list[Call]], Awaitable[list[ledger.NewEntry | None]]]
# Told the step and the number of calls of every statement run (the gateway's metrics).
Observer = Callable[[str, int], None]
_observers: weakref.WeakKeyDictionary[Database, Observer] = weakref.WeakKeyDictionary()


def observe(db: Database, observer: Observer) -> None:
    """Report every statement the database's batchers run to `observer`."""
    _observers[db] = observer


def rolled_back(error: BaseException) -> bool:
    """An error the server reported for the statement itself: its transaction is rolled back.

    Not a FATAL (an administrator's shutdown, a crash elsewhere): that can come after the
    COMMIT, so what the statement did is unknown."""
    return isinstance(error, asyncpg.PostgresError) and getattr(error, "severity_en", None) == "ERROR"


class Batcher:
    """Runs one step's calls: alone when nothing runs, else together once the running batch ends.

    A batch that runs longer than `STALL_SECONDS` (it waits for a row another transaction
    holds) stops holding up the calls behind it: the next batch starts beside it, without
    the intents and keys of the batch still running, up to `MAX_RUNNING` batches.
    """

    def __init__(self, db: Database, step: str, one: One, many: Many) -> None:
        # Weak: the database's batchers are found by the database (`batcher`), and must not
        # keep it alive.
        self._db = weakref.ref(db)
        self.step = step
        self._one, self._many = one, many
        self._queue: deque[Call] = deque()
        self._draining: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        # The intents and keys of the batches running.
        self._busy_intents: set[str] = set()
        self._busy_keys: set[tuple[str, str]] = set()
        self._arrived = asyncio.Event()

    async def submit(self, call: Call) -> ledger.NewEntry | None:
        self._queue.append(call)
        self._arrived.set()
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return await call.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take() if len(self._running) < MAX_RUNNING else []
                if not batch:
                    if self._queue:  # what is left waits for a running batch, or a new call
                        await self._next_change()
                    continue
                running = self._start(batch)
                await asyncio.wait({running}, timeout=STALL_SECONDS)
        except asyncio.CancelledError:  # the loop is closing: nothing will run the calls left
            while self._queue:
                self._queue.popleft().future.cancel()
            raise
        finally:
            self._draining = None

    async def _next_change(self) -> None:
        self._arrived.clear()
        arrival = asyncio.ensure_future(self._arrived.wait())
        try:
            await asyncio.wait({*self._running, arrival}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrival.cancel()

    def _take(self) -> list[Call]:
        """The next batch: the first calls in line, at most one per intent and per key, and
        none for an intent or key of a batch still running (it would wait for that one)."""
        batch: list[Call] = []
        intents, keys = set(self._busy_intents), set(self._busy_keys)
        later: deque[Call] = deque()
        while self._queue:
            call = self._queue.popleft()
            if call.future.done():  # its caller is gone (cancelled) before it ran
                continue
            key = call.key
            if len(batch) >= BATCH_LIMIT or call.intent_id in intents or (key is not None and key in keys):
                later.append(call)
                continue
            batch.append(call)
            intents.add(call.intent_id)
            if key is not None:
                keys.add(key)
        self._queue = later
        return batch

    def _start(self, batch: list[Call]) -> asyncio.Task[None]:
        """Run the batch as a task; its intents and keys are busy until the task is done."""
        intents = {call.intent_id for call in batch}
        keys = {key for call in batch if (key := call.key) is not None}
        self._busy_intents |= intents
        self._busy_keys |= keys
        running = asyncio.ensure_future(self._run_batch(batch))
        self._running.add(running)

        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._busy_intents -= intents
            self._busy_keys -= keys

        running.add_done_callback(done)
        return running

    async def _run_batch(self, batch: list[Call]) -> None:
        results: list[ledger.NewEntry | None]
        try:
            db = self._db()
            if db is None:
                raise DatabaseClosed("the database is gone")
            observer = _observers.get(db)
            if observer is not None:
                observer(self.step, len(batch))
            if len(batch) == 1:
                results = [await self._one(db, batch[0])]
            else:
                results = await self._many(db, batch)
        except asyncio.CancelledError:
            for call in batch:
                call.future.cancel()
            raise
        except Exception as error:
            if rolled_back(error):
                # Nothing changed: each caller decides on the general path.
                results = [None] * len(batch)
            else:  # the outcome is unknown: each caller gets the error
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(error)
                return
        for call, result in zip(batch, results, strict=True):
            if not call.future.done():
                call.future.set_result(result)


def _arrays(columns: tuple[tuple[str, str], ...], calls: list[Call]) -> dict[str, list[Any]]:
    return {f"{name}s": [call.values[name] for call in calls] for name, _ in columns}


async def _run_many(
    db: Database,
    statement: PgStatement,
    columns: tuple[tuple[str, str], ...],
    calls: list[Call],
    **constants: Any,
) -> list[ledger.NewEntry | None]:
    params = {
        **_arrays(columns, calls),
        **ledger.pg_many_params([call.entry_params for call in calls]),
        **constants,
    }
    rows = await db.pg_all(statement, params)
    appended = ledger.pg_appended_many(
        [call.entry for call in calls], [call.entry_params for call in calls], rows
    )
    return [appended.get(call.intent_id) for call in calls]


async def _reserve_many(db: Database, calls: list[Call]) -> list[ledger.NewEntry | None]:
    return await _run_many(db, _RESERVE, _RESERVE_INPUT, calls, pending=PENDING)


async def _record_many(db: Database, calls: list[Call]) -> list[ledger.NewEntry | None]:
    return await _run_many(db, _RECORD, _RECORD_INPUT, calls, done=DONE)


_MANY: dict[str, Many] = {"reserve": _reserve_many, "record": _record_many}
_batchers: weakref.WeakKeyDictionary[Database, dict[str, Batcher]] = weakref.WeakKeyDictionary()


def batcher(db: Database, step: str, one: One) -> Batcher:
    """The database's batcher for `step` ("reserve" or "record"), made on first use."""
    steps = _batchers.setdefault(db, {})
    found = steps.get(step)
    if found is None:
        found = steps[step] = Batcher(db, step, one, _MANY[step])
    return found
