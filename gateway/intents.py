"""Intents (contract §4): propose, verify and read; `gateway.commits` runs them.

    POST /intents              planner   201 proposed (200: the same proposal again)
    POST /intents/{id}/verify  verifier  verified | rejected (a verifier never verifies its own)
    GET  /intents/{id}         anyone authenticated: status, history (from the ledger), result

An intent's id is derived from what it does, so the same proposal is the same intent:
`"in_"` + lowercase unpadded base32 of SHA-256 over the RFC 8785 canonical JSON of
{task_id, tool, arguments}.

Every route authenticates, verifies the handoff envelope (when one is sent; policy
decides whether one is required) and asks policy; the gateway enforces the
separation of duties on top of whatever the policy says.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway import canonical, ledger
from gateway.config import MEMORY_TOOL, Tool
from gateway.memory import names
from gateway.memory import store as memory_store
from gateway.pipeline import POLICY_VISIBLE_HEADERS
from gateway.problems import BadRequest, Conflict, Forbidden, NotFound, PolicyDenied, Unprocessable
from gateway.proxy import read_body
from gateway.ratelimits import tightest
from gateway.storage.models import Intent, LedgerEntry
from gateway.tracing import TraceContext, from_traceparent

if TYPE_CHECKING:
    from gateway.identity import Principal
    from gateway.policy import Decision
    from gateway.state import Gateway

PROPOSAL_FIELDS = {"task_id", "tool", "arguments", "compensation", "depends_on", "memory_writes"}


class IntentInvalid(Unprocessable):
    name, title = "intent-invalid", "The intent is malformed"


class UnknownTool(Unprocessable):
    name, title = "unknown-tool", "No such tool is configured"


class WrongState(Conflict):
    name, title = "intent-state-conflict", "The intent is not in a state that allows this step"


def intent_id(task_id: str, tool: str, arguments: Any, memory: dict[str, Any] | None = None) -> str:
    """`memory`: the proposal's `depends_on` and `memory_writes`, hashed in when present,
    so a proposal that writes other values (a revised goal) is another intent."""
    content = {"task_id": task_id, "tool": tool, "arguments": arguments}
    content.update({name: value for name, value in (memory or {}).items() if value is not None})
    try:
        text = canonical.dumps(content)
    except canonical.CanonicalizationError as error:
        raise IntentInvalid(f"arguments cannot be canonicalized (RFC 8785): {error}") from None
    return "in_" + base64.b32encode(hashlib.sha256(text).digest()).decode().rstrip("=").lower()


def now() -> datetime:
    return datetime.now(UTC)


class Unread:
    """A value the caller has not read (unlike None, which can be a value read)."""


UNREAD = Unread()


@dataclass
class Step:
    """One authenticated protocol request: who, under which trace, with which envelope."""

    request: Request
    principal: Principal
    trace: TraceContext
    body: bytes
    envelope: dict[str, Any] | None = None

    @property
    def actor(self) -> dict[str, str]:
        return {"sub": self.principal.sub, "role": self.principal.role, "iss": self.principal.iss}


async def begin(gateway: Gateway, request: Request) -> Step:
    principal = await gateway.tokens.verify(request.headers.get("authorization"))
    request.state.principal = principal  # an authenticated refusal is ledgered (gateway.refusals)
    trace = from_traceparent(request.headers.get("traceparent"))
    body = await read_body(request, gateway.config.gateway.max_body_bytes)
    return Step(request, principal, trace, body)


async def check_envelope(
    gateway: Gateway, step: Step, task_id: str, *, goal_revision: int | None | Unread = UNREAD
) -> None:
    """`goal_revision`: the task goal's current revision, when the caller read it with the intent."""
    known = None if isinstance(goal_revision, Unread) else (task_id, goal_revision)
    envelope = await gateway.envelopes.verify(
        step.request.headers.get("agent-handoff"), step.principal, known_goal=known
    )
    if envelope is not None and envelope.task_id != task_id:
        raise Unprocessable(
            f"the handoff envelope is for task {envelope.task_id!r}, not {task_id!r}", name="envelope-invalid"
        )
    step.envelope = envelope.claims if envelope is not None else None


def json_body(step: Step, *, required: bool = True) -> dict[str, Any]:
    if not step.body.strip():
        if required:
            raise BadRequest("a JSON object body is required")
        return {}
    try:
        payload = json.loads(step.body)
    except ValueError as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise IntentInvalid("the body must be a JSON object")
    return payload


def tool_of(gateway: Gateway, name: Any) -> Tool:
    tool = gateway.config.tool(name) if isinstance(name, str) else None
    if tool is None:
        raise UnknownTool(f"no tool named {name!r} is configured")
    return tool


def summary(intent: Intent) -> dict[str, Any]:
    """What policy sees of an intent."""
    return {
        "intent_id": intent.intent_id,
        "task_id": intent.task_id,
        "tool": intent.tool,
        "status": intent.status,
        "proposer": intent.proposer,
        "verifier": intent.verifier,
        "compensation": intent.compensation,
        "depends_on": intent.depends_on,
        "memory_writes": intent.memory_writes,
        "parent": intent.parent,
    }


async def decide(
    gateway: Gateway,
    step: Step,
    action: str,
    tool: Tool,
    intent: Intent,
    arguments: Any = None,
    approval: dict[str, Any] | None = None,
) -> Decision:
    headers = {
        name: step.request.headers[name] for name in POLICY_VISIBLE_HEADERS if name in step.request.headers
    }
    # The commit path's rate-limit stage: a commit reaches the tool, so it counts like a call.
    usages = (
        await gateway.limiter.count(step.principal.sub, step.principal.role, tool.name)
        if action == "commit"
        else []
    )
    decision = await gateway.policy.decide(
        {
            "action": action,
            "principal": {"sub": step.principal.sub, "role": step.principal.role, "iss": step.principal.iss},
            "tool": {"name": tool.name, "effect": tool.effect, "risk": tool.risk},
            "arguments": intent.arguments if arguments is None else arguments,
            "envelope": step.envelope,
            "intent": summary(intent),
            "approval": approval,
            "memory": await memory_store.policy_memory(gateway.db, intent, step.envelope),
            "request": {"method": step.request.method, "path": step.request.url.path, "headers": headers},
            "time": now().isoformat(),
            "rate_limit": tightest(usages),
        }
    )
    if not decision.allow:
        raise PolicyDenied(
            "; ".join(decision.reasons) or "denied by policy",
            decision_id=decision.decision_id,
            reasons=decision.reasons,
            intent_id=intent.intent_id,
        )
    return decision


async def load(session: AsyncSession, intent_id: str, *, fresh: bool = False) -> Intent:
    statement = select(Intent).where(Intent.intent_id == intent_id)
    if fresh:
        statement = statement.execution_options(populate_existing=True)
    intent = (await session.execute(statement)).scalar_one_or_none()
    if intent is None:
        raise NotFound(f"no intent {intent_id!r}", intent_id=intent_id)
    return intent


async def require_fresh(session: AsyncSession, intent: Intent) -> None:
    """409 stale-dependency when a `depends_on` revision or a write's `if_revision` no longer holds."""
    await memory_store.require_fresh(session, intent)


# --- the proposal -------------------------------------------------------------------


def _check_proposal(gateway: Gateway, payload: dict[str, Any]) -> Tool:
    unknown = sorted(set(payload) - PROPOSAL_FIELDS)
    missing = sorted({"task_id", "tool"} - set(payload))
    if unknown or missing:
        raise IntentInvalid(
            f"unknown fields {unknown}, missing fields {missing}", unknown=unknown, missing=missing
        )
    task_id = payload["task_id"]
    if not isinstance(task_id, str) or not 0 < len(task_id) <= 255:
        raise IntentInvalid("task_id must be a string of 1 to 255 characters")
    tool = tool_of(gateway, payload["tool"])
    gateway.schemas.validate(tool.name, payload.get("arguments", {}))
    compensation = payload.get("compensation")
    if compensation is not None:
        if not isinstance(compensation, dict) or not {"tool"} <= set(compensation) <= {"tool", "arguments"}:
            raise IntentInvalid("compensation must be {tool, arguments}")
        gateway.schemas.validate(
            tool_of(gateway, compensation["tool"]).name, compensation.get("arguments", {})
        )
    errors = names.dependency_errors(payload.get("depends_on"))
    errors += names.write_errors(payload.get("memory_writes"), task_id)
    if tool.name == MEMORY_TOOL.name and not payload.get("memory_writes"):
        errors.append(f"{MEMORY_TOOL.name} writes memory: memory_writes is required")
    if compensation is not None and compensation["tool"] == MEMORY_TOOL.name:
        errors.append(f"{MEMORY_TOOL.name} cannot compensate: memory is written only forward")
    if errors:
        raise IntentInvalid("; ".join(errors), errors=errors)
    return tool


def view(intent: Intent, history: list[LedgerEntry] | None = None) -> dict[str, Any]:
    result = json.loads(intent.result_body) if intent.result_body is not None else None
    data: dict[str, Any] = {
        "intent_id": intent.intent_id,
        "task_id": intent.task_id,
        "tool": intent.tool,
        "arguments": intent.arguments,
        "compensation": intent.compensation,
        "depends_on": intent.depends_on,
        "memory_writes": intent.memory_writes,
        "parent": intent.parent,
        "status": intent.status,
        "proposer": intent.proposer,
        "verifier": intent.verifier,
        "committer": intent.committer,
        "verdict_reason": intent.verdict_reason,
        "result": None if result is None else {"status": intent.result_status, "body": result},
        "compensation_status": intent.compensation_status,
        "compensation_result": intent.compensation_result,
        "trace_id": intent.trace_id,
        "created_at": ledger.timestamp(intent.created_at),
        "updated_at": ledger.timestamp(intent.updated_at),
    }
    if history is not None:
        data["history"] = [
            {
                "seq": entry.seq,
                "event": entry.event,
                "at": ledger.timestamp(entry.at),
                "actor": {"sub": entry.actor_sub, "role": entry.actor_role},
                "decision_id": entry.decision_id,
                "data": entry.data,
            }
            for entry in history
        ]
    return data


async def propose(gateway: Gateway, request: Request) -> Response:
    step = await begin(gateway, request)
    payload = json_body(step)
    tool = _check_proposal(gateway, payload)
    arguments = payload.get("arguments", {})
    await check_envelope(gateway, step, payload["task_id"])
    at = now()
    deadline = datetime.fromtimestamp(step.envelope["exp"], UTC) if step.envelope else None
    intent = Intent(
        intent_id=intent_id(
            payload["task_id"],
            tool.name,
            arguments,
            {"depends_on": payload.get("depends_on"), "memory_writes": payload.get("memory_writes")},
        ),
        task_id=payload["task_id"],
        tool=tool.name,
        arguments=arguments,
        compensation=payload.get("compensation"),
        depends_on=payload.get("depends_on"),
        memory_writes=payload.get("memory_writes"),
        parent=(step.envelope or {}).get("parent") or payload["task_id"],
        status="proposed",
        proposer=step.actor,
        trace_id=step.trace.trace_id,
        deadline=deadline,
        created_at=at,
        updated_at=at,
    )
    decision = await decide(gateway, step, "propose", tool, intent, arguments)
    entry = {
        "event": "proposed",
        "actor": step.principal,
        "task_id": intent.task_id,
        "intent_id": intent.intent_id,
        "decision_id": decision.decision_id,
        "parent": intent.parent,
        "request_digest": ledger.digest(step.body),
        "trace_id": step.trace.trace_id,
        "data": {"tool": tool.name, "arguments_digest": ledger.digest(arguments)},
    }
    if gateway.db.dialect == "postgresql":
        from gateway.commits import onestatement  # the commits package builds on this module

        if await onestatement.propose(gateway.db, intent, ledger.new_entry(**entry)) is not None:
            return JSONResponse(view(intent), status_code=201, headers=_location(intent))
    table = Intent.__table__
    values = {column.name: getattr(intent, column.key) for column in table.columns}
    insert = pg_insert if gateway.db.dialect == "postgresql" else sqlite_insert
    async with gateway.db.transaction() as session:
        created = (
            await session.execute(
                insert(table).values(**values).on_conflict_do_nothing().returning(table.c.intent_id)
            )
        ).first()
        if created is None:
            existing = await load(session, intent.intent_id)
            return JSONResponse(view(existing), status_code=200, headers=_location(existing))
        await ledger.append(session, **entry)
    return JSONResponse(view(intent), status_code=201, headers=_location(intent))


def _location(intent: Intent) -> dict[str, str]:
    return {"Location": f"/intents/{intent.intent_id}"}


# --- verification -------------------------------------------------------------------


async def verify(gateway: Gateway, request: Request) -> Response:
    step = await begin(gateway, request)
    payload = json_body(step)
    verdict, reason = payload.get("verdict"), payload.get("reason")
    if verdict not in ("accept", "reject") or not isinstance(reason, str):
        raise IntentInvalid('the body is {verdict: "accept"|"reject", reason: string, checks?}')
    from gateway.commits import onestatement  # the commits package builds on this module

    intent_id = request.path_params["intent_id"]
    snapshot = await onestatement.read(gateway.db, intent_id)
    if snapshot is None:
        raise NotFound(f"no intent {intent_id!r}", intent_id=intent_id)
    intent = snapshot.intent
    await check_envelope(gateway, step, intent.task_id, goal_revision=snapshot.goal_revision)
    if intent.proposer.get("sub") == step.principal.sub and intent.proposer.get("iss") == step.principal.iss:
        raise Forbidden("an agent cannot verify an intent it proposed", intent_id=intent.intent_id)
    tool = tool_of(gateway, intent.tool)
    decision = await decide(gateway, step, "verify", tool, intent)
    status = "verified" if verdict == "accept" else "rejected"
    verdict_values = {
        "status": status,
        "verifier": step.actor,
        "verdict_reason": reason,
        "checks": payload.get("checks"),
        "updated_at": now(),
    }
    async with gateway.db.transaction() as session:
        if status == "verified":
            await require_fresh(session, intent)
        changed = await session.execute(
            update(Intent)
            .where(Intent.intent_id == intent.intent_id, Intent.status == "proposed")
            .values(**verdict_values)
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount != 1:
            current = await load(session, intent.intent_id, fresh=True)
            raise WrongState(
                f"the intent is {current.status}; only a proposed intent can be verified",
                intent_id=intent.intent_id,
                intent_status=current.status,
            )
        await ledger.append(
            session,
            event=status,
            actor=step.principal,
            task_id=intent.task_id,
            intent_id=intent.intent_id,
            decision_id=decision.decision_id,
            parent=intent.intent_id,
            request_digest=ledger.digest(step.body),
            trace_id=step.trace.trace_id,
            data={"reason": reason},
        )
    for name, value in verdict_values.items():  # what the UPDATE wrote: no second read
        setattr(intent, name, value)
    return JSONResponse(view(intent))


async def read(gateway: Gateway, request: Request) -> Response:
    await gateway.tokens.verify(request.headers.get("authorization"))
    async with gateway.db.reading() as session:
        intent = await load(session, request.path_params["intent_id"])
        history = (
            (
                await session.execute(
                    select(LedgerEntry)
                    .where(LedgerEntry.intent_id == intent.intent_id)
                    .order_by(LedgerEntry.seq)
                )
            )
            .scalars()
            .all()
        )
    return JSONResponse(view(intent, list(history)))


def routes(gateway: Gateway) -> list[BaseRoute]:
    from gateway.app import bind

    return [
        Route("/intents", bind(gateway, propose), methods=["POST"]),
        Route("/intents/{intent_id}/verify", bind(gateway, verify), methods=["POST"]),
        Route("/intents/{intent_id}", bind(gateway, read), methods=["GET"]),
    ]
