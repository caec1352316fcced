"""Concurrent commits' one-statement steps run as one statement (gateway/commits/batched.py),
on the local PostgreSQL: each call gets what its own one-row statement would have given,
the ledger chains every entry of a batch, and a batch that fails changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, text

from gateway import ledger
from gateway.commits import batched, onestatement
from gateway.idempotency import DONE, PENDING, KeyRef, StoredResponse
from gateway.storage import Database
from gateway.storage.models import IdempotencyRecord, Intent, LedgerEntry
from tests.conftest import PG_ADMIN_DSN, create_pg_database, drop_pg_database

pytestmark = pytest.mark.postgres

EXECUTOR = "gw-batch-test"


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    name = await create_pg_database(migrated=True)
    database = Database(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}")
    try:
        await ledger.ensure_head(database)
        yield database
    finally:
        await database.close()
        await drop_pg_database(name)


@pytest.fixture
def statements(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch statement run (one-row statements are not counted)."""
    sizes: list[int] = []
    run_all = db.pg_all

    async def counted(statement: Any, params: dict[str, Any]) -> list[Any]:
        sizes.append(len(params["intent_ids"]))
        return await run_all(statement, params)

    monkeypatch.setattr(db, "pg_all", counted)
    return sizes


async def add_intents(db: Database, count: int, status: str = "verified", prefix: str = "in") -> list[Intent]:
    at = datetime.now(UTC)
    intents = [
        Intent(
            intent_id=f"{prefix}_{number:04d}",
            task_id="task-batch",
            tool="email.notify",
            arguments={"n": number},
            status=status,
            proposer={"sub": "planner-1", "role": "planner"},
            created_at=at,
            updated_at=at,
        )
        for number in range(count)
    ]
    async with db.transaction() as session:
        session.add_all(intents)
    return intents


def ref(name: str) -> KeyRef:
    return KeyRef(scope="committer-1", key=name, fingerprint="fp-" + name)


async def reserve(db: Database, intent: Intent, key: KeyRef) -> ledger.NewEntry | None:
    started = ledger.new_entry(event="commit_started", intent_id=intent.intent_id, task_id=intent.task_id)
    return await onestatement.reserve(
        db, intent, key, executor=EXECUTOR, ttl=3600, committer={"sub": "c"}, started=started
    )


async def record(db: Database, intent: Intent, key: KeyRef | None) -> ledger.NewEntry | None:
    outcome = ledger.new_entry(event="committed", intent_id=intent.intent_id, task_id=intent.task_id)
    response = StoredResponse(200, f'{{"done": "{intent.intent_id}"}}', {"content-type": "application/json"})
    return await onestatement.record(
        db, intent, key, response, status="committed", executor=EXECUTOR, outcome=outcome
    )


async def rows(db: Database) -> tuple[dict[str, Intent], dict[str, IdempotencyRecord], list[LedgerEntry]]:
    async with db.reading() as session:
        intents = {row.intent_id: row for row in (await session.execute(select(Intent))).scalars()}
        keys = {row.key: row for row in (await session.execute(select(IdempotencyRecord))).scalars()}
        entries = list((await session.execute(select(LedgerEntry).order_by(LedgerEntry.seq))).scalars())
    return intents, keys, entries


async def assert_no_deadlock_in(db: Database) -> None:
    """Closes `db`: its backends leave, and report their counters as they do."""
    await db.close()
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        name = db.url.rsplit("/", 1)[1]
        deadlocks = await admin.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = $1", name)
    finally:
        await admin.close()
    assert deadlocks == 0


async def test_concurrent_reservations_and_records_run_as_few_statements_and_chain_every_entry(
    db: Database, statements: list[int]
) -> None:
    intents = await add_intents(db, 12)
    started = await asyncio.gather(*(reserve(db, intent, ref(intent.intent_id)) for intent in intents))
    assert all(entry is not None for entry in started)
    assert statements and max(statements) > 1  # the calls that waited went together
    stored, keys, _ = await rows(db)
    assert {row.status for row in stored.values()} == {"executing"}
    assert {row.executor for row in stored.values()} == {EXECUTOR}
    assert {key.state for key in keys.values()} == {PENDING}
    assert {key.intent_id for key in keys.values()} == {intent.intent_id for intent in intents}

    statements.clear()
    outcomes = await asyncio.gather(*(record(db, intent, ref(intent.intent_id)) for intent in intents))
    assert all(entry is not None for entry in outcomes)
    assert statements and max(statements) > 1
    stored, keys, entries = await rows(db)
    assert {row.status for row in stored.values()} == {"committed"}
    assert {key.state for key in keys.values()} == {DONE}
    assert all(keys[iid].response_body == f'{{"done": "{iid}"}}' for iid in keys)
    # One entry per step, each returned to its own caller, and the chain is whole.
    assert [entry.seq for entry in entries] == list(range(1, 25))
    returned = {(entry.intent_id, entry.event): entry.hash for entry in [*started, *outcomes] if entry}
    assert returned == {(entry.intent_id, entry.event): entry.hash for entry in entries}
    report = await ledger.verify(db)
    assert report.ok, report


async def test_a_batch_does_for_each_row_what_the_row_alone_would(db: Database) -> None:
    """Rows that cannot go change nothing and get None; the others go, in the same batch."""
    ready = await add_intents(db, 4)
    proposed = await add_intents(db, 2, status="proposed", prefix="pr")
    held = await add_intents(db, 1, prefix="held")
    # A live key of another intent: claiming it again is not this step's to do.
    assert await reserve(db, held[0], ref("shared")) is not None
    results = await asyncio.gather(
        *(reserve(db, intent, ref(intent.intent_id)) for intent in ready),
        *(reserve(db, intent, ref(intent.intent_id)) for intent in proposed),
        reserve(db, ready[0], ref("second-key-same-intent")),
        reserve(db, (await add_intents(db, 1, prefix="other"))[0], ref("shared")),
    )
    assert [result is not None for result in results] == [True] * 4 + [False] * 4
    stored, keys, entries = await rows(db)
    assert {stored[intent.intent_id].status for intent in ready} == {"executing"}
    assert {stored[intent.intent_id].status for intent in proposed} == {"proposed"}
    assert stored["other_0000"].status == "verified"
    assert keys["shared"].intent_id == "held_0000"
    assert "second-key-same-intent" not in keys
    assert not {intent.intent_id for intent in proposed} & set(keys)
    assert len(entries) == 5  # held's reservation and the four ready ones
    assert (await ledger.verify(db)).ok


async def test_a_record_for_an_intent_no_longer_this_executors_appends_nothing(db: Database) -> None:
    intents = await add_intents(db, 3)
    await asyncio.gather(*(reserve(db, intent, ref(intent.intent_id)) for intent in intents))
    async with db.transaction() as session:
        await session.execute(
            text("UPDATE intents SET executor = 'someone-else' WHERE intent_id = :iid"),
            {"iid": intents[1].intent_id},
        )
    results = await asyncio.gather(*(record(db, intent, ref(intent.intent_id)) for intent in intents))
    assert [result is not None for result in results] == [True, False, True]
    stored, keys, entries = await rows(db)
    assert stored[intents[1].intent_id].status == "executing"
    # As the one-row statement does: the key gets its answer either way.
    assert {key.state for key in keys.values()} == {DONE}
    assert [entry.event for entry in entries].count("committed") == 2
    assert (await ledger.verify(db)).ok


async def test_a_batch_the_server_rejects_changes_nothing_and_every_caller_gets_none(
    db: Database, statements: list[int]
) -> None:
    """One row too long for its column fails the whole statement; each caller then decides
    on the general path, as when the one-row statement changes nothing."""
    intents = await add_intents(db, 5)
    calls = [reserve(db, intent, ref(intent.intent_id)) for intent in intents[:4]]
    calls.append(reserve(db, intents[4], ref("k" * 300)))  # the key column holds 255
    first = asyncio.ensure_future(reserve(db, (await add_intents(db, 1, prefix="lead"))[0], ref("lead")))
    await asyncio.sleep(0)  # the lead call goes alone; the five wait for it and go together
    results = await asyncio.gather(*calls)
    assert await first is not None
    assert results == [None] * 5
    assert statements == [5]
    stored, keys, entries = await rows(db)
    assert {stored[intent.intent_id].status for intent in intents} == {"verified"}
    assert set(keys) == {"lead"} and len(entries) == 1


async def test_racing_batches_of_two_gateways_over_the_same_intents_never_deadlock(db: Database) -> None:
    """Two databases stand for two gateway processes; their batches lock the same rows in
    the same order. Each intent is reserved by exactly one call, whatever the interleaving."""
    other = Database(db.url)
    try:
        intents = await add_intents(db, 30)
        calls = []
        for round_ in range(3):
            for number, intent in enumerate(reversed(intents) if round_ % 2 else intents):
                target = db if (number + round_) % 2 else other
                calls.append(reserve(target, intent, ref(f"{intent.intent_id}-{round_}")))
        results = await asyncio.gather(*calls)
        winners: dict[str, int] = {}
        for result in results:
            if result is not None:
                winners[str(result.intent_id)] = winners.get(str(result.intent_id), 0) + 1
        assert winners == {intent.intent_id: 1 for intent in intents}
        assert (await ledger.verify(db)).ok
    finally:
        await other.close()
    await assert_no_deadlock_in(db)


async def test_a_call_whose_caller_is_gone_before_its_batch_runs_is_left_out(
    db: Database, statements: list[int]
) -> None:
    intents = await add_intents(db, 4)
    lead = asyncio.ensure_future(reserve(db, intents[0], ref("lead")))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(reserve(db, intent, ref(intent.intent_id))) for intent in intents[1:]]
    await asyncio.sleep(0)
    waiting[0].cancel()
    assert await lead is not None
    assert all([await call is not None for call in waiting[1:]])
    assert statements == [2]
    stored, _, _ = await rows(db)
    assert stored[intents[1].intent_id].status == "verified"


def test_an_entry_the_database_chained_wrongly_is_refused() -> None:
    entries = [ledger.new_entry(event="committed", intent_id=f"i{n}") for n in range(2)]
    params = [ledger.pg_params(entry) for entry in entries]
    assert all(params)
    first = ledger.chain_hash(dataclasses.replace(entries[0], seq=1), ledger.GENESIS)
    second = ledger.chain_hash(dataclasses.replace(entries[1], seq=2), first)
    good = [("i0", 1, ledger.GENESIS, first), ("i1", 2, first, second)]
    appended = ledger.pg_appended_many(entries, params, good)  # type: ignore[arg-type]
    assert [appended["i0"].seq, appended["i1"].seq] == [1, 2]
    unchained = [("i0", 1, ledger.GENESIS, first), ("i1", 3, first, second)]
    with pytest.raises(ledger.LedgerError):
        ledger.pg_appended_many(entries, params, unchained)  # type: ignore[arg-type]
    with pytest.raises(ledger.LedgerError):
        ledger.pg_appended_many(entries, params, [("i0", 1, ledger.GENESIS, second)])  # type: ignore[arg-type]


async def test_no_batch_holds_more_calls_than_the_limit(
    db: Database, statements: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batched, "BATCH_LIMIT", 3)
    intents = await add_intents(db, 10)
    results = await asyncio.gather(*(reserve(db, intent, ref(intent.intent_id)) for intent in intents))
    assert all(result is not None for result in results)
    assert statements and max(statements) == 3


async def waiting_for_locks(name: str) -> int:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        return int(
            await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'", name
            )
        )
    finally:
        await admin.close()


def reservations(*pairs: tuple[Intent, str]) -> list[batched.Call]:
    """Reservation calls as `onestatement.reserve` makes them: (intent, key) each."""
    made = []
    for intent, key in pairs:
        entry = ledger.new_entry(event="commit_started", intent_id=intent.intent_id)
        params = ledger.pg_params(entry)
        assert params is not None
        values = {
            "intent_id": intent.intent_id,
            "scope": ref(key).scope,
            "key": key,
            "fingerprint": ref(key).fingerprint,
            "executor": EXECUTOR,
            "at": entry.at,
            "expires_at": entry.at + timedelta(hours=1),
            "committer": "{}",
        }
        made.append(batched.Call(values, entry, params))
    return made


async def race_behind_a_lock(
    db: Database, lock: str, argument: str, first: list[batched.Call], second: list[batched.Call]
) -> list[list[ledger.NewEntry | None]]:
    """A transaction holds a row (`lock`, a SELECT ... FOR UPDATE); batch `first` (on a second
    database, as another gateway) starts and waits for the row, then batch `second` starts
    and waits too; then the row is let go. Fails if PostgreSQL saw a deadlock."""
    name = db.url.rsplit("/", 1)[1]
    other = Database(db.url)

    async def run(database: Database, batch: list[batched.Call]) -> list[ledger.NewEntry | None]:
        statement, columns = batched._RESERVE, batched._RESERVE_INPUT
        return await batched._run_many(database, statement, columns, batch, pending=PENDING)

    try:
        holder = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
        try:
            holding = holder.transaction()
            await holding.start()
            await holder.execute(lock, argument)
            one = asyncio.ensure_future(run(other, first))
            for _ in range(250):
                if await waiting_for_locks(name) >= 1:
                    break
                await asyncio.sleep(0.02)
            assert not one.done(), "the first batch did not wait for the locked row"
            two = asyncio.ensure_future(run(db, second))
            for _ in range(25):  # it waits too, unless it got through
                if await waiting_for_locks(name) >= 2 or two.done():
                    break
                await asyncio.sleep(0.02)
            await holding.rollback()
            results = list(await asyncio.gather(one, two))
        finally:
            await holder.close()
    finally:
        await other.close()
    await assert_no_deadlock_in(db)
    return results


async def test_batches_lock_intents_in_id_order_whatever_order_their_calls_came_in(db: Database) -> None:
    """Locking in arrival order, batch B [X, Y] would wait for X, batch A [Y, X] would lock Y
    and wait for X behind B, and once X is free B would wait for Y: a deadlock. In id order,
    A waits for X holding nothing, and each intent is reserved once."""
    x, y = await add_intents(db, 2)
    results = await race_behind_a_lock(
        db,
        "SELECT 1 FROM intents WHERE intent_id = $1 FOR UPDATE",
        x.intent_id,
        reservations((x, "b-x"), (y, "b-y")),
        reservations((y, "a-y"), (x, "a-x")),
    )
    reserved = [entry for batch in results for entry in batch if entry is not None]
    assert sorted(str(entry.intent_id) for entry in reserved) == [x.intent_id, y.intent_id]


async def test_batches_claim_keys_in_key_order_whatever_order_their_intents_came_in(db: Database) -> None:
    """The same for keys: two live keys K1 and K2 of other intents; batch B claims K1 then
    K2, batch A holds intents whose keys come as K2, K1. A claim of a live key locks it and
    changes nothing, so each call gets None, and neither batch waits for the other in a circle."""
    holders = await add_intents(db, 2, prefix="holder")
    for intent, key in zip(holders, ("K1", "K2"), strict=True):
        assert await reserve(db, intent, ref(key)) is not None
    i1, i2, i3, i4 = await add_intents(db, 4)
    results = await race_behind_a_lock(
        db,
        "SELECT 1 FROM idempotency_keys WHERE key = $1 FOR UPDATE",
        "K1",
        reservations((i1, "K1"), (i2, "K2")),
        reservations((i3, "K2"), (i4, "K1")),
    )
    assert results == [[None, None], [None, None]]


async def test_a_call_waiting_for_a_row_lock_does_not_hold_up_the_calls_behind_it(db: Database) -> None:
    """Before its stall bound, one call waiting for a locked intent held up every later
    reservation of the gateway, whatever their intents."""
    x, y = await add_intents(db, 2)
    holder, holding = await hold(db, x)
    try:
        blocked = asyncio.ensure_future(reserve(db, x, ref("x")))
        await asyncio.sleep(0.02)
        free = await asyncio.wait_for(reserve(db, y, ref("y")), 2)  # the lock is held for longer
        assert free is not None
        assert not blocked.done()
        await holding.rollback()
        assert await asyncio.wait_for(blocked, 5) is not None
    finally:
        await holder.close()


async def test_only_an_error_of_the_statement_itself_counts_as_nothing_changed(db: Database) -> None:
    name = db.url.rsplit("/", 1)[1]
    connection = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        with pytest.raises(asyncpg.PostgresError) as statement_error:
            await connection.fetchval("SELECT 1 / 0")
        assert batched.rolled_back(statement_error.value)
        pid = await connection.fetchval("SELECT pg_backend_pid()")
        sleeping = asyncio.ensure_future(connection.fetchval("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.2)
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        with pytest.raises(Exception) as ended:  # noqa: PT011 - FATAL or a lost connection
            await asyncio.wait_for(sleeping, 5)
        assert not batched.rolled_back(ended.value)  # after a FATAL, the COMMIT may have happened
    finally:
        connection.terminate()


async def test_a_database_that_is_dropped_is_freed_with_its_batchers() -> None:
    import gc
    import weakref

    name = await create_pg_database(migrated=True)
    try:
        database = Database(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}")
        await ledger.ensure_head(database)
        (intent,) = await add_intents(database, 1)
        assert await reserve(database, intent, ref("k")) is not None
        await database.close()
        gone = weakref.ref(database)
        del database
        gc.collect()
        assert gone() is None
    finally:
        await drop_pg_database(name)


async def hold(db: Database, *intents: Intent) -> tuple[asyncpg.Connection, Any]:
    """A transaction of another client that holds these intents' rows."""
    holder = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{db.url.rsplit('/', 1)[1]}")
    holding = holder.transaction()
    await holding.start()
    for intent in intents:
        await holder.execute("SELECT 1 FROM intents WHERE intent_id = $1 FOR UPDATE", intent.intent_id)
    return holder, holding


async def test_the_next_batch_leaves_out_the_intents_of_a_stalled_one(db: Database) -> None:
    """A second call for the stalled intent would make the whole next batch wait for it."""
    x, y = await add_intents(db, 2)
    holder, holding = await hold(db, x)
    try:
        first = asyncio.ensure_future(reserve(db, x, ref("x-1")))
        await asyncio.sleep(0.2)  # longer than the stall bound
        second = asyncio.ensure_future(reserve(db, x, ref("x-2")))
        assert await asyncio.wait_for(reserve(db, y, ref("y")), 2) is not None
        assert not first.done() and not second.done()
        await holding.rollback()
        assert await first is not None
        assert await second is None  # x is executing by then
    finally:
        await holder.close()


async def test_stalled_batches_do_not_take_more_than_their_share_of_connections(db: Database) -> None:
    x, y, z = await add_intents(db, 3)
    holder, holding = await hold(db, x, y)
    try:
        stalled = [asyncio.ensure_future(reserve(db, x, ref("x")))]
        await asyncio.sleep(0.2)
        stalled.append(asyncio.ensure_future(reserve(db, y, ref("y"))))
        await asyncio.sleep(0.2)
        third = asyncio.ensure_future(reserve(db, z, ref("z")))
        await asyncio.sleep(0.5)
        assert batched.MAX_RUNNING == 2
        assert not third.done()  # it waits for one of the two
        await holding.rollback()
        assert all([await call is not None for call in [*stalled, third]])
    finally:
        await holder.close()


async def test_a_lone_call_the_server_rejects_changes_nothing_and_gets_none(db: Database) -> None:
    (intent,) = await add_intents(db, 1)
    assert await reserve(db, intent, ref("k" * 300)) is None  # the key column holds 255
    stored, keys, entries = await rows(db)
    assert stored[intent.intent_id].status == "verified" and not keys and not entries
