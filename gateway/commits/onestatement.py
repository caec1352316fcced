"""The protocol's database steps as one statement each: a commit's read, and on
PostgreSQL a commit's two writes and a proposal's insert.

A commit writes twice: the reservation (claim the key, `verified → executing`, ledger
`commit_started`) and the record (the outcome, the key's stored answer, ledger
`committed` | `failed` | `unknown`). `execute.py` does each in a transaction of several
statements, which on PostgreSQL costs five round trips and most of a commit's CPU. Here
each is one statement of data-modifying CTEs, run as its own transaction: one round trip.

The reservation locks the intent row first (`FOR UPDATE`, as the general path does), so
every reservation takes its locks in one order (intent, key, ledger head) and cannot
deadlock with another. Each part feeds the next through RETURNING, so the statement
either does all of it or changes nothing: then the caller runs the general path, which
knows every other case (a held key, an intent executing elsewhere, approval, memory).

Only for intents without memory (`depends_on`, `memory_writes`): memory's hooks run in
the general path's transaction.

Before either write, `read` fetches the intent, the caller's key and the task goal's
revision (for the envelope's `goal_revision` check) in one SELECT, on any database
(verification uses it too). `propose` inserts an intent and ledgers `proposed` at once.
SQL here must not put a quote inside a comment: `PgStatement` skips quoted literals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Integer, and_, bindparam, func, select

from gateway import ledger
from gateway.commits import batched
from gateway.idempotency import DONE, PENDING, KeyRef, StoredResponse
from gateway.memory.names import GOALS
from gateway.storage import Database
from gateway.storage.db import PgStatement
from gateway.storage.models import IdempotencyRecord, Intent, MemoryRevision

_RESERVE = PgStatement(
    ledger.pg_append_sql(
        """
    WITH target AS (
        SELECT intent_id FROM intents
        WHERE intent_id = :intent_id AND status IN ('verified', 'approved')
          AND EXISTS (SELECT 1 FROM ledger_head WHERE id = 1)
        FOR UPDATE
    ), claimed AS (
        INSERT INTO idempotency_keys AS k (scope, key, fingerprint, intent_id, state, owner,
                                           created_at, expires_at)
        SELECT :scope, :key, :fingerprint, target.intent_id, :pending, :executor,
               CAST(:at AS timestamptz), CAST(:expires_at AS timestamptz)
        FROM target
        ON CONFLICT (scope, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, intent_id = EXCLUDED.intent_id, state = EXCLUDED.state,
            owner = EXCLUDED.owner, response_status = NULL, response_body = NULL,
            response_headers = NULL, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
        WHERE k.expires_at <= :at
        RETURNING k.intent_id
    ), started AS (
        UPDATE intents
        SET status = 'executing', executor = :executor, executing_since = :at,
            committer = CAST(:committer AS json), updated_at = :at
        WHERE intent_id IN (SELECT intent_id FROM claimed) AND status IN ('verified', 'approved')
        RETURNING intent_id
    ),""",
        when="AND EXISTS (SELECT 1 FROM started)",
    )
)

_RECORD = PgStatement(
    ledger.pg_append_sql(
        """
    WITH recorded AS (
        UPDATE intents
        SET status = :status, result_status = :result_status, result_body = :result_body,
            result_content_type = :result_content_type, updated_at = :at
        WHERE intent_id = :intent_id AND executor = :executor AND status IN ('executing', 'unknown')
          AND EXISTS (SELECT 1 FROM ledger_head WHERE id = 1)
        RETURNING intent_id
    ), answered AS (
        -- Referring to `recorded` runs it first: the intent row is locked before the key row.
        UPDATE idempotency_keys
        SET state = :done, response_status = :result_status, response_body = :result_body,
            response_headers = CAST(:response_headers AS json)
        WHERE scope = :scope AND key = :key AND (SELECT count(*) FROM recorded) >= 0
        RETURNING key
    ),""",
        # And referring to `answered` takes the key's lock before the ledger head's.
        when="AND EXISTS (SELECT 1 FROM recorded) AND (SELECT count(*) FROM answered) >= 0",
    )
)


def applies(db: Database, intent: Intent) -> bool:
    return db.dialect == "postgresql" and not intent.depends_on and not intent.memory_writes


async def reserve(
    db: Database,
    intent: Intent,
    ref: KeyRef,
    *,
    executor: str,
    ttl: int,
    committer: dict[str, Any],
    started: ledger.NewEntry,
) -> ledger.NewEntry | None:
    """Claim the key, start the intent and ledger `started`; None when nothing was changed.

    Concurrent reservations on this database run as one statement (`batched`)."""
    params = ledger.pg_params(started)
    if params is None:
        return None
    at = started.at  # the entry's time is hashed: every timestamp of the step is that one
    values = {
        "intent_id": intent.intent_id,
        "scope": ref.scope,
        "key": ref.key,
        "fingerprint": ref.fingerprint,
        "executor": executor,
        "at": at,
        "expires_at": at + timedelta(seconds=ttl),
        "committer": json.dumps(committer),
    }
    return await batched.batcher(db, "reserve", _reserve_one).submit(batched.Call(values, started, params))


async def _reserve_one(db: Database, call: batched.Call) -> ledger.NewEntry | None:
    row = await db.pg_one(_RESERVE, {**call.entry_params, **call.values, "pending": PENDING})
    return None if row is None else ledger.pg_appended(call.entry, call.entry_params, row)


async def record(
    db: Database,
    intent: Intent,
    ref: KeyRef | None,
    response: StoredResponse,
    *,
    status: str,
    executor: str,
    outcome: ledger.NewEntry,
) -> ledger.NewEntry | None:
    """Store the outcome on the intent and the key, ledger `outcome`.

    The ledger entry when it was appended; None when the intent was not changed (it is
    no longer this executor's, or the ledger head is missing): then the general path
    decides, as when the entry cannot be appended in one statement. Concurrent records
    on this database run as one statement (`batched`).
    """
    params = ledger.pg_params(outcome)
    if params is None:
        return None
    values = {
        "intent_id": intent.intent_id,
        "status": status,
        "result_status": response.status,
        "result_body": response.body,
        "result_content_type": response.headers.get("content-type"),
        "executor": executor,
        "at": outcome.at,
        "response_headers": json.dumps(response.headers),
        # No key (an approved commit): the key update matches no row.
        "scope": ref.scope if ref is not None else "",
        "key": ref.key if ref is not None else "",
    }
    return await batched.batcher(db, "record", _record_one).submit(batched.Call(values, outcome, params))


async def _record_one(db: Database, call: batched.Call) -> ledger.NewEntry | None:
    row = await db.pg_one(_RECORD, {**call.entry_params, **call.values, "done": DONE})
    return None if row is None else ledger.pg_appended(call.entry, call.entry_params, row)


@dataclass(frozen=True)
class Snapshot:
    """What a commit reads before deciding: the intent, the caller's key, the task's goal."""

    intent: Intent
    record: IdempotencyRecord | None
    goal_revision: int | None


_INTENTS, _KEYS = Intent.__table__, IdempotencyRecord.__table__
_GOAL = (
    select(func.max(MemoryRevision.revision))
    .where(MemoryRevision.namespace == GOALS, MemoryRevision.key == _INTENTS.c.task_id)
    .scalar_subquery()
)
_READ = (
    select(
        *(column.label("i_" + column.name) for column in _INTENTS.c),
        *(column.label("k_" + column.name) for column in _KEYS.c),
        _GOAL.label("goal_revision"),
    )
    .select_from(
        _INTENTS.outerjoin(_KEYS, and_(_KEYS.c.scope == bindparam("scope"), _KEYS.c.key == bindparam("key")))
    )
    .where(_INTENTS.c.intent_id == bindparam("intent_id"))
)


async def read(db: Database, intent_id: str, ref: KeyRef | None = None) -> Snapshot | None:
    """One read (any database); None when there is no such intent. No `ref`: no key."""
    scope, key = (ref.scope, ref.key) if ref is not None else ("", "")
    values = await db.first(_READ, {"intent_id": intent_id, "scope": scope, "key": key})
    if values is None:
        return None
    intent = Intent(**{column.key: values["i_" + column.name] for column in _INTENTS.c})
    record = None
    if values["k_scope"] is not None:
        record = IdempotencyRecord(**{column.key: values["k_" + column.name] for column in _KEYS.c})
    goal = values["goal_revision"]
    return Snapshot(intent, record, int(goal) if goal else None)


def _intent_value(column: Column[Any]) -> str:
    """The SQL for one intent column's parameter, typed for asyncpg."""
    name = ":i_" + column.name
    if isinstance(column.type, JSON):
        return f"CAST({name} AS json)"
    if isinstance(column.type, DateTime):
        return f"CAST({name} AS timestamptz)"
    if isinstance(column.type, Integer):
        return f"CAST({name} AS integer)"
    return name


_PROPOSE = PgStatement(
    ledger.pg_append_sql(
        "WITH created AS ("  # noqa: S608 - the names are our own table's columns; values are bound
        f" INSERT INTO intents ({', '.join(column.name for column in _INTENTS.c)})"
        f" SELECT {', '.join(_intent_value(column) for column in _INTENTS.c)}"
        " WHERE EXISTS (SELECT 1 FROM ledger_head WHERE id = 1)"
        " ON CONFLICT (intent_id) DO NOTHING RETURNING intent_id),",
        when="AND EXISTS (SELECT 1 FROM created)",
    )
)


async def propose(db: Database, intent: Intent, proposed: ledger.NewEntry) -> ledger.NewEntry | None:
    """Insert a new intent and ledger `proposed`, on PostgreSQL.

    The entry when the intent is new; None when nothing changed (it existed already, or
    the ledger head is missing): then the general path decides.
    """
    params = ledger.pg_params(proposed)
    if params is None:
        return None
    for column in _INTENTS.c:
        value = getattr(intent, column.key)
        # SQLAlchemy's JSON type stores None as JSON null: the same here.
        params["i_" + column.name] = json.dumps(value) if isinstance(column.type, JSON) else value
    row = await db.pg_one(_PROPOSE, params)
    return None if row is None else ledger.pg_appended(proposed, params, row)
