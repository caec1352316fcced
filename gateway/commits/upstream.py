"""Calling a tool for a commit or a compensation, and what its answer means.

    2xx                       → done (committed / compensated)
    any other status          → the tool said no (failed / compensation_failed)
    could not connect         → failed: the request never left, nothing happened
    timeout, dropped mid-call → unknown: the effect may or may not have happened

The upstream gets `Idempotency-Key` derived from the intent, so an upstream that honours
keys dedupes too, and `traceparent` with the gateway's span as the parent.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway import canonical, telemetry
from gateway.config import McpToolRef, Tool
from gateway.credentials import upstream_headers
from gateway.problems import UpstreamUnavailable
from gateway.tracing import TraceContext

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.commits")

DONE, REFUSED, UNKNOWN = "done", "refused", "unknown"


@dataclass(frozen=True)
class Outcome:
    kind: str  # DONE | REFUSED | UNKNOWN
    result: dict[str, Any]  # {status, content_type, body} of the tool, or {error, http_status}
    raw: bytes = b""

    @property
    def http_status(self) -> int:
        return int(self.result.get("http_status", 200))


def decode_body(content_type: str, body: bytes) -> Any:
    if "json" in content_type:
        try:
            return json.loads(body)
        except ValueError:
            pass
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(body).decode("ascii")}


async def call_tool(
    gateway: Gateway,
    tool: Tool,
    arguments: Any,
    *,
    idempotency_key: str,
    call_id: str,
    trace: TraceContext,
    principal: Any = None,
    intent_id: str | None = None,
) -> Outcome:
    if isinstance(tool, McpToolRef):  # an MCP server's tool: a tools/call over the gateway's own session
        from gateway.mcp.execute import call_mcp_tool

        return await call_mcp_tool(
            gateway,
            tool,
            arguments,
            idempotency_key=idempotency_key,
            call_id=call_id,
            trace=trace,
            principal=principal,
        )
    headers = {
        "content-type": "application/json",
        "idempotency-key": f'"{idempotency_key}"',
        "traceparent": trace.traceparent,
        "gateway-intent-id": call_id,
    }
    # The tool's own credential and assertion (for `principal`, the agent that committed).
    headers.update(
        upstream_headers(gateway, tool, principal or {}, arguments=arguments, intent_id=intent_id or call_id)
    )
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": tool.name,
        "gen_ai.tool.call.id": call_id,
    }
    try:
        with telemetry.span(f"execute_tool {tool.name}", trace, attributes):
            status, response_headers, body = await gateway.forwarder.call(
                "POST", tool.upstream, headers, canonical.dumps(arguments)
            )
    except UpstreamUnavailable as error:
        never_sent = isinstance(error.__cause__, aiohttp.ClientConnectorError)
        detail = error.detail + ("; nothing was sent" if never_sent else "; the outcome is unknown")
        return Outcome(REFUSED if never_sent else UNKNOWN, {"error": detail, "http_status": error.status})
    except Exception as error:  # noqa: BLE001 - whatever broke mid-call, the effect may have happened
        log.exception("tool call for %s broke mid-call", call_id)
        return Outcome(
            UNKNOWN,
            {
                "error": f"the call broke mid-way ({type(error).__name__}); outcome unknown",
                "http_status": 502,
            },
        )
    content_type = next((v for k, v in response_headers.items() if k.lower() == "content-type"), "")
    result = {"status": status, "content_type": content_type or None, "body": decode_body(content_type, body)}
    return Outcome(DONE if 200 <= status < 300 else REFUSED, result, body)
