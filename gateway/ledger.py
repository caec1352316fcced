"""The ledger (contract §7): an append-only, hash-chained record of every protocol event.

    hash_n = SHA-256( RFC 8785 canonical JSON of entry_n  ||  bytes of hash_{n-1} )

with hash_0 = 64 zeros. Every append increments the single `ledger_head` row first:
that UPDATE takes the row lock on PostgreSQL (and the write lock on SQLite), so appends
from every gateway process queue up into one order, inside the caller's transaction.
Append last in a transaction, so the head lock is held as briefly as possible.

`verify` recomputes the chain and names the first bad entry; checkpoints are the
gateway's Ed25519 signature over (seq, hash), storable outside the database, so a
rewritten chain cannot be passed off as the signed one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import LargeBinary, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import canonical
from gateway.keys import PublicKey, kid_for
from gateway.storage import Database
from gateway.storage.models import LedgerCheckpoint, LedgerEntry, LedgerHead

GENESIS = "0" * 64
CHECKPOINT_TYPE = "agent-gateway-ledger-checkpoint"
EVENTS = frozenset(
    {
        "proposed",
        "verified",
        "rejected",
        "commit_started",
        "committed",
        "failed",
        "unknown",
        "compensation_started",
        "compensated",
        "compensation_failed",
        "approval_requested",
        "approval_decided",
        "approval_approved",
        "approval_denied",
        "approval_expired",
        "approval_executed",
        "memory_written",
        "memory_conflict",
        "refused",
    }
)


class LedgerError(Exception):
    """The ledger cannot be appended to (missing head row, unknown event)."""


def utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def timestamp(value: datetime) -> str:
    return utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def digest(data: bytes | Any) -> str:
    """`sha256:<hex>` of bytes, or of the canonical JSON of any other value."""
    raw = data if isinstance(data, bytes) else canonical.dumps(data)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass
class NewEntry:
    """An entry before it is in the chain (seq and hashes come with the append)."""

    at: datetime
    event: str
    actor_sub: str | None
    actor_role: str | None
    task_id: str | None
    intent_id: str | None
    decision_id: str | None
    parent: str | None
    request_digest: str | None
    effect_digest: str | None
    trace_id: str | None
    data: dict[str, Any]
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def row(self) -> LedgerEntry:
        return LedgerEntry(**{name: getattr(self, name) for name in _ROW_FIELDS})


def document(entry: LedgerEntry | NewEntry) -> dict[str, Any]:
    """What the hash covers: every column but the hashes themselves."""
    return {
        "seq": entry.seq,
        "at": timestamp(entry.at),
        "event": entry.event,
        "actor": {"sub": entry.actor_sub, "role": entry.actor_role},
        "task_id": entry.task_id,
        "intent_id": entry.intent_id,
        "decision_id": entry.decision_id,
        "parent": entry.parent,
        "request_digest": entry.request_digest,
        "effect_digest": entry.effect_digest,
        "trace_id": entry.trace_id,
        "data": entry.data,
    }


def chain_hash(entry: LedgerEntry | NewEntry, prev_hash: str) -> str:
    return hashlib.sha256(canonical.dumps(document(entry)) + bytes.fromhex(prev_hash)).hexdigest()


def render(entry: LedgerEntry) -> dict[str, Any]:
    return {**document(entry), "prev_hash": entry.prev_hash, "hash": entry.hash}


def _actor(actor: Any) -> tuple[str | None, str | None]:
    if actor is None:
        return None, None
    if isinstance(actor, Mapping):
        return actor.get("sub"), actor.get("role")
    return getattr(actor, "sub", None), getattr(actor, "role", None)


async def ensure_head(db: Database) -> None:
    """Create the head row once; concurrent replicas race harmlessly."""
    insert = pg_insert if db.dialect == "postgresql" else sqlite_insert
    statement = (
        insert(LedgerHead).values(id=1, seq=0, hash=GENESIS, prev_hash=GENESIS).on_conflict_do_nothing()
    )
    async with db.transaction() as session:
        await session.execute(statement)


# On PostgreSQL one statement takes the head's row lock, hashes and inserts: the lock is
# then held for that statement and the COMMIT only, however busy the event loop is.
# The canonical document is split around its `seq` value, which only the database knows.
# `PG_HEAD` and `PG_INSERT` are also the tail of the commit's one-statement steps
# (`gateway.commits.onestatement`), with `{when}` a condition on their earlier parts.
PG_HEAD = """
    head AS (
        UPDATE ledger_head
        SET seq = seq + 1, prev_hash = hash,
            hash = encode(sha256(:prefix || convert_to(CAST(seq + 1 AS text), 'UTF8') || :suffix
                                 || decode(hash, 'hex')), 'hex')
        WHERE id = 1 {when}
        RETURNING seq, prev_hash, hash
    )
"""
PG_INSERT = """
    INSERT INTO ledger (seq, at, event, actor_sub, actor_role, task_id, intent_id, decision_id, parent,
                        request_digest, effect_digest, trace_id, data, prev_hash, hash)
    SELECT head.seq, CAST(:at AS timestamptz), :event, :actor_sub, :actor_role, :task_id, :intent_id,
           :decision_id, :parent, :request_digest, :effect_digest, :trace_id, CAST(:data AS json),
           head.prev_hash, head.hash
    FROM head
    RETURNING seq, prev_hash, hash
"""


def pg_append_sql(ctes: str, when: str = "") -> str:
    """One statement: `ctes` (`WITH a AS (…), b AS (…),`), then the append, made only if `when`."""
    return ctes + PG_HEAD.format(when=when) + PG_INSERT


_PG_APPEND = text(pg_append_sql("WITH")).bindparams(
    bindparam("prefix", type_=LargeBinary), bindparam("suffix", type_=LargeBinary)
)
_SEQ_MARK = 7_390_518_246_183


def _split_document(entry: NewEntry) -> tuple[bytes, bytes] | None:
    entry.seq = _SEQ_MARK
    text = canonical.dumps(document(entry))
    mark = b'"seq":%d' % _SEQ_MARK
    if text.count(mark) != 1:
        return None
    prefix, suffix = text.split(mark)
    return prefix + b'"seq":', suffix


def new_entry(
    *,
    event: str,
    actor: Any = None,
    task_id: str | None = None,
    intent_id: str | None = None,
    decision_id: str | None = None,
    parent: str | None = None,
    request_digest: str | None = None,
    effect_digest: str | None = None,
    trace_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> NewEntry:
    """An entry not yet in the chain (no seq or hashes)."""
    if event not in EVENTS:
        raise LedgerError(f"unknown ledger event {event!r}")
    sub, role = _actor(actor)
    return NewEntry(
        at=datetime.now(UTC),
        event=event,
        actor_sub=sub,
        actor_role=role,
        task_id=task_id,
        intent_id=intent_id,
        decision_id=decision_id,
        parent=parent,
        request_digest=request_digest,
        effect_digest=effect_digest,
        trace_id=trace_id,
        data=data or {},
    )


def pg_params(entry: NewEntry) -> dict[str, Any] | None:
    """The parameters of `PG_HEAD` + `PG_INSERT` for this entry (None: append another way)."""
    split = _split_document(entry)
    if split is None:
        return None
    values = {column: getattr(entry, column) for column in _COLUMNS}
    values["data"] = json.dumps(entry.data)
    return {**values, "prefix": split[0], "suffix": split[1]}


def pg_appended(entry: NewEntry, params: dict[str, Any], row: Any) -> NewEntry:
    """Take the (seq, prev_hash, hash) the database chained the entry with, checking the hash.

    The canonical document with its seq is `prefix + seq + suffix` (an integer's canonical
    form is its decimal digits), so the check needs no second canonicalization.
    """
    entry.seq, entry.prev_hash, entry.hash = int(row[0]), str(row[1]), str(row[2])
    canonical = params["prefix"] + str(entry.seq).encode() + params["suffix"]
    if hashlib.sha256(canonical + bytes.fromhex(entry.prev_hash)).hexdigest() != entry.hash:
        raise LedgerError(f"ledger entry {entry.seq} hashed differently in the database")
    return entry


# Several appends in one statement (`gateway.commits.batched`), through the function
# `ledger_append_many` (migration 0002). Each entry's parameters are one array element;
# `PG_MANY_INPUT` names them for an `unnest(...) WITH ORDINALITY` of the batch's input
# (column `entry_<name>`, parameter `entry_<name>s`), and `pg_many_sql` appends the
# entries of the input rows a CTE selects, in input order.
PG_MANY_INPUT = (
    ("prefix", "bytea"),
    ("suffix", "bytea"),
    ("at", "timestamptz"),
    ("event", "text"),
    ("actor_sub", "text"),
    ("actor_role", "text"),
    ("task_id", "text"),
    ("intent_id", "text"),
    ("decision_id", "text"),
    ("parent", "text"),
    ("request_digest", "text"),
    ("effect_digest", "text"),
    ("trace_id", "text"),
    ("data", "json"),
)


def pg_many_sql(rows: str) -> str:
    """The statement's last part: append the entries of CTE `rows` (which has `n`, the input order)."""
    arrays = ", ".join(
        f"array_agg({rows}.entry_{name} ORDER BY {rows}.n) AS {name}s" for name, _ in PG_MANY_INPUT
    )
    arguments = ", ".join(f"batch.{name}s" for name, _ in PG_MANY_INPUT)
    return (  # names of our own; every value is bound
        " SELECT appended.entry_intent_id, appended.entry_seq, appended.entry_prev_hash, appended.entry_hash"  # noqa: S608
        f" FROM (SELECT {arrays} FROM {rows}) AS batch,"
        f" LATERAL ledger_append_many({arguments}) AS appended"
    )


def pg_many_params(params: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The array parameters (`entry_<name>s`) of several entries' `pg_params`, in order."""
    return {f"entry_{name}s": [one[name] for one in params] for name, _ in PG_MANY_INPUT}


def pg_appended_many(
    entries: list[NewEntry], params: list[dict[str, Any]], rows: list[Any]
) -> dict[str, NewEntry]:
    """The entries the database chained, by intent id, each hash checked as `pg_appended` does,
    and each entry's prev_hash checked against the hash before it."""
    by_intent = {entry.intent_id: (entry, one) for entry, one in zip(entries, params, strict=True)}
    appended: dict[str, NewEntry] = {}
    previous: NewEntry | None = None
    for row in sorted(rows, key=lambda row: int(row[1])):
        entry, one = by_intent[row[0]]
        pg_appended(entry, one, tuple(row)[1:])
        if previous is not None and (entry.seq != previous.seq + 1 or entry.prev_hash != previous.hash):
            raise LedgerError(f"ledger entry {entry.seq} is not chained onto entry {previous.seq}")
        appended[row[0]] = previous = entry
    return appended


async def append(session: AsyncSession, **fields: Any) -> LedgerEntry:
    """Append one entry inside the caller's transaction; it commits or rolls back with it.

    Takes the fields of `new_entry`. Call it last in the transaction: the head stays
    locked until the transaction ends.
    """
    entry = new_entry(**fields)
    params = pg_params(entry) if session.bind.dialect.name == "postgresql" else None
    if params is not None:
        row = (await session.execute(_PG_APPEND, params)).one_or_none()
        if row is None:
            raise LedgerError("the ledger head row is missing; start the gateway once to create it")
        return pg_appended(entry, params, row).row()
    head = LedgerHead.__table__
    bumped = await session.execute(
        update(head).where(head.c.id == 1).values(seq=head.c.seq + 1).returning(head.c.seq, head.c.hash)
    )
    row = bumped.one_or_none()
    if row is None:
        raise LedgerError("the ledger head row is missing; start the gateway once to create it")
    entry.seq, entry.prev_hash = int(row[0]), str(row[1])
    entry.hash = chain_hash(entry, entry.prev_hash)
    stored = entry.row()
    session.add(stored)
    await session.execute(
        update(head).where(head.c.id == 1).values(hash=entry.hash, prev_hash=entry.prev_hash)
    )
    return stored


_ROW_FIELDS = (
    "seq",
    "prev_hash",
    "hash",
    *(name for name in NewEntry.__dataclass_fields__ if name not in ("seq", "prev_hash", "hash")),
)
_COLUMNS = (
    "at",
    "event",
    "actor_sub",
    "actor_role",
    "task_id",
    "intent_id",
    "decision_id",
    "parent",
    "request_digest",
    "effect_digest",
    "trace_id",
    "data",
)


# --- checkpoints --------------------------------------------------------------------


def checkpoint_payload(seq: int, hash_: str, at: str) -> bytes:
    return canonical.dumps({"type": CHECKPOINT_TYPE, "seq": seq, "hash": hash_, "at": at})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def write_checkpoint(db: Database, private_key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    """Sign the current head and store the checkpoint; returns it as a JSON document."""
    async with db.transaction() as session:
        head = await session.get(LedgerHead, 1)
        if head is None or head.seq == 0:
            raise LedgerError("the ledger is empty; nothing to checkpoint")
        existing = await session.get(LedgerCheckpoint, head.seq)
        if existing is not None:
            return checkpoint_document(existing)
        at = datetime.now(UTC)
        signature = private_key.sign(checkpoint_payload(head.seq, head.hash, timestamp(at)))
        row = LedgerCheckpoint(
            seq=head.seq,
            hash=head.hash,
            kid=kid_for(private_key.public_key()),
            signature=_b64(signature),
            at=at,
        )
        session.add(row)
        return checkpoint_document(row)


def checkpoint_document(row: LedgerCheckpoint) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "hash": row.hash,
        "at": timestamp(row.at),
        "kid": row.kid,
        "signature": row.signature,
    }


# --- verification -------------------------------------------------------------------


@dataclass
class Verification:
    entries: int = 0
    checkpoints: int = 0
    bad_seq: int | None = None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def fail(self, seq: int | None, problem: str) -> None:
        if self.problem is None or (seq is not None and (self.bad_seq is None or seq < self.bad_seq)):
            self.bad_seq, self.problem = seq, problem


def _check_signature(cp: dict[str, Any], keys: Mapping[str, PublicKey]) -> str | None:
    key = keys.get(cp.get("kid", ""))
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return f"checkpoint at seq {cp['seq']} is signed by an unknown key {cp.get('kid')!r}"
    try:
        key.verify(_unb64(cp["signature"]), checkpoint_payload(cp["seq"], cp["hash"], cp["at"]))
    except (InvalidSignature, ValueError):
        return f"checkpoint at seq {cp['seq']} has an invalid signature"
    return None


async def verify(
    db: Database,
    public_keys: Iterable[PublicKey] = (),
    external: Iterable[dict[str, Any]] = (),
    *,
    page: int = 2000,
) -> Verification:
    """Recompute the whole chain; check the head row and every checkpoint against it."""
    report = Verification()
    keys = {kid_for(key): key for key in public_keys}
    async with db.sessions() as session:
        stored = [
            checkpoint_document(row) for row in (await session.execute(select(LedgerCheckpoint))).scalars()
        ]
        checkpoints = stored + [dict(cp) for cp in external]
        wanted = {int(cp["seq"]) for cp in checkpoints}
        seen: dict[int, str] = {}
        prev_hash, expected = GENESIS, 1
        while True:
            rows = (
                (
                    await session.execute(
                        select(LedgerEntry)
                        .where(LedgerEntry.seq >= expected)
                        .order_by(LedgerEntry.seq)
                        .limit(page)
                    )
                )
                .scalars()
                .all()
            )
            for entry in rows:
                if entry.seq != expected:
                    report.fail(expected, f"entry {expected} is missing (next is {entry.seq})")
                    return report
                if entry.prev_hash != prev_hash:
                    report.fail(entry.seq, f"entry {entry.seq} does not link to entry {entry.seq - 1}")
                    return report
                if chain_hash(entry, prev_hash) != entry.hash:
                    report.fail(entry.seq, f"entry {entry.seq} was altered (its hash does not match)")
                    return report
                if entry.seq in wanted:
                    seen[entry.seq] = entry.hash
                prev_hash, expected = entry.hash, expected + 1
                report.entries += 1
            if len(rows) < page:
                break
            session.expunge_all()
        head = await session.get(LedgerHead, 1)
    last = expected - 1
    if head is not None and (head.seq, head.hash) != (last, prev_hash):
        report.fail(
            last + 1 if head.seq > last else head.seq,
            f"the head says seq {head.seq} but the chain ends at {last}",
        )
    for cp in sorted(checkpoints, key=lambda item: int(item["seq"])):
        problem = _check_signature(cp, keys)
        seq = int(cp["seq"])
        if problem is None and seq not in seen:
            problem = f"checkpoint at seq {seq} is beyond the end of the chain ({last}): entries were removed"
        elif problem is None and seen[seq] != cp["hash"]:
            problem = f"entry {seq} differs from the signed checkpoint"
        if problem:
            report.fail(seq, problem)
        else:
            report.checkpoints += 1
    return report


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not {"seq", "hash", "at", "kid", "signature"} <= data.keys():
        raise ValueError(f"{path}: not a ledger checkpoint")
    return data
