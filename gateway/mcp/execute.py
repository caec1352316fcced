"""Running a committed MCP tool call: once, over the gateway's own session.

The commit protocol calls this for `mcp:<server>/<tool>` intents, in place of an
HTTP POST, and reads the answer the same way (`gateway.commits.upstream.Outcome`):

    a CallToolResult                       → done (committed)
    a CallToolResult with isError, or
    a JSON-RPC error from the server       → the tool said no (failed)
    no session could be opened             → failed: tools/call was never sent
    the session broke after tools/call     → unknown: the effect may have happened

The request carries the intent-derived idempotency key twice — `Idempotency-Key`
on the HTTP request and `agent-gateway/idempotency_key` in `params._meta` — so a
server that honours either dedupes a retried call too; `traceparent` rides in both
places as well.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequest, CallToolRequestParams
from mcp_types.jsonrpc import CONNECTION_CLOSED, REQUEST_TIMEOUT
from pydantic import TypeAdapter

from gateway import telemetry
from gateway.commits.upstream import DONE, REFUSED, UNKNOWN, Outcome
from gateway.config import McpToolRef
from gateway.mcp.client import connect, list_tools
from gateway.mcp.meta import IDEMPOTENCY_KEY, INTENT_ID
from gateway.tracing import TraceContext

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.mcp")

_RAW = TypeAdapter(dict[str, Any])
# Codes the SDK makes up locally when no answer came: the call may still have run.
_NO_ANSWER = frozenset({CONNECTION_CLOSED, REQUEST_TIMEOUT})
_STATUS = {-32602: 400, -32601: 404, -32600: 400}


def _role(principal: Any) -> str | None:
    """The committer's role (a Principal, or an actor mapping), for per-role credentials."""
    role = principal.get("role") if isinstance(principal, dict) else getattr(principal, "role", None)
    return role if isinstance(role, str) else None


def _unknown(detail: str) -> Outcome:
    return Outcome(UNKNOWN, {"error": f"{detail}; the outcome is unknown", "http_status": 502})


def _answered(result: dict[str, Any]) -> Outcome:
    body = json.dumps(result, separators=(",", ":")).encode()
    if result.get("resultType") == "input_required":
        return _unknown("the MCP tool asked for input the gateway cannot give")
    kind = REFUSED if result.get("isError") is True else DONE
    return Outcome(kind, {"status": 200, "content_type": "application/json", "body": result}, body)


def _error(error: MCPError) -> Outcome:
    if error.code in _NO_ANSWER:
        return _unknown(f"the MCP server did not answer ({error.message})")
    payload = {"error": error.error.model_dump(mode="json", exclude_none=True)}
    result = {"status": _STATUS.get(error.code, 502), "content_type": "application/json", "body": payload}
    return Outcome(REFUSED, result, json.dumps(payload).encode())


async def call_mcp_tool(
    gateway: Gateway,
    tool: McpToolRef,
    arguments: Any,
    *,
    idempotency_key: str,
    call_id: str,
    trace: TraceContext,
    principal: Any = None,
) -> Outcome:
    server = gateway.config.mcp_server(tool.server)
    if server is None or not isinstance(arguments, dict):
        reason = (
            "the MCP server is no longer configured" if server is None else "MCP arguments must be an object"
        )
        return Outcome(REFUSED, {"error": f"{reason}; nothing was sent", "http_status": 502})
    headers = {**gateway.mcp.credentials(server.name, _role(principal)), "traceparent": trace.traceparent}
    key_header = {"idempotency-key": f'"{idempotency_key}"'}
    meta = {"traceparent": trace.traceparent, INTENT_ID: call_id, IDEMPOTENCY_KEY: idempotency_key}
    request = CallToolRequest(
        params=CallToolRequestParams(name=tool.mcp_name, arguments=arguments, _meta=meta)
    )
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": tool.name,
        "gen_ai.tool.call.id": call_id,
    }
    outcome: Outcome | None = None
    sent = False
    try:
        with telemetry.span(f"execute_tool {tool.name}", trace, attributes):
            connect_timeout = gateway.config.gateway.timeouts.connect
            async with connect(
                server, headers, connect_timeout=connect_timeout, call_headers=key_header
            ) as session:
                # Listing first also teaches the SDK the tool's Mcp-Param-* headers (2026-07-28).
                gateway.mcp.catalog(server.name).remember(await list_tools(session))
                sent = True
                try:
                    outcome = _answered(await session.send_request(request, _RAW))
                except MCPError as error:
                    outcome = _error(error)
    except Exception as error:  # noqa: BLE001 - classified below; the effect may have happened
        if outcome is not None:
            log.warning("closing the MCP session after %s failed: %s", call_id, type(error).__name__)
        elif not sent:
            outcome = Outcome(
                REFUSED,
                {"error": f"MCP server {server.name!r} unreachable; nothing was sent", "http_status": 502},
            )
        else:
            log.exception("MCP tool call for %s broke mid-call", call_id)
            outcome = _unknown(f"the MCP session broke mid-call ({type(error).__name__})")
    assert outcome is not None
    return outcome
