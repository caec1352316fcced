"""Reading the ledger (contract §7): entries by task or intent, and causal traces.

    GET /ledger?task_id=…|intent_id=…&after=SEQ&limit=N   entries in chain order, paged
    GET /trace/{intent_id}                                the causal chain to the effect

A trace starts at the intent's side effect and follows `parent` links back: each
event of an intent points at the intent, an intent's proposal points at its causal
parent (an earlier intent, or the task), and the task leads to its goal when memory
holds one (`goals/{task_id}` writes in the ledger).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway import ledger
from gateway.problems import BadRequest, NotFound
from gateway.storage.models import Intent, LedgerEntry

if TYPE_CHECKING:
    from gateway.state import Gateway

MAX_LIMIT = 1000
MAX_DEPTH = 32


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


async def list_entries(gateway: Gateway, request: Request) -> Response:
    await gateway.tokens.verify(request.headers.get("authorization"))
    after = _int(request, "after", 0, 0, 2**62)
    limit = _int(request, "limit", 100, 1, MAX_LIMIT)
    statement = select(LedgerEntry).where(LedgerEntry.seq > after)
    for name in ("task_id", "intent_id"):
        value = request.query_params.get(name)
        if value is not None:
            statement = statement.where(getattr(LedgerEntry, name) == value)
    async with gateway.db.reading() as session:
        rows = (await session.execute(statement.order_by(LedgerEntry.seq).limit(limit))).scalars().all()
    entries = [ledger.render(row) for row in rows]
    following = entries[-1]["seq"] if len(entries) == limit else None
    return JSONResponse({"entries": entries, "next_after": following})


def _goal_entries(entries: list[LedgerEntry], task_id: str) -> list[LedgerEntry]:
    return [
        entry
        for entry in entries
        if entry.event == "memory_written"
        and entry.data.get("namespace") == "goals"
        and entry.data.get("key") == task_id
    ]


async def trace(gateway: Gateway, request: Request) -> Response:
    await gateway.tokens.verify(request.headers.get("authorization"))
    return JSONResponse(await causal_trace(gateway, request.path_params["intent_id"]))


async def causal_trace(gateway: Gateway, start: str) -> dict[str, Any]:
    """The causal chain from the task's goal to the intent's side effect (also the approvals page's)."""
    if not start.startswith("in_"):
        raise NotFound(f"no intent {start!r}", intent_id=start)
    chain: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    goal: list[dict[str, Any]] = []
    async with gateway.db.reading() as session:
        current: str | None = start
        seen: set[str] = set()
        child_seq: int | None = None
        while current and current.startswith("in_") and current not in seen and len(seen) < MAX_DEPTH:
            seen.add(current)
            intent = await session.get(Intent, current)
            if intent is None:
                if current == start:
                    raise NotFound(f"no intent {start!r}", intent_id=start)
                break
            rows = (
                (
                    await session.execute(
                        select(LedgerEntry).where(LedgerEntry.intent_id == current).order_by(LedgerEntry.seq)
                    )
                )
                .scalars()
                .all()
            )
            if child_seq is not None and rows:
                links.append({"from": child_seq, "to": rows[-1].seq, "kind": "caused_by"})
            for earlier, later in zip(rows, rows[1:], strict=False):
                links.append({"from": later.seq, "to": earlier.seq, "kind": "follows"})
            chain[:0] = [ledger.render(row) for row in rows]
            child_seq = rows[0].seq if rows else None
            task_id, current = intent.task_id, intent.parent
        task_rows = (
            (
                await session.execute(
                    select(LedgerEntry)
                    .where(LedgerEntry.task_id == task_id, LedgerEntry.event == "memory_written")
                    .order_by(LedgerEntry.seq)
                )
            )
            .scalars()
            .all()
        )
    for entry in _goal_entries(list(task_rows), task_id):
        goal.append(ledger.render(entry))
    earlier = [entry for entry in goal if child_seq is not None and entry["seq"] < child_seq]
    if earlier and child_seq is not None:
        links.append({"from": child_seq, "to": earlier[-1]["seq"], "kind": "caused_by"})
    return {"intent_id": start, "task_id": task_id, "goal": goal, "entries": chain, "links": links}


def routes(gateway: Gateway) -> list[BaseRoute]:
    from gateway.app import bind

    return [
        Route("/ledger", bind(gateway, list_entries), methods=["GET"]),
        Route("/trace/{intent_id}", bind(gateway, trace), methods=["GET"]),
    ]
