"""The direct tool-call pipeline (contract §1, §3), one named stage per step.

    authenticate → resolve tool → read arguments → verify envelope → validate input
    → require read effect → count rate limits → evaluate policy → forward → respond

Each stage takes the gateway and the `Call` it enriches, so it can be tested alone.
`handle_tool_call` runs them in order, timing each with `time.perf_counter` into
`agent_gateway_stage_seconds{stage}` and counting the call once in
`agent_gateway_requests_total{tool,decision,status}`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from time import perf_counter
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.config import Tool
from gateway.credentials import merge, upstream_headers
from gateway.memory.names import GOALS, address
from gateway.problems import BadRequest, CommitRequired, GatewayError, NotFound, PolicyDenied
from gateway.proxy import (
    check_declared_length,
    has_body,
    read_body,
    stream_body,
    upstream_request_headers,
    upstream_url,
)
from gateway.ratelimits import Usage, response_headers, tightest
from gateway.tracing import TraceContext, from_traceparent

if TYPE_CHECKING:
    from prometheus_client.metrics import Histogram

    from gateway.identity import Principal
    from gateway.policy import Decision
    from gateway.state import Gateway

SMALL_BODY_BYTES = 65_536

# Headers policy may see; credentials are never part of the policy input.
POLICY_VISIBLE_HEADERS = ("content-type", "user-agent", "traceparent", "idempotency-key")


@dataclass
class Call:
    request: Request
    tool: Tool
    rest: str
    trace: TraceContext
    principal: Principal | None = None
    envelope: dict[str, Any] | None = None
    body: bytes = b""
    body_stream: AsyncIterator[bytes] | None = None
    arguments: Any = None
    decision: Decision | None = None
    labels: dict[str, str] = field(default_factory=dict)
    rate_limits: list[Usage] = field(default_factory=list)


async def authenticate(gateway: Gateway, request: Request) -> Principal:
    principal = await gateway.tokens.verify(request.headers.get("authorization"))
    request.state.principal = principal  # an authenticated refusal is ledgered (gateway.refusals)
    return principal


def resolve_tool(gateway: Gateway, request: Request, principal: Principal) -> Call:
    """After authentication, so unauthenticated callers cannot probe which tools exist."""
    name = request.path_params["tool"]
    tool = gateway.config.tool(name)
    if tool is None:
        raise NotFound(f"no tool named {name!r} is configured")
    trace = from_traceparent(request.headers.get("traceparent"))
    return Call(request, tool, request.path_params.get("rest", ""), trace, principal)


async def read_arguments(gateway: Gateway, call: Call) -> None:
    """JSON bodies (and any body of a tool with a schema) are read whole: policy and the
    schema judge them. Other bodies stream to the upstream, still under the size limit."""
    limit = gateway.config.gateway.max_body_bytes
    content_type = call.request.headers.get("content-type", "")
    structured = "json" in content_type or gateway.schemas.schema_for(call.tool.name) is not None
    if not structured and has_body(call.request):
        check_declared_length(call.request, limit)
        call.body_stream = stream_body(call.request, limit)
        return
    call.body = await read_body(call.request, limit)
    if call.body and "json" in content_type:
        try:
            call.arguments = json.loads(call.body)
        except ValueError as error:
            raise BadRequest(f"request body is not valid JSON: {error.msg}") from None
    elif call.request.query_params:
        call.arguments = dict(call.request.query_params)


async def verify_envelope(gateway: Gateway, call: Call) -> None:
    assert call.principal is not None
    envelope = await gateway.envelopes.verify(call.request.headers.get("agent-handoff"), call.principal)
    call.envelope = envelope.claims if envelope is not None else None


def validate_input(gateway: Gateway, call: Call) -> None:
    gateway.schemas.validate(call.tool.name, call.arguments)


def require_read_effect(call: Call) -> None:
    if call.tool.effect != "read":
        raise CommitRequired(
            f"tool {call.tool.name!r} has effect {call.tool.effect!r}; propose an intent and commit it"
        )


def policy_input(call: Call, action: str) -> dict[str, Any]:
    assert call.principal is not None
    headers = {
        name: call.request.headers[name] for name in POLICY_VISIBLE_HEADERS if name in call.request.headers
    }
    return {
        "action": action,
        "principal": {"sub": call.principal.sub, "role": call.principal.role, "iss": call.principal.iss},
        "tool": {"name": call.tool.name, "effect": call.tool.effect, "risk": call.tool.risk},
        "arguments": call.arguments,
        "envelope": call.envelope,
        "intent": None,
        "approval": None,
        "memory": goal_memory(call.envelope),
        "request": {"method": call.request.method, "path": call.request.url.path, "headers": headers},
        "time": datetime.now(UTC).isoformat(),
        "rate_limit": tightest(call.rate_limits),
    }


def goal_memory(envelope: dict[str, Any] | None) -> dict[str, Any]:
    """`input.memory` of a direct call: the goal the envelope acts on, which its
    verification found current (contract §6)."""
    if envelope is None:
        return {}
    return {address(GOALS, envelope["task_id"]): {"revision": envelope["goal_revision"]}}


async def count_rate_limits(gateway: Gateway, call: Call) -> None:
    """Count the call against the limits it matches: 429 (or 503 without the shared store)."""
    assert call.principal is not None
    call.rate_limits = await gateway.limiter.count(call.principal.sub, call.principal.role, call.tool.name)


async def evaluate_policy(gateway: Gateway, call: Call) -> None:
    call.decision = await gateway.policy.decide(policy_input(call, "call"), labels=call.labels)
    if not call.decision.allow:
        raise PolicyDenied(
            "; ".join(call.decision.reasons) or "denied by policy",
            decision_id=call.decision.decision_id,
            reasons=call.decision.reasons,
        )


async def forward(gateway: Gateway, call: Call) -> Response:
    assert call.decision is not None
    headers = upstream_request_headers(call.request.headers)
    headers["traceparent"] = call.trace.traceparent
    # The tool's own credential, set over anything the caller sent under that name.
    headers = merge(headers, upstream_headers(gateway, call.tool, call.principal, arguments=call.arguments))
    url = upstream_url(call.tool.upstream, call.rest, call.request.url.query)
    body = call.body_stream if call.body_stream is not None else (call.body or None)
    upstream = await gateway.forwarder.send(call.request.method, url, headers, body)
    downstream = {
        **upstream.headers,
        "Gateway-Decision-Id": call.decision.decision_id,
        **response_headers(call.rate_limits),
    }
    if upstream.content_length is not None and upstream.content_length <= SMALL_BODY_BYTES:
        # A small, sized body is read whole: a StreamingResponse costs a task group and
        # a disconnect listener per request, which dominated the read path's overhead.
        body = b"".join([chunk async for chunk in upstream.body])
        return Response(body, status_code=upstream.status, headers=downstream)
    return StreamingResponse(upstream.body, status_code=upstream.status, headers=downstream)


def _lap(stage: Histogram, since: float) -> float:
    now = perf_counter()
    stage.observe(now - since)
    return now


def _tool_label(gateway: Gateway, request: Request, call: Call | None) -> str:
    """A configured tool name, never a name from the request: labels stay a fixed set."""
    if call is not None:
        return call.tool.name
    tool = gateway.config.tool(request.path_params.get("tool", ""))
    return tool.name if tool is not None else "(unknown)"


def _decision_label(call: Call | None) -> str:
    if call is None or call.decision is None:
        return "none"
    return "allow" if call.decision.allow else "deny"


async def handle_tool_call(gateway: Gateway, request: Request) -> Response:
    stage = gateway.metrics.stage
    call: Call | None = None
    current = "authenticate"  # the stage running, timed up to the error if it raises
    mark = perf_counter()
    try:
        principal = await authenticate(gateway, request)
        mark, current = _lap(stage[current], mark), "envelope"
        call = resolve_tool(gateway, request, principal)
        await read_arguments(gateway, call)
        await verify_envelope(gateway, call)
        mark, current = _lap(stage[current], mark), "schema"
        validate_input(gateway, call)
        require_read_effect(call)
        mark, current = _lap(stage[current], mark), "rate_limit"
        await count_rate_limits(gateway, call)
        mark, current = _lap(stage[current], mark), "policy"
        await evaluate_policy(gateway, call)
        mark, current = _lap(stage[current], mark), "upstream"
        response = await forward(gateway, call)
        _lap(stage[current], mark)
    except Exception as error:
        _lap(stage[current], mark)
        status = error.status if isinstance(error, GatewayError) else 500
        gateway.metrics.request(_tool_label(gateway, request, call), _decision_label(call), status)
        raise
    gateway.metrics.request(call.tool.name, "allow", response.status_code)
    return response
