"""Canonical writes, applied only by commits, all or none, never losing a write.

A commit touches memory in the two transactions the commit protocol already has:

    reserve (verified → executing)   claim every key the intent writes, then check
                                     each `if_revision` (and `depends_on`) against the
                                     current revision: 409 stale-dependency, before
                                     the tool is called; a key another executing
                                     commit has claimed → 409 memory-busy (the commit
                                     waits `commit_wait` for it to settle first)
    record (executing → committed)   under the claims, insert revision current + 1 of
                                     each key, each with a `memory_written` ledger
                                     entry, and release the claims

The claim is a primary-key row per key, so between the check and the write no other
commit can move the key: the revision checked at reservation is still current when the
commit is recorded, and the writes land as one. The claim is taken *before* the
revision is read, so a reservation never reads a revision older than the last
recorded write. The memory table's own primary key (namespace, key, revision) is the
second guard: a revision is never written twice.

A claim whose intent is no longer `executing` (failed, unknown after a crash) is dead
and is taken over by the next writer: a failed or unknown commit writes nothing. If an
executor presumed dead records its commit after all, and its claim was taken over,
its writes no longer hold: they are not applied, and a `memory_conflict` ledger entry
says so.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import ledger
from gateway.config import MEMORY_TOOL as BUILTIN_MEMORY_TOOL
from gateway.memory.names import address
from gateway.memory.store import current_revision, stale, stale_error
from gateway.problems import Conflict
from gateway.storage.models import Intent, LedgerEntry, MemoryClaim, MemoryRevision

log = logging.getLogger("gateway.memory")

# Built in: a commit of this tool calls no upstream; its whole effect is `memory_writes`.
MEMORY_TOOL = BUILTIN_MEMORY_TOOL.name


class MemoryBusy(Conflict):
    name, title = "memory-busy", "Another commit is writing this memory key right now"


def _keys(intent: Intent) -> list[tuple[str, str]]:
    # Sorted: two commits claiming overlapping keys take their locks in one order.
    return sorted({(w["namespace"], w["key"]) for w in intent.memory_writes or []})


async def _claim(session: AsyncSession, namespace: str, key: str, intent: Intent) -> None:
    insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    table = MemoryClaim.__table__
    values = {"namespace": namespace, "key": key, "intent_id": intent.intent_id, "at": datetime.now(UTC)}
    for _ in range(2):
        taken = await session.execute(
            insert(table).values(**values).on_conflict_do_nothing().returning(table.c.intent_id)
        )
        if taken.first() is not None:
            return
        holder = (
            await session.execute(
                select(MemoryClaim.intent_id, Intent.status)
                .join(Intent, Intent.intent_id == MemoryClaim.intent_id, isouter=True)
                .where(MemoryClaim.namespace == namespace, MemoryClaim.key == key)
            )
        ).first()
        if holder is not None and holder.status == "executing":
            raise MemoryBusy(
                f"{address(namespace, key)} is being written by the commit of {holder.intent_id}; retry",
                intent_id=intent.intent_id,
                headers={"Retry-After": "1"},
            )
        if holder is not None:  # a dead claim: its commit failed or its outcome is unknown
            await session.execute(
                delete(MemoryClaim).where(
                    MemoryClaim.namespace == namespace,
                    MemoryClaim.key == key,
                    MemoryClaim.intent_id == holder.intent_id,
                )
            )
    raise MemoryBusy(
        f"{address(namespace, key)} is contended; retry",
        intent_id=intent.intent_id,
        headers={"Retry-After": "1"},
    )


async def claim_writes(session: AsyncSession, intent: Intent) -> None:
    """Reserve hook: in the transaction that makes the intent `executing`."""
    keys = _keys(intent)
    for namespace, key in keys:
        await _claim(session, namespace, key, intent)
    if keys or intent.depends_on:
        found = await stale(session, intent)  # read after claiming: see every recorded write
        if found:
            raise stale_error(intent, found)


async def _held(session: AsyncSession, intent: Intent, keys: list[tuple[str, str]]) -> bool:
    """Whether every claim is still this intent's, locking them until the transaction ends."""
    for namespace, key in keys:
        holder = (
            await session.execute(
                select(MemoryClaim.intent_id)
                .where(MemoryClaim.namespace == namespace, MemoryClaim.key == key)
                .with_for_update()
            )
        ).scalar_one_or_none()
        if holder != intent.intent_id:
            return False
    return True


async def apply_writes(session: AsyncSession, intent: Intent, committed: LedgerEntry) -> None:
    """Commit hook: in the transaction that records the intent `committed`."""
    keys = _keys(intent)
    if not keys:
        return
    actor = {"sub": committed.actor_sub, "role": committed.actor_role}
    common: dict[str, Any] = {
        "actor": actor,
        "task_id": intent.task_id,
        "intent_id": intent.intent_id,
        "decision_id": committed.decision_id,
        "parent": intent.intent_id,
        "trace_id": committed.trace_id,
    }
    held = await _held(session, intent, keys)
    found = await stale(session, intent) if held else []
    if not held or any(item["via"] == "if_revision" for item in found):
        log.error("memory writes of %s no longer hold; none applied", intent.intent_id)
        await ledger.append(
            session,
            event="memory_conflict",
            **common,
            data={"keys": [address(ns, key) for ns, key in keys], "claims_held": held, "stale": found},
        )
        await _release(session, intent)
        return
    author = (intent.proposer or {}).get("sub")
    for write in intent.memory_writes or []:
        namespace, key = write["namespace"], write["key"]
        revision = await current_revision(session, namespace, key) + 1
        entry = await ledger.append(
            session,
            event="memory_written",
            **common,
            effect_digest=ledger.digest(write["value"]),
            data={"namespace": namespace, "key": key, "revision": revision, "author": author},
        )
        session.add(
            MemoryRevision(
                namespace=namespace,
                key=key,
                revision=revision,
                value=write["value"],
                intent_id=intent.intent_id,
                agent=author,
                task_id=intent.task_id,
                ledger_seq=entry.seq,
                at=entry.at,
            )
        )
    await session.flush()  # the primary key (namespace, key, revision) is checked here
    await _release(session, intent)


async def _release(session: AsyncSession, intent: Intent) -> None:
    await session.execute(delete(MemoryClaim).where(MemoryClaim.intent_id == intent.intent_id))


def builtin_result(intent: Intent) -> dict[str, Any]:
    """What a `memory.set` commit answers: the writes it applies as it is recorded."""
    return {
        "status": 200,
        "content_type": "application/json",
        "body": {"memory_writes": [address(ns, key) for ns, key in _keys(intent)]},
    }
