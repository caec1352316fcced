"""`Idempotency-Key` for commits and compensations (draft-ietf-httpapi-idempotency-key-header).

    missing header                         → 400 idempotency-key-missing
    not an sf-string / token, > 255 chars  → 400 idempotency-key-invalid
    same key, different intent or payload  → 422 idempotency-key-reused
    same key while the first is running    → 409 commit-in-progress
    same key after it finished             → the stored response, errors included

Keys are scoped by the caller (`iss` + `sub`): one agent cannot replay, or collide
with, another's. The primary key (scope, key) *is* the reservation: `claim` inserts
the row with ON CONFLICT DO NOTHING inside the caller's transaction, so of several
racing requests — in any number of gateway processes — exactly one gets the row.
Rows live at least `idempotency_ttl_seconds` (≥ 24 h) and are purged lazily.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from gateway import canonical
from gateway.problems import BadRequest, Conflict, Unprocessable
from gateway.storage import Database
from gateway.storage.models import IdempotencyRecord

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
_SF_STRING = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"$')
_BARE_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z:/]+$")

PENDING, AWAITING_APPROVAL, DONE = "pending", "awaiting_approval", "done"


class KeyMissing(BadRequest):
    name, title = "idempotency-key-missing", "Idempotency-Key header required"


class KeyInvalid(BadRequest):
    name, title = "idempotency-key-invalid", "Idempotency-Key header malformed"


class KeyReused(Unprocessable):
    name, title = "idempotency-key-reused", "Idempotency-Key already used for a different request"


class InProgress(Conflict):
    name, title = "commit-in-progress", "A request with this key or for this intent is still running"


def parse_key(header: str | None) -> str:
    """The key inside a structured-field string; a bare token is accepted too."""
    if header is None or not header.strip():
        raise KeyMissing(f"send an {HEADER} header (a quoted string, at most {MAX_KEY_LENGTH} characters)")
    value = header.strip()
    quoted = _SF_STRING.match(value)
    if quoted:
        key = re.sub(r"\\(.)", r"\1", quoted[1])
    elif _BARE_TOKEN.match(value):
        key = value
    else:
        raise KeyInvalid(f'{HEADER} must be a structured-field string such as "8e03978e-40d5"')
    if not key:
        raise KeyInvalid(f"{HEADER} must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise KeyInvalid(f"{HEADER} is longer than {MAX_KEY_LENGTH} characters")
    return key


def caller_scope(iss: str, sub: str) -> str:
    return hashlib.sha256(canonical.dumps([iss, sub])).hexdigest()


def fingerprint(target: str, body: bytes) -> str:
    """What the key is bound to: the target (intent or task) and the body, JSON canonicalized."""
    try:
        normalized = canonical.dumps(json.loads(body)) if body.strip() else b""
    except (ValueError, canonical.CanonicalizationError):
        normalized = body
    return hashlib.sha256(target.encode() + b"\n" + hashlib.sha256(normalized).digest()).hexdigest()


@dataclass(frozen=True)
class KeyRef:
    scope: str
    key: str
    fingerprint: str


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: str
    headers: dict[str, str]

    def to_response(self, *, replayed: bool = False, extra: dict[str, str] | None = None) -> Response:
        headers = {**self.headers, **(extra or {})}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return Response(self.body, status_code=self.status, headers=headers)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> StoredResponse:
        media = "application/problem+json" if status >= 400 else "application/json"
        return cls(
            status, json.dumps(payload, separators=(",", ":")), {"content-type": media, **(headers or {})}
        )


def stored(record: IdempotencyRecord) -> StoredResponse | None:
    if record.response_status is None or record.response_body is None:
        return None
    return StoredResponse(record.response_status, record.response_body, dict(record.response_headers or {}))


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert


def expired(record: IdempotencyRecord, now: datetime | None = None) -> bool:
    expires = record.expires_at if record.expires_at.tzinfo else record.expires_at.replace(tzinfo=UTC)
    return expires <= (now or datetime.now(UTC))


async def lookup(session: AsyncSession, ref: KeyRef) -> IdempotencyRecord | None:
    """The live record for the key, checked against the fingerprint (read-only fast path)."""
    return live(await session.get(IdempotencyRecord, (ref.scope, ref.key)), ref)


def live(record: IdempotencyRecord | None, ref: KeyRef) -> IdempotencyRecord | None:
    """The record unless it expired, checked against the fingerprint (422 if it differs)."""
    if record is None or expired(record):
        return None
    check_fingerprint(record, ref)
    return record


def check_fingerprint(record: IdempotencyRecord, ref: KeyRef) -> None:
    if record.fingerprint != ref.fingerprint:
        raise KeyReused(
            f"{HEADER} {ref.key!r} was first used for a different intent or payload; use a new key",
            intent_id=record.intent_id,
        )


async def claim(
    session: AsyncSession, ref: KeyRef, *, intent_id: str | None, owner: str, ttl: int
) -> IdempotencyRecord | None:
    """Reserve the key in the caller's transaction: None if it is ours now, else the holder's row."""
    now = datetime.now(UTC)
    table = IdempotencyRecord.__table__
    same_key = and_(table.c.scope == ref.scope, table.c.key == ref.key)
    values = {
        "scope": ref.scope,
        "key": ref.key,
        "fingerprint": ref.fingerprint,
        "intent_id": intent_id,
        "state": PENDING,
        "owner": owner,
        "response_status": None,
        "response_body": None,
        "response_headers": None,
        "created_at": now,
        "expires_at": now + timedelta(seconds=ttl),
    }
    # One statement: insert, or take over an expired row; a live row is left alone.
    statement = (
        _insert(session)(table)
        .values(**values)
        .on_conflict_do_update(
            index_elements=[table.c.scope, table.c.key], set_=values, where=table.c.expires_at <= now
        )
        .returning(table.c.key)
    )
    if (await session.execute(statement)).first() is not None:
        return None
    record = (
        await session.execute(
            select(IdempotencyRecord).where(same_key).execution_options(populate_existing=True)
        )
    ).scalar_one()
    session.expunge(record)  # a snapshot: the caller's rollback must not expire it
    check_fingerprint(record, ref)
    return record


async def finish(session: AsyncSession, ref: KeyRef, response: StoredResponse, *, state: str = DONE) -> None:
    table = IdempotencyRecord.__table__
    await session.execute(
        update(table)
        .where(table.c.scope == ref.scope, table.c.key == ref.key)
        .values(
            state=state,
            response_status=response.status,
            response_body=response.body,
            response_headers=response.headers,
        )
    )


async def release(session: AsyncSession, ref: KeyRef) -> None:
    """Forget a reservation whose request ended before anything happened (never a finished one)."""
    table = IdempotencyRecord.__table__
    await session.execute(
        delete(table).where(table.c.scope == ref.scope, table.c.key == ref.key, table.c.state == PENDING)
    )


async def purge_expired(db: Database) -> int:
    async with db.transaction() as session:
        table = IdempotencyRecord.__table__
        result = await session.execute(delete(table).where(table.c.expires_at <= datetime.now(UTC)))
        return int(result.rowcount or 0)
