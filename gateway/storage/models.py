"""Every table of the gateway. Schema changes go through Alembic (`gateway/migrations`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The recovery sweep's conditions, written once for its queries and for the partial indexes
# that serve them: a sweep every few seconds must not scan tables that only ever grow.
# SQL literals, not bound parameters, so every plan (generic ones too) can use the index.
INTENTS_IN_FLIGHT = "status = 'executing' OR compensation_status = 'running'"
TASK_KEYS_PENDING = "state = 'pending' AND intent_id IS NULL"


def _partial_index(name: str, column: str, where: str) -> Index:
    return Index(name, column, postgresql_where=text(where), sqlite_where=text(where))


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class Revocation(Base):
    """A revoked token id (`kind = "jti"`) or agent (`kind = "sub"`)."""

    __tablename__ = "revocations"
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    value: Mapped[str] = mapped_column(String(255), primary_key=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]


class Intent(Base):
    """One proposed side effect and its state (contract §4). History lives in the ledger.

    `executor` is the gateway instance that reserved the intent (`executing`); another
    instance that finds the executor dead marks the intent `unknown`, never re-runs it.
    """

    __tablename__ = "intents"
    __table_args__ = (_partial_index("ix_intents_in_flight", "intent_id", INTENTS_IN_FLIGHT),)
    intent_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(255), index=True)
    tool: Mapped[str] = mapped_column(String(255))
    arguments: Mapped[Any] = mapped_column(JSON)
    compensation: Mapped[dict[str, Any] | None]
    depends_on: Mapped[list[Any] | None]
    memory_writes: Mapped[list[Any] | None]
    parent: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    proposer: Mapped[dict[str, Any]]
    verifier: Mapped[dict[str, Any] | None]
    committer: Mapped[dict[str, Any] | None]
    verdict_reason: Mapped[str | None] = mapped_column(Text)
    checks: Mapped[Any | None] = mapped_column(JSON)
    executor: Mapped[str | None] = mapped_column(String(64))
    executing_since: Mapped[datetime | None]
    result_status: Mapped[int | None]
    result_body: Mapped[str | None] = mapped_column(Text)
    result_content_type: Mapped[str | None] = mapped_column(String(255))
    compensation_status: Mapped[str | None] = mapped_column(String(32))
    compensation_executor: Mapped[str | None] = mapped_column(String(64))
    compensation_result: Mapped[dict[str, Any] | None]
    trace_id: Mapped[str | None] = mapped_column(String(32))
    deadline: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class GatewayInstance(Base):
    """A running gateway process; its heartbeat tells others its reservations are alive."""

    __tablename__ = "gateway_instances"
    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]


class IdempotencyRecord(Base):
    """One `Idempotency-Key` of one caller; the primary key is the reservation."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (_partial_index("ix_idempotency_keys_task_pending", "owner", TASK_KEYS_PENDING),)
    scope: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    intent_id: Mapped[str | None] = mapped_column(String(80))
    state: Mapped[str] = mapped_column(String(24))
    owner: Mapped[str | None] = mapped_column(String(64))
    response_status: Mapped[int | None]
    response_body: Mapped[str | None] = mapped_column(Text)
    response_headers: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class LedgerEntry(Base):
    __tablename__ = "ledger"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime]
    event: Mapped[str] = mapped_column(String(64))
    actor_sub: Mapped[str | None] = mapped_column(String(255))
    actor_role: Mapped[str | None] = mapped_column(String(64))
    task_id: Mapped[str | None] = mapped_column(String(255), index=True)
    intent_id: Mapped[str | None] = mapped_column(String(80), index=True)
    decision_id: Mapped[str | None] = mapped_column(String(64))
    parent: Mapped[str | None] = mapped_column(String(255))
    request_digest: Mapped[str | None] = mapped_column(String(80))
    effect_digest: Mapped[str | None] = mapped_column(String(80))
    trace_id: Mapped[str | None] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class LedgerHead(Base):
    """A single row (id = 1) locked by every append, so the chain has one order."""

    __tablename__ = "ledger_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    # The hash before the last append, so one UPDATE ... RETURNING yields both links.
    prev_hash: Mapped[str] = mapped_column(String(64))


class LedgerCheckpoint(Base):
    __tablename__ = "ledger_checkpoints"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    hash: Mapped[str] = mapped_column(String(64))
    kid: Mapped[str] = mapped_column(String(128))
    signature: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime]


class Approval(Base):
    """A commit waiting for humans (contract §5); `gateway.approvals` moves it on.

    status: pending → approved | denied | expired (the last three are final). Decisions
    claim the row with conditional UPDATEs (`approvals_given` counts approve decisions),
    so replicas and double clicks agree on one outcome. `webhook_*` is the outbox of the
    new-approval webhook: queued → delivered | failed, `webhook_next_at` the next try.
    """

    __tablename__ = "approvals"
    approval_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    intent_id: Mapped[str] = mapped_column(String(80), index=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    approvals_required: Mapped[int]
    approvals_given: Mapped[int] = mapped_column(default=0, server_default="0")
    reasons: Mapped[list[Any]]
    requested_by: Mapped[dict[str, Any]]
    idempotency_scope: Mapped[str] = mapped_column(String(255))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    decided_at: Mapped[datetime | None]
    executed_at: Mapped[datetime | None]
    webhook_state: Mapped[str] = mapped_column(
        String(16), default="queued", server_default="queued", index=True
    )
    webhook_attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    webhook_next_at: Mapped[datetime | None]


class ApprovalDecision(Base):
    """One approver's decision on one approval: the unique key keeps approvers distinct."""

    __tablename__ = "approval_decisions"
    __table_args__ = (UniqueConstraint("approval_id", "approver"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    approval_id: Mapped[str] = mapped_column(String(80), index=True)
    approver: Mapped[str] = mapped_column(String(255))  # the approver's `sub`
    approver_iss: Mapped[str] = mapped_column(String(255), default="", server_default="")
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime]


class UiSession(Base):
    """A signed-in approver on the approvals page; the cookie holds the id, the row its hash."""

    __tablename__ = "ui_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    sub: Mapped[str] = mapped_column(String(255))
    iss: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(64))
    jti: Mapped[str] = mapped_column(String(255))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class MemoryRevision(Base):
    """One revision of a canonical memory key (contract §6), written only by a commit.

    Rows are only ever inserted; the newest revision is the current value. The primary
    key is the guard: two writers can never both land revision N of one key.
    """

    __tablename__ = "memory"
    namespace: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[Any] = mapped_column(JSON, nullable=True)
    intent_id: Mapped[str] = mapped_column(String(80))
    agent: Mapped[str | None] = mapped_column(String(255))
    task_id: Mapped[str] = mapped_column(String(255))
    ledger_seq: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime]


class MemoryClaim(Base):
    """A key an executing commit is about to write: one claim per key at a time.

    Taken in the transaction that reserves the intent, released in the one that records
    it. A claim whose intent is no longer `executing` is dead and may be taken over.
    """

    __tablename__ = "memory_claims"
    namespace: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    intent_id: Mapped[str] = mapped_column(String(80), index=True)
    at: Mapped[datetime]


class ScratchEntry(Base):
    """A task's scratch key (`scratch/<task_id>`): written directly, never canonical.

    Only the current value is kept; a delete leaves a tombstone so revisions never repeat.
    """

    __tablename__ = "memory_scratch"
    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    value: Mapped[Any] = mapped_column(JSON, nullable=True)
    deleted: Mapped[bool] = mapped_column(default=False)
    agent: Mapped[str | None] = mapped_column(String(255))
    at: Mapped[datetime]
