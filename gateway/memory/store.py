"""Reading canonical memory: current values, history, revisions, freshness checks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import ledger
from gateway.memory.names import GOALS, address
from gateway.problems import Conflict
from gateway.storage.models import Intent, MemoryRevision

if TYPE_CHECKING:
    from gateway.storage import Database


class StaleDependency(Conflict):
    name, title = "stale-dependency", "A memory revision the intent depends on is no longer current"


async def current_revision(session: AsyncSession, namespace: str, key: str) -> int:
    """The newest revision of a key; 0 when it has never been written."""
    statement = select(func.max(MemoryRevision.revision)).where(
        MemoryRevision.namespace == namespace, MemoryRevision.key == key
    )
    return int((await session.execute(statement)).scalar() or 0)


async def current(session: AsyncSession, namespace: str, key: str) -> MemoryRevision | None:
    statement = (
        select(MemoryRevision)
        .where(MemoryRevision.namespace == namespace, MemoryRevision.key == key)
        .order_by(MemoryRevision.revision.desc())
        .limit(1)
    )
    return (await session.execute(statement)).scalar_one_or_none()


async def history(
    session: AsyncSession, namespace: str, key: str, *, after: int, limit: int
) -> list[MemoryRevision]:
    statement = (
        select(MemoryRevision)
        .where(
            MemoryRevision.namespace == namespace,
            MemoryRevision.key == key,
            MemoryRevision.revision > after,
        )
        .order_by(MemoryRevision.revision)
        .limit(limit)
    )
    return list((await session.execute(statement)).scalars())


async def revisions(session: AsyncSession, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Current revisions of several keys in one query; absent keys are 0."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    statement = (
        select(MemoryRevision.namespace, MemoryRevision.key, func.max(MemoryRevision.revision))
        .where(or_(*(and_(MemoryRevision.namespace == ns, MemoryRevision.key == k) for ns, k in wanted)))
        .group_by(MemoryRevision.namespace, MemoryRevision.key)
    )
    found = {(ns, k): int(rev) for ns, k, rev in (await session.execute(statement)).all()}
    return {pair: found.get(pair, 0) for pair in wanted}


def render(row: MemoryRevision) -> dict[str, Any]:
    return {
        "namespace": row.namespace,
        "key": row.key,
        "value": row.value,
        "revision": row.revision,
        "provenance": {
            "intent_id": row.intent_id,
            "agent": row.agent,
            "task_id": row.task_id,
            "ledger_seq": row.ledger_seq,
            "at": ledger.timestamp(row.at),
        },
    }


async def stale(session: AsyncSession, intent: Intent) -> list[dict[str, Any]]:
    """What no longer holds: `depends_on` revisions and `if_revision` of `memory_writes`."""
    expected = [(d["namespace"], d["key"], d["revision"], "depends_on") for d in intent.depends_on or []] + [
        (w["namespace"], w["key"], w["if_revision"], "if_revision")
        for w in intent.memory_writes or []
        if "if_revision" in w
    ]
    if not expected:
        return []
    now = await revisions(session, ((ns, key) for ns, key, _, _ in expected))
    return [
        {"namespace": ns, "key": key, "revision": revision, "current": now[(ns, key)], "via": via}
        for ns, key, revision, via in expected
        if now[(ns, key)] != revision
    ]


def stale_error(intent: Intent, found: list[dict[str, Any]]) -> StaleDependency:
    names = ", ".join(
        f"{address(item['namespace'], item['key'])}@{item['revision']} (now {item['current']})"
        for item in found
    )
    return StaleDependency(f"no longer current: {names}", intent_id=intent.intent_id, stale=found)


async def require_fresh(session: AsyncSession, intent: Intent) -> None:
    found = await stale(session, intent)
    if found:
        raise stale_error(intent, found)


async def goal_revision(db: Database, task_id: str) -> int | None:
    """The revision of `goals/{task_id}`, None when the task has no goal (envelopes carry 0)."""
    async with db.reading() as session:
        revision = await current_revision(session, GOALS, task_id)
    return revision or None


def policy_view(found: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """`input.memory`: {"<namespace>/<key>": {"revision": current}}."""
    return {address(ns, key): {"revision": revision} for (ns, key), revision in found.items()}


async def policy_memory(db: Database, intent: Intent, envelope: dict[str, Any] | None) -> dict[str, Any]:
    """`input.memory` for a protocol step: the keys the intent depends on and writes, and its goal.

    A verified envelope of the intent's task already names the goal's current revision.
    """
    keys = {(d["namespace"], d["key"]) for d in intent.depends_on or []}
    keys |= {(w["namespace"], w["key"]) for w in intent.memory_writes or []}
    known: dict[tuple[str, str], int] = {}
    if envelope is not None and envelope.get("task_id") == intent.task_id:
        known[(GOALS, intent.task_id)] = int(envelope["goal_revision"])
    else:
        keys.add((GOALS, intent.task_id))
    keys -= known.keys()
    if keys:
        async with db.reading() as session:
            known.update(await revisions(session, keys))
    return policy_view(known)
