"""An effectful `tools/call`: commit a verified intent, exactly once, through the commit protocol.

An MCP client cannot propose or verify over MCP — those are other agents' steps, over
HTTP (`POST /intents` with tool `mcp:<server>/<tool>`, then `/verify`). The committer
then calls the tool with the intent it commits named in `params._meta`:

    {"name": "publish", "arguments": {...same as the intent...},
     "_meta": {"agent-gateway/intent_id": "in_...", "agent-gateway/idempotency_key": "k-1"}}

and the gateway runs the same steps as `POST /intents/{id}/commit` (gateway.commits):
key claim, policy "commit", the executing reservation, one call to the server over
the gateway's own session (gateway.mcp.execute), the stored result replayed for every
retry with the key. The arguments must be the intent's: what was verified is what runs.

    committed / failed   → the tool's CallToolResult (isError when failed), with
                           `_meta` {agent-gateway/intent_id, /status, /decision_id}
    pending approval     → JSON-RPC error -32012 with the approval id; retry with the
                           same key after approval for the result (executed once)
    any other problem    → JSON-RPC error carrying the problem details
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from gateway import canonical, idempotency, ledger
from gateway.commits.execute import reserve_and_execute
from gateway.idempotency import KeyRef, StoredResponse
from gateway.intents import Step, decide, load, tool_of
from gateway.mcp.jsonrpc import ApprovalPending
from gateway.mcp.meta import DECISION_ID, IDEMPOTENCY_KEY, INTENT_ID, PREFIX, STATUS
from gateway.problems import PROBLEM_BASE, CommitRequired, Forbidden, GatewayError, Unprocessable

if TYPE_CHECKING:
    from gateway.mcp.calls import McpCall
    from gateway.state import Gateway

_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
REPLAYED = PREFIX + "replayed"


class IntentMismatch(Unprocessable):
    name, title = "intent-mismatch", "The tool call is not the intent it names"


def _intent_id(call: McpCall) -> str:
    assert call.tool is not None
    intent_id = call.message.meta.get(INTENT_ID)
    if not isinstance(intent_id, str) or not intent_id:
        raise CommitRequired(
            f"tool {call.tool.name!r} has effect {call.tool.effect!r}: propose an intent for tool "
            f"{call.tool.name!r} (POST /intents), have it verified, then call the tool with "
            f"params._meta {{{INTENT_ID!r}: <intent id>, {IDEMPOTENCY_KEY!r}: <key>}}",
            tool=call.tool.name,
        )
    return intent_id


def _key(call: McpCall) -> str:
    carried = call.message.meta.get(IDEMPOTENCY_KEY)
    if carried is None:
        return idempotency.parse_key(call.request.headers.get(idempotency.HEADER))
    if not isinstance(carried, str) or not _KEY.match(carried):
        raise idempotency.KeyInvalid(
            f"params._meta[{IDEMPOTENCY_KEY!r}] must be 1 to 255 printable characters"
        )
    return carried


def _same_call(call: McpCall, tool_name: str, arguments: Any) -> None:
    assert call.tool is not None
    if tool_name != call.tool.name:
        raise IntentMismatch(f"the intent is for tool {tool_name!r}, not {call.tool.name!r}")
    if canonical.dumps(arguments if arguments is not None else {}) != canonical.dumps(call.arguments):
        raise IntentMismatch(
            "the arguments differ from the verified intent's; send exactly the intent's arguments"
        )


def _problem_error(problem: dict[str, Any], status: int) -> GatewayError:
    extra = {k: v for k, v in problem.items() if k not in ("type", "title", "status", "detail")}
    name = str(problem.get("type", "")).removeprefix(PROBLEM_BASE) or "upstream-unavailable"
    return GatewayError(
        str(problem.get("detail", "")), status=status, name=name, title=str(problem.get("title", "")), **extra
    )


def _failure_result(body: Any) -> dict[str, Any]:
    """What a failed call shows the agent when the server gave no CallToolResult."""
    error = body.get("error") if isinstance(body, dict) else None
    text = (
        f"the MCP server refused the call: {error.get('message')}" if isinstance(error, dict) else str(body)
    )
    return {"content": [{"type": "text", "text": text}], "isError": True}


def to_result(response: StoredResponse, *, decision_id: str | None, replayed: bool) -> dict[str, Any]:
    """A stored commit answer as a tools/call result, or the error it stands for."""
    payload = json.loads(response.body)
    if response.status == 202:
        raise ApprovalPending(
            f"intent {payload.get('intent_id')} waits for approval {payload.get('approval_id')}; "
            "call again with the same idempotency key once it is approved",
            intent_id=payload.get("intent_id"),
            approval_id=payload.get("approval_id"),
            location=response.headers.get("location"),
            intent_status="pending_approval",
        )
    if response.status >= 400 or not isinstance(payload, dict) or "result" not in payload:
        raise _problem_error(payload if isinstance(payload, dict) else {}, response.status)
    body = (payload.get("result") or {}).get("body")
    is_result = isinstance(body, dict) and isinstance(body.get("content"), list)
    result = dict(body) if is_result else _failure_result(body)
    meta = dict(result.get("_meta") or {})
    meta.update({INTENT_ID: payload.get("intent_id"), STATUS: payload.get("status")})
    if decision_id:
        meta[DECISION_ID] = decision_id
    if replayed:
        meta[REPLAYED] = True
    result["_meta"] = meta
    return result


async def commit_call(gateway: Gateway, call: McpCall) -> dict[str, Any]:
    """Commit the intent the call names; the tools/call result, or a GatewayError."""
    intent_id = _intent_id(call)
    if call.principal.role != "committer":
        raise Forbidden("only the committer role may commit", intent_id=intent_id)
    ref = KeyRef(
        idempotency.caller_scope(call.principal.iss, call.principal.sub),
        _key(call),
        idempotency.fingerprint(intent_id, b""),  # as an HTTP commit with an empty body
    )
    # From here on, the steps of gateway.commits.execute.commit, without its HTTP request.
    async with gateway.db.reading() as session:
        intent = await load(session, intent_id)
        _same_call(call, intent.tool, intent.arguments)
        record = await idempotency.lookup(session, ref)
        replay = (
            idempotency.stored(record) if record is not None and record.state == idempotency.DONE else None
        )
    if replay is not None:
        return to_result(replay, decision_id=None, replayed=True)
    if call.envelope is not None and call.envelope.get("task_id") != intent.task_id:
        raise Unprocessable(
            f"the handoff envelope is for task {call.envelope.get('task_id')!r}, not {intent.task_id!r}",
            name="envelope-invalid",
        )
    tool = tool_of(gateway, intent.tool)
    step = Step(call.request, call.principal, call.trace, b"", call.envelope)
    call.decision = decision = await decide(gateway, step, "commit", tool, intent)
    digest = ledger.digest({"name": call.name, "arguments": call.arguments})
    ticket = await reserve_and_execute(
        gateway,
        intent,
        tool,
        ref,
        actor=step.actor,
        trace=call.trace,
        decision=decision,
        request_digest=digest,
    )
    assert ticket.response is not None
    return to_result(ticket.response, decision_id=decision.decision_id, replayed=ticket.replayed)
