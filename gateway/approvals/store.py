"""Approvals' state (contract §5): read, expire, decide and execute, with conditional UPDATEs.

    pending ──approve (the N-th distinct approver)──▶ approved ──▶ the commit runs once
       │  ──deny (any approver)─────────────────────▶ denied     (final)
       └──deadline passes (on read, decision, sweep)▶ expired    (final)

Every change is one transaction whose UPDATE names the state it expects
(`WHERE status = 'pending' AND expires_at > now`): of two approvers clicking at
once, in any number of gateway processes, exactly one moves the row, and the
other is told the approval is closed. The commit itself is run by
`gateway.commits.execute_commit`, whose own reservation makes it exactly once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import idempotency, ledger
from gateway.commits import execute_commit, settled_response
from gateway.idempotency import InProgress, KeyRef
from gateway.intents import Step, decide, load, tool_of
from gateway.problems import Conflict, Forbidden, NotFound, Unprocessable
from gateway.storage.models import Approval, ApprovalDecision, Intent

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.approvals")

PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"
STATUSES = (PENDING, APPROVED, DENIED, EXPIRED)
DECISIONS = {"approve": APPROVED, "deny": DENIED}
MAX_REASON = 2000
# An approved intent not yet executing after this long (its approver's request died) is run by the sweep.
RESUME_AFTER = timedelta(seconds=30)
GATEWAY_ACTOR = {"sub": "gateway", "role": "gateway"}


class ApprovalNotFound(NotFound):
    name, title = "approval-not-found", "No such approval"


class ApprovalClosed(Conflict):
    name, title = "approval-closed", "The approval is already decided; a decision is final"


class ApprovalExpired(Conflict):
    name, title = "approval-expired", "The approval expired before it was decided"


class AlreadyDecided(Conflict):
    name, title = "approval-already-decided", "This approver has already decided this approval"


class SelfApproval(Forbidden):
    name, title = "self-approval", "An approver may not decide an intent they proposed, verified or committed"


class DecisionInvalid(Unprocessable):
    name, title = "approval-decision-invalid", "The decision is malformed"


class _Lost(Exception):
    """The conditional UPDATE matched nothing: the approval closed or expired meanwhile."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert


def is_overdue(approval: Approval, now: datetime | None = None) -> bool:
    return approval.status == PENDING and ledger.utc(approval.expires_at) <= (now or utcnow())


def involved_subs(approval: Approval, intent: Intent) -> set[str]:
    """Everyone who proposed, verified or committed the intent: none of them may approve it."""
    parties = (intent.proposer, intent.verifier, intent.committer, approval.requested_by)
    return {str(party["sub"]) for party in parties if isinstance(party, dict) and party.get("sub")}


# --- reading ------------------------------------------------------------------------


@dataclass
class Loaded:
    approval: Approval
    intent: Intent
    decisions: list[ApprovalDecision]


def _stamp(value: datetime | None) -> str | None:
    return ledger.timestamp(value) if value is not None else None


def view(loaded: Loaded) -> dict[str, Any]:
    approval, intent = loaded.approval, loaded.intent
    settled = settled_response(intent)
    return {
        "approval_id": approval.approval_id,
        "intent_id": approval.intent_id,
        "task_id": intent.task_id,
        "tool": intent.tool,
        "arguments": intent.arguments,
        "status": approval.status,
        "approvals_required": approval.approvals_required,
        "approvals_given": approval.approvals_given,
        "reasons": approval.reasons,
        "requested_by": approval.requested_by,
        "proposer": intent.proposer,
        "verifier": intent.verifier,
        "committer": intent.committer,
        "verdict_reason": intent.verdict_reason,
        "created_at": _stamp(approval.created_at),
        "expires_at": _stamp(approval.expires_at),
        "decided_at": _stamp(approval.decided_at),
        "executed_at": _stamp(approval.executed_at),
        "decisions": [
            {"approver": d.approver, "decision": d.decision, "reason": d.reason, "at": _stamp(d.at)}
            for d in loaded.decisions
        ],
        "intent_status": intent.status,
        "result": None if settled is None else {"status": settled.status, "body": _json(settled.body)},
        "links": {
            "self": f"/approvals/{approval.approval_id}",
            "intent": f"/intents/{approval.intent_id}",
            "trace": f"/trace/{approval.intent_id}",
            "page": f"/ui/approvals/{approval.approval_id}",
        },
    }


def _json(body: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body


async def _decisions(session: AsyncSession, ids: list[str]) -> dict[str, list[ApprovalDecision]]:
    found: dict[str, list[ApprovalDecision]] = {approval_id: [] for approval_id in ids}
    if ids:
        rows = await session.execute(
            select(ApprovalDecision)
            .where(ApprovalDecision.approval_id.in_(ids))
            .order_by(ApprovalDecision.at, ApprovalDecision.id)
        )
        for decision in rows.scalars():
            found[decision.approval_id].append(decision)
    return found


async def get(gateway: Gateway, approval_id: str) -> Loaded:
    """One approval with its intent and decisions; an overdue one is expired first."""
    for _ in range(2):
        async with gateway.db.reading() as session:
            approval = await session.get(Approval, approval_id, populate_existing=True)
            if approval is None:
                raise ApprovalNotFound(f"no approval {approval_id!r}", approval_id=approval_id)
            if is_overdue(approval):
                await expire(gateway, approval_id)
                continue
            intent = await load(session, approval.intent_id)
            decisions = (await _decisions(session, [approval_id]))[approval_id]
        return Loaded(approval, intent, decisions)
    raise ApprovalNotFound(f"no approval {approval_id!r}", approval_id=approval_id)  # pragma: no cover


async def listing(gateway: Gateway, status: str | None, limit: int = 100) -> list[Loaded]:
    """Approvals, newest first, optionally of one status; overdue ones are expired first."""
    await expire_due(gateway)
    statement = select(Approval, Intent).join(Intent, Intent.intent_id == Approval.intent_id)
    if status is not None:
        statement = statement.where(Approval.status == status)
    statement = statement.order_by(Approval.created_at.desc()).limit(limit)
    async with gateway.db.reading() as session:
        rows = (await session.execute(statement)).all()
        decisions = await _decisions(session, [approval.approval_id for approval, _ in rows])
    return [Loaded(approval, intent, decisions[approval.approval_id]) for approval, intent in rows]


# --- expiry -------------------------------------------------------------------------


async def expire(gateway: Gateway, approval_id: str) -> bool:
    """pending → expired once past the deadline; the committer's key then answers 409 approval-expired."""
    now = utcnow()
    table = Approval.__table__
    async with gateway.db.transaction() as session:
        row = (
            await session.execute(
                update(table)
                .where(
                    table.c.approval_id == approval_id,
                    table.c.status == PENDING,
                    table.c.expires_at <= now,
                )
                .values(status=EXPIRED, decided_at=now)
                .returning(table.c.intent_id)
            )
        ).first()
        if row is None:
            return False
        approval = await session.get(Approval, approval_id, populate_existing=True)
        assert approval is not None
        intent = await _close_intent(session, approval, EXPIRED)
        await ledger.append(
            session,
            event="approval_expired",
            actor=GATEWAY_ACTOR,
            task_id=intent.task_id,
            intent_id=intent.intent_id,
            parent=intent.intent_id,
            trace_id=intent.trace_id,
            data={"approval_id": approval_id, "expires_at": ledger.timestamp(approval.expires_at)},
        )
    log.info("approval %s expired", approval_id)
    return True


async def expire_due(gateway: Gateway, limit: int = 200) -> int:
    async with gateway.db.reading() as session:
        due = (
            (
                await session.execute(
                    select(Approval.approval_id)
                    .where(Approval.status == PENDING, Approval.expires_at <= utcnow())
                    .limit(limit)
                )
            )
            .scalars()
            .all()
        )
    return sum([await expire(gateway, approval_id) for approval_id in due])


async def _close_intent(session: AsyncSession, approval: Approval, status: str) -> Intent:
    """Move the intent out of pending_approval with the approval, and settle the committer's key."""
    await session.execute(
        update(Intent)
        .where(Intent.intent_id == approval.intent_id, Intent.status == "pending_approval")
        .values(status=status, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    intent = await load(session, approval.intent_id, fresh=True)
    response = settled_response(intent)
    if response is not None:
        ref = KeyRef(approval.idempotency_scope, approval.idempotency_key, "")
        await idempotency.finish(session, ref, response)
    return intent


# --- decisions ----------------------------------------------------------------------


def parse_decision(payload: dict[str, Any]) -> tuple[str, str]:
    decision, reason = payload.get("decision"), payload.get("reason", "")
    if decision not in DECISIONS or not isinstance(reason, str) or set(payload) - {"decision", "reason"}:
        raise DecisionInvalid('the body is {decision: "approve"|"deny", reason: string}')
    if len(reason) > MAX_REASON:
        raise DecisionInvalid(f"reason is longer than {MAX_REASON} characters")
    if decision == "deny" and not reason.strip():
        raise DecisionInvalid("a denial needs a reason")
    return decision, reason


def approval_input(approval: Approval) -> dict[str, Any]:
    """What policy sees of the approval being decided."""
    return {
        "approval_id": approval.approval_id,
        "status": approval.status,
        "approvals_required": approval.approvals_required,
        "approvals_given": approval.approvals_given,
        "reasons": approval.reasons,
        "requested_by": approval.requested_by,
    }


async def decide_approval(
    gateway: Gateway, step: Step, approval_id: str, decision: str, reason: str
) -> Loaded:
    """Record one approver's decision; on the final approval run the commit (exactly once)."""
    principal = step.principal
    if principal.role != "approver":
        raise Forbidden("only the approver role may decide approvals", approval_id=approval_id)
    loaded = await get(gateway, approval_id)
    approval, intent = loaded.approval, loaded.intent
    if approval.status != PENDING:
        raise _closed(approval)
    if principal.sub in involved_subs(approval, intent):
        raise SelfApproval(
            f"{principal.sub!r} proposed, verified or committed this intent; another approver must decide",
            approval_id=approval_id,
            intent_id=intent.intent_id,
        )
    policy = await decide(
        gateway, step, "approve", tool_of(gateway, intent.tool), intent, approval=approval_input(approval)
    )
    try:
        final = await _record(gateway, step, approval, intent, decision, reason, policy.decision_id)
    except _Lost:
        current = await get(gateway, approval_id)
        raise _closed(current.approval) from None
    if final == APPROVED:
        await run_approved(gateway, approval_id, trigger=step.actor, trace=step.trace)
    return await get(gateway, approval_id)


def _closed(approval: Approval) -> Conflict:
    if approval.status == EXPIRED:
        return ApprovalExpired(
            f"approval {approval.approval_id} expired at {ledger.timestamp(approval.expires_at)}",
            approval_id=approval.approval_id,
            approval_status=approval.status,
        )
    return ApprovalClosed(
        f"approval {approval.approval_id} is already {approval.status}",
        approval_id=approval.approval_id,
        approval_status=approval.status,
    )


async def _record(
    gateway: Gateway,
    step: Step,
    approval: Approval,
    intent: Intent,
    decision: str,
    reason: str,
    decision_id: str,
) -> str | None:
    """One transaction: the decision row, the claim on the approval, the ledger. The new final state."""
    now = utcnow()
    table = Approval.__table__
    principal = step.principal
    async with gateway.db.transaction() as session:
        decisions = ApprovalDecision.__table__
        inserted = (
            await session.execute(
                _insert(session)(decisions)
                .values(
                    approval_id=approval.approval_id,
                    approver=principal.sub,
                    approver_iss=principal.iss,
                    decision=decision,
                    reason=reason,
                    at=now,
                )
                .on_conflict_do_nothing()
                .returning(decisions.c.id)
            )
        ).first()
        if inserted is None:
            raise AlreadyDecided(
                f"{principal.sub!r} has already decided approval {approval.approval_id}",
                approval_id=approval.approval_id,
            )
        claim = update(table).where(
            table.c.approval_id == approval.approval_id, table.c.status == PENDING, table.c.expires_at > now
        )
        if decision == "approve":
            claim = claim.values(approvals_given=table.c.approvals_given + 1)
        else:
            claim = claim.values(status=DENIED, decided_at=now)
        row = (
            await session.execute(claim.returning(table.c.approvals_given, table.c.approvals_required))
        ).first()
        if row is None:
            raise _Lost
        given, required = int(row[0]), int(row[1])
        final = DENIED if decision == "deny" else (APPROVED if given >= required else None)
        if final == APPROVED:
            await session.execute(
                update(table)
                .where(table.c.approval_id == approval.approval_id)
                .values(status=APPROVED, decided_at=now)
            )
        if final is not None:
            current = await session.get(Approval, approval.approval_id, populate_existing=True)
            assert current is not None
            closed = await _close_intent(session, current, final)
            if closed.status != final:
                raise Conflict(
                    f"the intent is {closed.status}, not pending_approval", intent_id=intent.intent_id
                )
        common = {
            "actor": principal,
            "task_id": intent.task_id,
            "intent_id": intent.intent_id,
            "decision_id": decision_id,
            "parent": intent.intent_id,
            "trace_id": step.trace.trace_id,
        }
        data = {"approval_id": approval.approval_id, "approvals_given": given, "approvals_required": required}
        await ledger.append(
            session,
            event="approval_decided",
            request_digest=ledger.digest(step.body) if step.body else None,
            data={**data, "decision": decision, "reason": reason},
            **common,
        )
        if final is not None:
            await ledger.append(session, event=f"approval_{final}", data=data, **common)
    return final


async def run_approved(
    gateway: Gateway, approval_id: str, *, trigger: dict[str, Any], trace: Any = None
) -> bool:
    """Run an approved intent's commit on the committer's behalf and key; True when this call saw it end.

    The committer's `Idempotency-Key` gets the result, so their retry returns it. Executing
    twice is impossible: `execute_commit` reserves `approved → executing` conditionally.
    """
    async with gateway.db.reading() as session:
        approval = await session.get(Approval, approval_id, populate_existing=True)
    if approval is None or approval.status != APPROVED:
        return False
    ref = KeyRef(approval.idempotency_scope, approval.idempotency_key, "")
    try:
        response = await execute_commit(
            gateway, approval.intent_id, actor=approval.requested_by, trace=trace, ref=ref
        )
    except InProgress:
        return False  # someone else is running it; they record approval_executed
    now = utcnow()
    table = Approval.__table__
    async with gateway.db.transaction() as session:
        marked = await session.execute(
            update(table)
            .where(table.c.approval_id == approval_id, table.c.executed_at.is_(None))
            .values(executed_at=now)
        )
        if marked.rowcount == 1:
            intent = await load(session, approval.intent_id, fresh=True)
            await ledger.append(
                session,
                event="approval_executed",
                actor=trigger,
                task_id=intent.task_id,
                intent_id=intent.intent_id,
                parent=intent.intent_id,
                trace_id=getattr(trace, "trace_id", None) or intent.trace_id,
                data={"approval_id": approval_id, "status": response.status, "intent_status": intent.status},
            )
    return True


async def resume_approved(gateway: Gateway) -> int:
    """Approvals whose approver's request died before the commit ran: run them now."""
    async with gateway.db.reading() as session:
        stuck = (
            (
                await session.execute(
                    select(Approval.approval_id).where(
                        Approval.status == APPROVED,
                        Approval.executed_at.is_(None),
                        Approval.decided_at <= utcnow() - RESUME_AFTER,
                    )
                )
            )
            .scalars()
            .all()
        )
    done = 0
    for approval_id in stuck:
        done += await run_approved(gateway, approval_id, trigger=GATEWAY_ACTOR)
    return done
