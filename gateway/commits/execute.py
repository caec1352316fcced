"""The commit (contract §4): reserve exactly once, call the tool once, store and replay.

    POST /intents/{id}/commit   (committer, Idempotency-Key)

One database transaction both claims the caller's key (a primary-key insert) and moves
the intent `verified → executing` with a conditional UPDATE; only the request whose
UPDATE matched a row calls the tool, whichever gateway process it reached. Everyone
else — the same key repeated, other keys, other processes — waits briefly for the
winner's stored result and gets exactly that result, stored under their own key too;
if the winner is still running after `commit_wait` seconds: 409 commit-in-progress.

The executing row names its executor (a gateway instance id); `recovery` turns intents
of an executor that died into `unknown`, never into a second call.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from gateway import canonical, idempotency, ledger
from gateway.commits import onestatement
from gateway.commits.upstream import DONE, UNKNOWN, Outcome, call_tool
from gateway.config import Tool
from gateway.idempotency import AWAITING_APPROVAL, KeyRef, StoredResponse
from gateway.intents import begin, check_envelope, decide, load, now, require_fresh, tool_of
from gateway.memory.commits import MEMORY_TOOL, MemoryBusy, builtin_result
from gateway.problems import PROBLEM_BASE, Conflict, Forbidden, GatewayError, NotFound
from gateway.storage.models import Approval, IdempotencyRecord, Intent
from gateway.tracing import TraceContext

if TYPE_CHECKING:
    from gateway.policy import Decision
    from gateway.state import Gateway

log = logging.getLogger("gateway.commits")

# States a commit may reserve from (the one-statement reservation has them written in).
RESERVABLE = ("verified", "approved")
# States whose stored result is final: every later commit replays it.
SETTLED = frozenset({"committed", "failed", "unknown", "compensating", "compensated"})


class NotVerified(Conflict):
    name, title = "intent-not-verified", "Only a verified intent can be committed"


class _Busy(Exception):
    """The intent is executing elsewhere: wait for its result."""


class _Held(Exception):
    def __init__(self, record: IdempotencyRecord) -> None:
        self.record = record


def problem(status: int, name: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": PROBLEM_BASE + name, "title": title, "status": status, "detail": detail, **extra}


def render(intent_id: str, status: str, outcome: Outcome) -> StoredResponse:
    headers = {"gateway-intent-id": intent_id}
    if "error" in outcome.result:
        body = problem(
            outcome.http_status,
            "upstream-unavailable",
            "Tool upstream unavailable",
            outcome.result["error"],
            intent_id=intent_id,
            intent_status=status,
        )
        return StoredResponse.json(outcome.http_status, body, headers)
    return StoredResponse.json(
        200, {"intent_id": intent_id, "status": status, "result": outcome.result}, headers
    )


def settled_response(intent: Intent) -> StoredResponse | None:
    """The answer every commit of this intent gets from now on, if there is one yet."""
    if intent.status in SETTLED and intent.result_body is not None and intent.result_status is not None:
        headers = {
            "content-type": intent.result_content_type or "application/json",
            "gateway-intent-id": intent.intent_id,
        }
        return StoredResponse(intent.result_status, intent.result_body, headers)
    if intent.status in ("denied", "expired"):
        status, name = (403, "approval-denied") if intent.status == "denied" else (409, "approval-expired")
        body = problem(
            status,
            name,
            "Commit not approved",
            f"the approval of this intent was {intent.status}",
            intent_id=intent.intent_id,
            intent_status=intent.status,
        )
        return StoredResponse.json(status, body, {"gateway-intent-id": intent.intent_id})
    return None


@dataclass
class Ticket:
    """The reservation's answer: run the tool (response None), or answer with `response`."""

    response: StoredResponse | None = None
    replayed: bool = False
    executed: bool = False  # `response` is the outcome of this caller's own tool call


async def _pending_approval(session: AsyncSession, intent: Intent) -> StoredResponse | None:
    approval = (
        await session.execute(
            select(Approval)
            .where(Approval.intent_id == intent.intent_id, Approval.status == "pending")
            .order_by(Approval.created_at.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    return None if approval is None else approval_accepted(approval)


def approval_accepted(approval: Approval) -> StoredResponse:
    body = {
        "status": "pending_approval",
        "approval_id": approval.approval_id,
        "intent_id": approval.intent_id,
    }
    return StoredResponse.json(202, body, {"location": f"/approvals/{approval.approval_id}"})


async def _request_approval(
    gateway: Gateway,
    session: AsyncSession,
    intent: Intent,
    ref: KeyRef,
    actor: dict[str, Any],
    decision: Decision,
    trace: TraceContext,
) -> StoredResponse | None:
    """verified → pending_approval with an `approvals` row; the approvals module takes over."""
    changed = await session.execute(
        update(Intent)
        .where(Intent.intent_id == intent.intent_id, Intent.status == "verified")
        .values(status="pending_approval", committer=actor, updated_at=now())
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount == 1:
        at = now()
        expires = at + timedelta(seconds=gateway.config.gateway.approval_ttl_seconds)
        if intent.deadline is not None:
            expires = min(expires, ledger.utc(intent.deadline))
        approval = Approval(
            approval_id="ap_" + secrets.token_hex(12),
            intent_id=intent.intent_id,
            status="pending",
            approvals_required=max(1, decision.approvals_required),
            reasons=decision.reasons,
            requested_by=actor,
            idempotency_scope=ref.scope,
            idempotency_key=ref.key,
            created_at=at,
            expires_at=expires,
            decided_at=None,
        )
        session.add(approval)
        await session.flush()
        await idempotency.finish(session, ref, approval_accepted(approval), state=AWAITING_APPROVAL)
        await ledger.append(
            session,
            event="approval_requested",
            actor=actor,
            task_id=intent.task_id,
            intent_id=intent.intent_id,
            decision_id=decision.decision_id,
            parent=intent.intent_id,
            trace_id=trace.trace_id,
            data={
                "approval_id": approval.approval_id,
                "approvals_required": approval.approvals_required,
                "reasons": decision.reasons,
            },
        )
        return approval_accepted(approval)
    response = await _pending_approval(session, intent)
    if response is not None:
        await idempotency.finish(session, ref, response, state=AWAITING_APPROVAL)
    return response


async def _reserve_once(
    gateway: Gateway,
    intent: Intent,
    ref: KeyRef | None,
    *,
    actor: dict[str, Any],
    trace: TraceContext,
    decision: Decision | None,
    allowed: tuple[str, ...],
    request_digest: str | None,
) -> Ticket:
    async with gateway.db.transaction() as session:
        # Locks in one order, intent then key then ledger head, as `onestatement.reserve` takes them.
        await session.execute(
            select(Intent.intent_id).where(Intent.intent_id == intent.intent_id).with_for_update()
        )
        if ref is not None:
            held = await idempotency.claim(
                session,
                ref,
                intent_id=intent.intent_id,
                owner=gateway.instance_id,
                ttl=gateway.config.gateway.idempotency_ttl_seconds,
            )
            if held is not None:
                raise _Held(held)
        await require_fresh(session, intent)
        if decision is not None and decision.require_approval and ref is not None:
            response = await _request_approval(gateway, session, intent, ref, actor, decision, trace)
            if response is not None:
                return Ticket(response)
            allowed = ("approved",)
        changed = await session.execute(
            update(Intent)
            .where(Intent.intent_id == intent.intent_id, Intent.status.in_(allowed))
            .values(
                status="executing",
                executor=gateway.instance_id,
                executing_since=now(),
                committer=actor,
                updated_at=now(),
            )
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount == 1:
            for hook in gateway.reserve_hooks:  # memory: claim the keys the intent writes
                await hook(session, intent)
            await ledger.append(
                session,
                event="commit_started",
                actor=actor,
                task_id=intent.task_id,
                intent_id=intent.intent_id,
                decision_id=decision.decision_id if decision else None,
                parent=intent.intent_id,
                request_digest=request_digest,
                trace_id=trace.trace_id,
                data={"executor": gateway.instance_id},
            )
            return Ticket()
        current = await load(session, intent.intent_id, fresh=True)
        response = settled_response(current)
        if response is None and current.status == "pending_approval":
            response = await _pending_approval(session, current)
        if response is not None:
            if ref is not None:
                state = AWAITING_APPROVAL if response.status == 202 else idempotency.DONE
                await idempotency.finish(session, ref, response, state=state)
            return Ticket(response, replayed=True)
        if current.status in ("executing", "approved", "pending_approval"):
            raise _Busy
        raise NotVerified(
            f"the intent is {current.status}; only a verified intent can be committed",
            intent_id=intent.intent_id,
            intent_status=current.status,
        )


async def _settle_key(gateway: Gateway, ref: KeyRef, record: IdempotencyRecord) -> StoredResponse:
    """A key someone already holds: its stored answer, or the intent's once it settles."""
    response = idempotency.stored(record)
    if record.state == idempotency.DONE and response is not None:
        return response
    async with gateway.db.reading() as session:
        intent = await session.get(Intent, record.intent_id) if record.intent_id else None
    settled = settled_response(intent) if intent is not None else None
    if settled is not None:
        async with gateway.db.transaction() as session:
            await idempotency.finish(session, ref, settled)
        return settled
    if response is not None and record.state == AWAITING_APPROVAL:
        return response
    raise _Busy


async def _reserve_in_one_statement(
    gateway: Gateway,
    intent: Intent,
    ref: KeyRef,
    actor: dict[str, Any],
    trace: TraceContext,
    decision: Decision,
    request_digest: str | None,
) -> bool:
    """The common case in one round trip; False when the general path must decide."""
    if not onestatement.applies(gateway.db, intent):
        return False
    started = ledger.new_entry(
        event="commit_started",
        actor=actor,
        task_id=intent.task_id,
        intent_id=intent.intent_id,
        decision_id=decision.decision_id,
        parent=intent.intent_id,
        request_digest=request_digest,
        trace_id=trace.trace_id,
        data={"executor": gateway.instance_id},
    )
    entry = await onestatement.reserve(
        gateway.db,
        intent,
        ref,
        executor=gateway.instance_id,
        ttl=gateway.config.gateway.idempotency_ttl_seconds,
        committer=actor,
        started=started,
    )
    return entry is not None


async def reserve(
    gateway: Gateway,
    intent: Intent,
    ref: KeyRef | None,
    *,
    actor: dict[str, Any],
    trace: TraceContext,
    decision: Decision | None,
    allowed: tuple[str, ...] = RESERVABLE,
    request_digest: str | None = None,
) -> Ticket:
    if ref is not None and decision is not None and not decision.require_approval and allowed == RESERVABLE:
        if await _reserve_in_one_statement(gateway, intent, ref, actor, trace, decision, request_digest):
            return Ticket()
    deadline = time.monotonic() + gateway.commit_wait
    pause = 0.01
    while True:
        try:
            try:
                return await _reserve_once(
                    gateway,
                    intent,
                    ref,
                    actor=actor,
                    trace=trace,
                    decision=decision,
                    allowed=allowed,
                    request_digest=request_digest,
                )
            except _Held as held:
                assert ref is not None
                return Ticket(await _settle_key(gateway, ref, held.record), replayed=True)
        except (_Busy, MemoryBusy) as busy:
            if time.monotonic() >= deadline or gateway.stopping:
                if isinstance(busy, MemoryBusy):
                    raise
                raise idempotency.InProgress(
                    "this intent is being committed right now; retry shortly for its stored result",
                    intent_id=intent.intent_id,
                    headers={"Retry-After": "1"},
                ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)


def _outcome_fields(
    intent: Intent,
    status: str,
    outcome: Outcome,
    actor: dict[str, Any],
    trace: TraceContext,
    decision_id: str | None,
) -> dict[str, Any]:
    """The ledger entry recording a commit's outcome."""
    return {
        "event": status,
        "actor": actor,
        "task_id": intent.task_id,
        "intent_id": intent.intent_id,
        "decision_id": decision_id,
        "parent": intent.intent_id,
        "trace_id": trace.trace_id,
        "effect_digest": ledger.digest(outcome.raw) if outcome.kind != UNKNOWN else None,
        "data": {key: value for key, value in outcome.result.items() if key in ("status", "error")},
    }


async def _finalize(
    gateway: Gateway,
    intent: Intent,
    status: str,
    outcome: Outcome,
    response: StoredResponse,
    ref: KeyRef | None,
    actor: dict[str, Any],
    trace: TraceContext,
    decision_id: str | None,
    hooks: bool,
) -> None:
    if onestatement.applies(gateway.db, intent):
        fields = _outcome_fields(intent, status, outcome, actor, trace, decision_id)
        recorded = await onestatement.record(
            gateway.db,
            intent,
            ref,
            response,
            status=status,
            executor=gateway.instance_id,
            outcome=ledger.new_entry(**fields),
        )
        if recorded is not None:
            return
    async with gateway.db.transaction() as session:
        changed = await session.execute(
            update(Intent)
            .where(
                Intent.intent_id == intent.intent_id,
                Intent.executor == gateway.instance_id,
                Intent.status.in_(("executing", "unknown")),
            )
            .values(
                status=status,
                result_status=response.status,
                result_body=response.body,
                result_content_type=response.headers.get("content-type"),
                updated_at=now(),
            )
            .execution_options(synchronize_session=False)
        )
        if ref is not None:
            await idempotency.finish(session, ref, response)
        if changed.rowcount == 1:  # the ledger last: its head stays locked until COMMIT
            entry = await ledger.append(
                session, **_outcome_fields(intent, status, outcome, actor, trace, decision_id)
            )
            if status == "committed":
                for hook in gateway.commit_hooks if hooks else ():
                    await hook(session, intent, entry)


async def execute(
    gateway: Gateway,
    intent: Intent,
    tool: Tool,
    *,
    ref: KeyRef | None,
    actor: dict[str, Any],
    trace: TraceContext,
    decision_id: str | None,
) -> StoredResponse:
    """Call the tool for a reserved intent and record what happened (inside `reserve_and_execute`)."""
    started = time.perf_counter()
    if tool.name == MEMORY_TOOL:  # no upstream: its effect is the memory writes, applied below
        result = builtin_result(intent)
        outcome = Outcome(DONE, result, canonical.dumps(result))
    else:
        outcome = await call_tool(
            gateway,
            tool,
            intent.arguments,
            idempotency_key=intent.intent_id,
            call_id=intent.intent_id,
            trace=trace,
            principal=actor,
        )
    recording = time.perf_counter()
    gateway.metrics.stage["upstream"].observe(recording - started)
    status = {DONE: "committed", UNKNOWN: "unknown"}.get(outcome.kind, "failed")
    gateway.metrics.commit(status)
    response = render(intent.intent_id, status, outcome)
    for attempt in range(5):
        try:
            await _finalize(
                gateway,
                intent,
                status,
                outcome,
                response,
                ref,
                actor,
                trace,
                decision_id,
                hooks=attempt < 4,
            )
            break
        except Exception:  # noqa: BLE001 - the effect happened; keep trying to record it
            log.exception("recording the outcome of %s failed (attempt %d)", intent.intent_id, attempt + 1)
            await asyncio.sleep(0.2 * (attempt + 1))
    gateway.metrics.stage["record"].observe(time.perf_counter() - recording)
    return response


async def reserve_and_execute(
    gateway: Gateway,
    intent: Intent,
    tool: Tool,
    ref: KeyRef | None,
    *,
    actor: dict[str, Any],
    trace: TraceContext,
    decision: Decision | None,
    decision_id: str | None = None,
    allowed: tuple[str, ...] = RESERVABLE,
    request_digest: str | None = None,
    answer_ref: KeyRef | None = None,
) -> Ticket:
    """Reserve, and execute if this caller won: one unit a cancelled request never cuts.

    A reservation can commit on the server although its caller was cancelled or lost the
    reply; cut there, the intent would stay `executing` with nobody to run it. So the
    unit runs to completion (shielded, awaited by a clean stop), and while it runs the
    intent counts in `gateway.in_flight`: an `executing` intent of this instance that is
    not in flight is one nothing will finish, and the recovery sweep marks it `unknown`.

    `ref` is the key claimed with the reservation; the outcome is stored under
    `answer_ref` when given (an approved commit claims no key but answers the committer's).
    """

    async def run() -> Ticket:
        with gateway.working_on(intent.intent_id):
            ticket = await reserve(
                gateway,
                intent,
                ref,
                actor=actor,
                trace=trace,
                decision=decision,
                allowed=allowed,
                request_digest=request_digest,
            )
            if ticket.response is not None:
                return ticket
            response = await execute(
                gateway,
                intent,
                tool,
                ref=answer_ref or ref,
                actor=actor,
                trace=trace,
                decision_id=decision.decision_id if decision is not None else decision_id,
            )
            return Ticket(response, executed=True)

    return await gateway.complete(run())


async def execute_commit(
    gateway: Gateway,
    intent_id: str,
    *,
    actor: dict[str, Any],
    trace: TraceContext | None = None,
    ref: KeyRef | None = None,
    decision_id: str | None = None,
) -> StoredResponse:
    """Run an `approved` intent exactly once; the approvals module calls this on the final approval.

    `ref` is the committer's key (the approval row's idempotency scope and key): its stored
    answer becomes the result, so the committer's retry returns it.
    """
    from gateway.tracing import from_traceparent

    trace = trace or from_traceparent(None)
    async with gateway.db.reading() as session:
        intent = await load(session, intent_id)
    tool = tool_of(gateway, intent.tool)
    ticket = await reserve_and_execute(
        gateway,
        intent,
        tool,
        None,
        actor=actor,
        trace=trace,
        decision=None,
        decision_id=decision_id,
        allowed=("approved",),
        answer_ref=ref,
    )
    assert ticket.response is not None
    if not ticket.executed and ref is not None:  # settled before: the key gets that answer
        async with gateway.db.transaction() as session:
            await idempotency.finish(session, ref, ticket.response)
    return ticket.response


async def commit(gateway: Gateway, request: Request) -> Response:
    step = await begin(gateway, request)
    if step.principal.role != "committer":
        raise Forbidden("only the committer role may commit", intent_id=request.path_params["intent_id"])
    key = idempotency.parse_key(request.headers.get(idempotency.HEADER))
    intent_id = request.path_params["intent_id"]
    scope = idempotency.caller_scope(step.principal.iss, step.principal.sub)
    ref = KeyRef(scope, key, idempotency.fingerprint(intent_id, step.body))
    snapshot = await onestatement.read(gateway.db, intent_id, ref)
    if snapshot is None:  # no such intent: a 404, unless the key already has its answer
        async with gateway.db.reading() as session:
            record = await idempotency.lookup(session, ref)
    else:
        record = idempotency.live(snapshot.record, ref)
    replay = idempotency.stored(record) if record is not None and record.state == idempotency.DONE else None
    if replay is not None:
        return replay.to_response(replayed=True)
    if snapshot is None:
        raise NotFound(f"no intent {intent_id!r}", intent_id=intent_id)
    intent = snapshot.intent
    await check_envelope(gateway, step, intent.task_id, goal_revision=snapshot.goal_revision)
    tool = tool_of(gateway, intent.tool)
    decision = await decide(gateway, step, "commit", tool, intent)
    ticket = await reserve_and_execute(
        gateway,
        intent,
        tool,
        ref,
        actor=step.actor,
        trace=step.trace,
        decision=decision,
        request_digest=ledger.digest(step.body),
    )
    assert ticket.response is not None
    extra = {"Gateway-Decision-Id": decision.decision_id}
    return ticket.response.to_response(replayed=ticket.replayed, extra=extra)


def unknown_after_crash(
    intent_id: str, cause: str = "the gateway instance executing this commit stopped mid-call"
) -> StoredResponse:
    detail = cause + "; the outcome is unknown and it is not retried"
    error = GatewayError(detail, status=502, name="commit-outcome-unknown", title="Commit outcome unknown")
    return StoredResponse.json(
        502, error.to_problem(intent_id=intent_id, intent_status="unknown"), {"gateway-intent-id": intent_id}
    )
