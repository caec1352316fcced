"""Scratch memory (`scratch/<task_id>`): a task's working notes, written directly, never canonical.

    PUT    /memory/scratch/{task_id}/{key}   {"value": …}  with If-Match: "<rev>" (or *)
                                             or If-None-Match: * to create
    DELETE /memory/scratch/{task_id}/{key}   with If-Match
    GET    /memory/scratch/{task_id}/{key}   (gateway.memory.http)

A write without a precondition is refused (428 precondition-required), one whose
precondition fails gets 412 precondition-failed with the current ETag: two agents
can never silently overwrite each other. Policy decides who may write (action
`memory.write`; by default the caller's handoff envelope must name the task).
Scratch lives in its own table: no commit reads it, no ledger entry records it, and
it can never be depended on or turned into a canonical revision.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import ledger
from gateway.memory.names import SCRATCH, address, valid_key
from gateway.pipeline import POLICY_VISIBLE_HEADERS
from gateway.problems import (
    BadRequest,
    NotFound,
    PolicyDenied,
    PreconditionFailed,
    PreconditionRequired,
    Unprocessable,
)
from gateway.proxy import read_body
from gateway.storage.models import ScratchEntry

if TYPE_CHECKING:
    from gateway.identity import Principal
    from gateway.state import Gateway

ANY = "*"


def etag(revision: int) -> str:
    return f'"{revision}"'


def parse_tags(header: str) -> list[str] | None:
    """An If-Match / If-None-Match list: None for `*`, else the strong tags' revisions.

    Weak tags (W/"…") never match: If-Match uses the strong comparison (RFC 9110 §13.1.1).
    """
    if header.strip() == ANY:
        return None
    tags = []
    for part in header.split(","):
        part = part.strip()
        if len(part) >= 2 and part[0] == part[-1] == '"':
            tags.append(part[1:-1])
        elif not part.startswith('W/"'):
            raise BadRequest(f'{part!r} is not an entity tag; use "<revision>"')
    return tags


def namespace_of(task_id: str) -> str:
    return f"{SCRATCH}/{task_id}"


def render(row: ScratchEntry) -> dict[str, Any]:
    return {
        "namespace": namespace_of(row.task_id),
        "key": row.key,
        "value": row.value,
        "revision": row.revision,
        "canonical": False,
        "provenance": {
            "intent_id": None,
            "agent": row.agent,
            "ledger_seq": None,
            "at": ledger.timestamp(row.at),
        },
    }


async def read(session: AsyncSession, task_id: str, key: str) -> ScratchEntry | None:
    statement = select(ScratchEntry).where(ScratchEntry.task_id == task_id, ScratchEntry.key == key)
    return (await session.execute(statement)).scalar_one_or_none()


def address_of(request: Request) -> tuple[str, str]:
    task_id, key = request.path_params["task_id"], request.path_params["key"]
    if not valid_key(task_id) or not valid_key(key):
        raise NotFound(f"no scratch key {task_id!r}/{key!r}")
    return task_id, key


def _value(body: bytes) -> Any:
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict) or set(payload) != {"value"}:
        raise Unprocessable('the body is {"value": <any JSON>}', name="input-invalid")
    return payload["value"]


async def _authorize(
    gateway: Gateway,
    request: Request,
    principal: Principal,
    operation: str,
    task_id: str,
    key: str,
    value: Any,
    revision: int,
) -> str:
    """Policy decides who writes a task's scratch (action `memory.write`); returns the decision id."""
    envelope = await gateway.envelopes.verify(request.headers.get("agent-handoff"), principal)
    headers = {name: request.headers[name] for name in POLICY_VISIBLE_HEADERS if name in request.headers}
    namespace = namespace_of(task_id)
    decision = await gateway.policy.decide(
        {
            "action": "memory.write",
            "principal": {"sub": principal.sub, "role": principal.role, "iss": principal.iss},
            "tool": None,
            "arguments": {
                "operation": operation,
                "namespace": namespace,
                "task_id": task_id,
                "key": key,
                "value": value,
            },
            "envelope": envelope.claims if envelope is not None else None,
            "intent": None,
            "approval": None,
            "memory": {address(namespace, key): {"revision": revision}},
            "request": {"method": request.method, "path": request.url.path, "headers": headers},
            "time": datetime.now(UTC).isoformat(),
        }
    )
    if not decision.allow:
        raise PolicyDenied(
            "; ".join(decision.reasons) or "denied by policy",
            decision_id=decision.decision_id,
            reasons=decision.reasons,
        )
    return decision.decision_id


def _failed(row: ScratchEntry | None, detail: str) -> PreconditionFailed:
    live = row is not None and not row.deleted
    headers = {"ETag": etag(row.revision)} if live and row is not None else {}
    return PreconditionFailed(detail, headers=headers, revision=row.revision if live and row else 0)


def _preconditions(request: Request, *, creating_allowed: bool) -> tuple[list[str] | None, bool]:
    """(If-Match tags or None for *, whether If-None-Match: * asks to create)."""
    if_match = request.headers.get("if-match")
    if_none_match = request.headers.get("if-none-match")
    if if_match is not None:
        return parse_tags(if_match), False
    if if_none_match is not None and creating_allowed:
        if if_none_match.strip() != ANY:
            raise BadRequest('a scratch write takes If-None-Match: * (create) or If-Match: "<revision>"')
        return None, True
    wanted = 'If-Match: "<revision>"' + (" or If-None-Match: *" if creating_allowed else "")
    raise PreconditionRequired(f"scratch writes are conditional: send {wanted}")


async def _write(
    gateway: Gateway,
    task_id: str,
    key: str,
    tags: list[str] | None,
    create: bool,
    agent: str,
    *,
    value: Any = None,
    delete: bool = False,
) -> tuple[ScratchEntry, bool]:
    """The conditional write; (the entry now, whether it was created).

    Checked and written in one transaction, and the revision guard on the UPDATE (or
    the primary key on the INSERT) settles a race with a concurrent writer: 412.
    """
    at = datetime.now(UTC)
    value = None if delete else value
    async with gateway.db.transaction() as session:
        row = await read(session, task_id, key)
        live = row is not None and not row.deleted
        if create and live:
            raise _failed(row, "the key exists; If-None-Match: * only creates")
        if not create and (
            row is None or row.deleted or (tags is not None and str(row.revision) not in tags)
        ):
            raise _failed(row, "the key is not at the revision named in If-Match")
        entry = ScratchEntry(
            task_id=task_id,
            key=key,
            revision=1 if row is None else row.revision + 1,
            value=value,
            deleted=delete,
            agent=agent,
            at=at,
        )
        values = {column.name: getattr(entry, column.key) for column in ScratchEntry.__table__.columns}
        if row is None:
            insert = pg_insert if gateway.db.dialect == "postgresql" else sqlite_insert
            statement: Any = (
                insert(ScratchEntry).values(**values).on_conflict_do_nothing().returning(ScratchEntry.key)
            )
        else:
            statement = (
                update(ScratchEntry)
                .where(
                    ScratchEntry.task_id == task_id,
                    ScratchEntry.key == key,
                    ScratchEntry.revision == row.revision,
                )
                .values(**values)
                .returning(ScratchEntry.key)
                .execution_options(synchronize_session=False)
            )
        if (await session.execute(statement)).first() is None:
            raise _failed(await read(session, task_id, key), "the key changed while this write was made")
    return entry, row is None or row.deleted


async def _current_revision(gateway: Gateway, task_id: str, key: str) -> int:
    async with gateway.db.reading() as session:
        row = await read(session, task_id, key)
    return row.revision if row is not None and not row.deleted else 0


async def put(gateway: Gateway, request: Request) -> Response:
    principal = await gateway.tokens.verify(request.headers.get("authorization"))
    task_id, key = address_of(request)
    tags, create = _preconditions(request, creating_allowed=True)
    value = _value(await read_body(request, gateway.config.gateway.max_body_bytes))
    revision = await _current_revision(gateway, task_id, key)
    decision_id = await _authorize(gateway, request, principal, "put", task_id, key, value, revision)
    row, created = await _write(gateway, task_id, key, tags, create, principal.sub, value=value)
    headers = {"ETag": etag(row.revision), "Gateway-Decision-Id": decision_id}
    if created:
        headers["Location"] = request.url.path
    return JSONResponse(render(row), status_code=201 if created else 200, headers=headers)


async def remove(gateway: Gateway, request: Request) -> Response:
    principal = await gateway.tokens.verify(request.headers.get("authorization"))
    task_id, key = address_of(request)
    tags, _ = _preconditions(request, creating_allowed=False)
    revision = await _current_revision(gateway, task_id, key)
    decision_id = await _authorize(gateway, request, principal, "delete", task_id, key, None, revision)
    await _write(gateway, task_id, key, tags, False, principal.sub, delete=True)
    return Response(status_code=204, headers={"Gateway-Decision-Id": decision_id})
