"""Compensation, the saga's undo (contract §4).

    POST /tasks/{task_id}/compensate   (committer, Idempotency-Key)

Runs the compensating call of each committed intent of the task in reverse commit
order (the `committed` ledger seq). The compensating call is the intent's own
`compensation: {tool, arguments}`, else the tool's configured `compensation` tool
with the same arguments; an intent with neither is reported as `skipped`.

Each step is claimed with a conditional UPDATE (`committed → compensating`, or a step
that failed before this request began), so concurrent requests never run a step
twice: one that finds a step running elsewhere waits for it. A step that fails stops
the walk — earlier steps must not be undone out of order — and stays retryable by a
later request with a new key. States: committed → compensating → compensated.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update
from starlette.requests import Request
from starlette.responses import Response

from gateway import idempotency, ledger
from gateway.commits.upstream import DONE, UNKNOWN, call_tool
from gateway.config import Tool
from gateway.idempotency import KeyRef, StoredResponse
from gateway.intents import Step, begin, check_envelope, decide, now, tool_of
from gateway.problems import Conflict, Forbidden, NotFound
from gateway.storage.models import Intent, LedgerEntry

if TYPE_CHECKING:
    from gateway.state import Gateway

COMPENSABLE = ("committed", "compensating", "compensated")


class CompensationInProgress(Conflict):
    name, title = "compensation-in-progress", "This task is being compensated right now"


def compensating_call(gateway: Gateway, intent: Intent) -> tuple[Tool, Any] | None:
    if intent.compensation:
        return tool_of(gateway, intent.compensation["tool"]), intent.compensation.get("arguments", {})
    configured = gateway.config.tool(intent.tool)
    if configured is None or not configured.compensation:
        return None
    return tool_of(gateway, configured.compensation), intent.arguments


async def _task_intents(gateway: Gateway, task_id: str) -> list[Intent]:
    """The task's intents, newest commit first (commit order is the `committed` ledger seq)."""
    async with gateway.db.reading() as session:
        found = await session.execute(
            select(Intent).where(Intent.task_id == task_id).execution_options(populate_existing=True)
        )
        rows = list(found.scalars().all())
        seqs = await session.execute(
            select(LedgerEntry.intent_id, LedgerEntry.seq).where(
                LedgerEntry.task_id == task_id, LedgerEntry.event == "committed"
            )
        )
        committed = {intent_id: seq for intent_id, seq in seqs.all()}
    return sorted(rows, key=lambda intent: committed.get(intent.intent_id, 0), reverse=True)


def _summary(task_id: str, intents: list[Intent], plan: dict[str, Any]) -> StoredResponse:
    steps = []
    for intent in (i for i in intents if i.status in COMPENSABLE):
        call = plan.get(intent.intent_id)
        steps.append(
            {
                "intent_id": intent.intent_id,
                "tool": intent.tool,
                "compensation_tool": call[0].name if call else None,
                "status": intent.status if call else "skipped",
                "compensation_status": intent.compensation_status,
                "result": intent.compensation_result,
            }
        )
    failed = [step for step in steps if step["compensation_status"] in ("failed", "unknown")]
    pending = [step for step in steps if step["status"] == "committed" and step["compensation_tool"]]
    status = "compensation_failed" if failed else ("partial" if pending else "compensated")
    return StoredResponse.json(200, {"task_id": task_id, "status": status, "steps": steps})


async def _claim(gateway: Gateway, intent: Intent, retryable: set[str], step: Step) -> int | None:
    """Claim one step; its attempt number, or None if it is not ours to run."""
    condition = Intent.status == "committed"
    if intent.intent_id in retryable:
        condition = or_(
            condition, (Intent.status == "compensating") & (Intent.compensation_status == "failed")
        )
    attempt = int((intent.compensation_result or {}).get("attempt", 0)) + 1
    async with gateway.db.transaction() as session:
        changed = await session.execute(
            update(Intent)
            .where(Intent.intent_id == intent.intent_id, condition)
            .values(
                status="compensating",
                compensation_status="running",
                compensation_executor=gateway.instance_id,
                updated_at=now(),
            )
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount != 1:
            return None
        await ledger.append(
            session,
            event="compensation_started",
            actor=step.principal,
            task_id=intent.task_id,
            intent_id=intent.intent_id,
            parent=intent.intent_id,
            trace_id=step.trace.trace_id,
            data={"attempt": attempt},
        )
    return attempt


async def _run_step(
    gateway: Gateway, intent: Intent, call: tuple[Tool, Any], attempt: int, step: Step
) -> bool:
    tool, arguments = call
    outcome = await call_tool(
        gateway,
        tool,
        arguments,
        idempotency_key=f"{intent.intent_id}.compensation.{attempt}",
        call_id=f"{intent.intent_id}.compensation",
        trace=step.trace,
        principal=step.principal,
        intent_id=intent.intent_id,
    )
    ok = outcome.kind == DONE
    state = "done" if ok else ("unknown" if outcome.kind == UNKNOWN else "failed")
    async with gateway.db.transaction() as session:
        changed = await session.execute(
            update(Intent)
            .where(
                Intent.intent_id == intent.intent_id,
                Intent.compensation_status == "running",
                Intent.compensation_executor == gateway.instance_id,
            )
            .values(
                status="compensated" if ok else "compensating",
                compensation_status=state,
                compensation_result={"attempt": attempt, "tool": tool.name, **outcome.result},
                updated_at=now(),
            )
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount == 1:
            await ledger.append(
                session,
                event="compensated" if ok else "compensation_failed",
                actor=step.principal,
                task_id=intent.task_id,
                intent_id=intent.intent_id,
                parent=intent.intent_id,
                trace_id=step.trace.trace_id,
                effect_digest=ledger.digest(outcome.raw) if ok else None,
                data={
                    "attempt": attempt,
                    "tool": tool.name,
                    **{k: v for k, v in outcome.result.items() if k in ("status", "error")},
                },
            )
    return ok


async def _walk(
    gateway: Gateway, task_id: str, plan: dict[str, Any], retryable: set[str], step: Step
) -> None:
    deadline = time.monotonic() + gateway.config.gateway.timeouts.read + gateway.commit_wait
    while True:
        intents = await _task_intents(gateway, task_id)
        order = [i for i in intents if i.status in COMPENSABLE and i.intent_id in plan]
        waiting = False
        for intent in order:
            if intent.status == "compensated":
                continue
            if intent.compensation_status == "running":
                waiting = True  # someone else runs this step; the earlier ones must wait for it
                break
            if intent.compensation_status in ("failed", "unknown") and intent.intent_id not in retryable:
                return  # failed during this request, or its outcome is unknown: stop here
            with gateway.working_on(intent.intent_id):  # from before the claim: the sweep's cue
                attempt = await _claim(gateway, intent, retryable, step)
                if attempt is None:
                    waiting = True
                    break
                retryable.discard(intent.intent_id)
                if not await _run_step(gateway, intent, plan[intent.intent_id], attempt, step):
                    return
        if not waiting:
            return
        if time.monotonic() > deadline or gateway.stopping:
            raise CompensationInProgress(
                f"task {task_id!r} is being compensated by another request", headers={"Retry-After": "1"}
            )
        await asyncio.sleep(0.05)


async def compensate(gateway: Gateway, request: Request) -> Response:
    step = await begin(gateway, request)
    task_id = request.path_params["task_id"]
    if step.principal.role != "committer":
        raise Forbidden("only the committer role may compensate")
    key = idempotency.parse_key(request.headers.get(idempotency.HEADER))
    scope = idempotency.caller_scope(step.principal.iss, step.principal.sub)
    ref = KeyRef(scope, key, idempotency.fingerprint(f"task:{task_id}", step.body))
    async with gateway.db.reading() as session:
        record = await idempotency.lookup(session, ref)
    if record is not None:
        return _replay(record, key)
    intents = await _task_intents(gateway, task_id)
    if not intents:
        raise NotFound(f"task {task_id!r} has no intents")
    await check_envelope(gateway, step, task_id)
    if any(intent.status == "executing" for intent in intents):
        raise Conflict(
            f"an intent of task {task_id!r} is still executing; compensate once it settles",
            name="commit-in-progress",
            headers={"Retry-After": "1"},
        )
    plan: dict[str, Any] = {}
    for intent in intents:
        call = compensating_call(gateway, intent) if intent.status in COMPENSABLE else None
        if call is not None:
            await decide(gateway, step, "commit", call[0], intent, call[1])
            plan[intent.intent_id] = call
    async with gateway.db.transaction() as session:
        held = await idempotency.claim(
            session,
            ref,
            intent_id=None,
            owner=gateway.instance_id,
            ttl=gateway.config.gateway.idempotency_ttl_seconds,
        )
    if held is not None:
        return _replay(held, key)
    retryable = {i.intent_id for i in intents if i.compensation_status == "failed"}
    try:
        # Run to completion, like a commit: a cancelled request never leaves a step
        # `running` with nobody to finish it, and a clean stop waits for the walk.
        await gateway.complete(_walk(gateway, task_id, plan, retryable, step))
    except BaseException:
        async with gateway.db.transaction() as session:
            await idempotency.release(session, ref)
        raise
    response = _summary(task_id, await _task_intents(gateway, task_id), plan)
    async with gateway.db.transaction() as session:
        await idempotency.finish(session, ref, response)
    return response.to_response()


def _replay(record: Any, key: str) -> Response:
    response = idempotency.stored(record)
    if response is None:
        raise CompensationInProgress(
            f"a compensation with key {json.dumps(key)} is still running", headers={"Retry-After": "1"}
        )
    return response.to_response(replayed=True)
