"""`POST|GET|DELETE /mcp/{server}`: the Streamable HTTP endpoint agents point their MCP client at.

    authenticate (role JWT) → the server → the agent's session binding → per message:
      tools/call               gateway.mcp.calls (+ gateway.mcp.commit for effectful tools)
      tools/list               policy gate, relay, answer filtered to what the agent may use
      any other request        policy gate, relay
      notifications, responses relay
    GET (server-to-client stream), DELETE (end the session): gate, relay

Answers stream back as they arrive (SSE is relayed event by event). Errors are
JSON-RPC errors whose `data` is the problem details. Errors about the exchange —
token, session, body, the server being unreachable — keep their HTTP status (401,
404, 413, 502, ...); errors about one message (policy, input, commit) are HTTP 200.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.config import McpServer
from gateway.mcp import authorize, calls
from gateway.mcp.commit import commit_call
from gateway.mcp.jsonrpc import (
    HEADER_MISMATCH,
    Message,
    ProtocolError,
    error_message,
    json_response,
    parse_message,
    result_message,
)
from gateway.mcp.meta import TRACEPARENT, for_upstream
from gateway.mcp.sessions import SessionUnknown
from gateway.mcp.sse import MAX_EVENT_BYTES, Event, relay
from gateway.mcp.upstream import SESSION_HEADER, Reply, request_headers
from gateway.problems import GatewayError, UpstreamUnavailable
from gateway.proxy import read_body
from gateway.tracing import TraceContext, from_traceparent

if TYPE_CHECKING:
    from gateway.identity import Principal
    from gateway.policy import Decision
    from gateway.state import Gateway

log = logging.getLogger("gateway.mcp")

LIST_CHANGED = "notifications/tools/list_changed"
# Errors about the HTTP exchange keep their status even when they answer one message.
_EXCHANGE_ERRORS = (UpstreamUnavailable, SessionUnknown)


def check_routing_headers(request: Request, message: Message) -> None:
    """The `Mcp-*` headers must say what the body says, once: policy decides on the body,
    and a server that routed on a header could otherwise run something else."""
    from mcp.shared.inbound import NAME_BEARING_METHODS, decode_header_value  # the SDK, on first use

    names = [name.decode("latin-1").lower() for name, _ in request.headers.raw]
    repeated = sorted({name for name in names if name.startswith("mcp-") and names.count(name) > 1})
    if repeated:
        raise ProtocolError(f"header {repeated[0]} appears more than once", code=HEADER_MISMATCH)
    if message.kind == "response":
        return
    method = request.headers.get("mcp-method")
    if method is not None and method != message.method:
        raise ProtocolError("the Mcp-Method header does not match the body's method", code=HEADER_MISMATCH)
    name, key = request.headers.get("mcp-name"), NAME_BEARING_METHODS.get(message.method)
    if name is not None and key is not None and decode_header_value(name) != message.params.get(key):
        detail = f"the Mcp-Name header does not match the body's params.{key}"
        raise ProtocolError(detail, code=HEADER_MISMATCH)


@dataclass
class Exchange:
    """One HTTP request to the endpoint, authenticated and bound to its MCP server."""

    gateway: Gateway
    request: Request
    principal: Principal
    server: McpServer
    trace: TraceContext
    upstream_session: str | None = None

    def bind_session(self) -> None:
        presented = self.request.headers.get(SESSION_HEADER)
        if presented is not None:
            self.upstream_session = self.gateway.mcp.sessions.unwrap(
                self.server.name, self.principal, presented
            )

    def upstream_headers(self) -> dict[str, str]:
        headers = request_headers(self.request.headers)
        headers.update(self.gateway.mcp.credentials(self.server.name, self.principal.role))
        headers["traceparent"] = self.trace.traceparent
        if self.upstream_session is not None:
            headers[SESSION_HEADER] = self.upstream_session
        return headers

    async def send(self, body: bytes | None) -> Reply:
        reply = await self.gateway.mcp.forwarder.send(
            self.server, self.request.method, self.upstream_headers(), body
        )
        if reply.status in (401, 403):
            # The server refused the gateway's own credential; the agent can do nothing about it.
            reply.release()
            raise UpstreamUnavailable(f"MCP server {self.server.name!r} refused the gateway's credential")
        return reply

    def downstream_headers(self, reply: Reply, decision: Decision | None) -> dict[str, str]:
        headers = dict(reply.headers)
        if SESSION_HEADER in headers:
            try:
                headers[SESSION_HEADER] = self.gateway.mcp.sessions.wrap(
                    self.server.name, self.principal, headers[SESSION_HEADER]
                )
            except ValueError as error:
                reply.release()
                raise UpstreamUnavailable(str(error)) from None
        if decision is not None:
            headers["gateway-decision-id"] = decision.decision_id
        return headers

    async def filtered(self, message: dict[str, Any]) -> dict[str, Any]:
        """A tools/list answer with only the tools this agent may use; learnt by the catalog first."""
        result = message.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return message
        self.gateway.mcp.catalog(self.server.name).remember(result["tools"])
        tools = await authorize.visible_tools(
            self.gateway, self.request, self.principal, self.server, result["tools"]
        )
        result = {**result, "tools": tools}
        if "cacheScope" in result:  # 2026-07-28 caching: the answer is this agent's, never shared
            result["cacheScope"] = "private"
        return {**message, "result": result}

    def event_hook(self, listing: Message | None) -> Callable[[Event], Any]:
        async def hook(event: Event) -> Event:
            message = event.message()
            if message is None:
                return event
            if message.get("method") == LIST_CHANGED:
                self.gateway.mcp.catalog(self.server.name).invalidate()
            if listing is not None and message.get("id") == listing.id and "result" in message:
                return event.with_data(await self.filtered(message))
            return event

        return hook

    async def respond(
        self, reply: Reply, decision: Decision | None, *, listing: Message | None = None
    ) -> Response:
        headers = self.downstream_headers(reply, decision)
        if reply.content_type == "text/event-stream":
            stream = relay(reply.body, self.event_hook(listing))
            return StreamingResponse(stream, status_code=reply.status, headers=headers)
        if listing is not None and reply.content_type == "application/json" and reply.status == 200:
            try:
                answer = json.loads(await reply.read(MAX_EVENT_BYTES))
            except ValueError:
                raise UpstreamUnavailable(f"MCP server {self.server.name!r} sent invalid JSON") from None
            body = json.dumps(await self.filtered(answer) if isinstance(answer, dict) else answer)
            return Response(body, status_code=reply.status, headers=headers)
        return StreamingResponse(reply.body, status_code=reply.status, headers=headers)

    async def tools_call(self, message: Message) -> Response:
        call = calls.McpCall(self.request, self.server, self.principal, message, self.trace)
        await calls.prepare(self.gateway, call)
        assert call.tool is not None
        if call.tool.effect == "read":
            await calls.authorize_call(self.gateway, call)
            reply = await self.send(json.dumps(for_upstream(message.raw, self.trace.traceparent)).encode())
            return await self.respond(reply, call.decision)
        result = await commit_call(self.gateway, call)
        headers = {"gateway-decision-id": call.decision.decision_id} if call.decision else None
        return json_response(result_message(message.id, result), headers=headers)

    async def request_message(self, message: Message) -> Response:
        if message.method == "tools/call":
            return await self.tools_call(message)
        decision = await authorize.authorize_session(
            self.gateway, self.request, self.principal, self.server, message.method
        )
        reply = await self.send(json.dumps(for_upstream(message.raw, self.trace.traceparent)).encode())
        return await self.respond(
            reply, decision, listing=message if message.method == "tools/list" else None
        )

    async def post(self) -> Response:
        body = await read_body(self.request, self.gateway.config.gateway.max_body_bytes)
        message = parse_message(body)
        check_routing_headers(self.request, message)
        self.bind_session()
        if message.kind != "request":
            # Notifications and the agent's answers to server requests: relayed as sent.
            return await self.respond(await self.send(body), None)
        carried = message.meta.get(TRACEPARENT)
        if isinstance(carried, str):
            self.trace = from_traceparent(carried)
        try:
            return await self.request_message(message)
        except GatewayError as error:
            status = error.status if isinstance(error, _EXCHANGE_ERRORS) else 200
            answer = error_message(message.id, error, trace_id=self.trace.trace_id)
            return json_response(answer, status=status, headers=error.headers)

    async def stream_or_end(self) -> Response:
        self.bind_session()
        decision = None
        if self.request.method == "GET":
            decision = await authorize.authorize_session(
                self.gateway, self.request, self.principal, self.server, "GET"
            )
        return await self.respond(await self.send(None), decision)


async def handle_mcp(gateway: Gateway, request: Request) -> Response:
    trace = from_traceparent(request.headers.get("traceparent"))
    try:
        principal = await gateway.tokens.verify(request.headers.get("authorization"))
        server = gateway.mcp.server(request.path_params["server"])
        exchange = Exchange(gateway, request, principal, server, trace)
        if request.method == "POST":
            return await exchange.post()
        return await exchange.stream_or_end()
    except GatewayError as error:
        return json_response(
            error_message(None, error, trace_id=trace.trace_id), status=error.status, headers=error.headers
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        error = GatewayError("the gateway hit an unexpected error; it has been logged")
        return json_response(error_message(None, error, trace_id=trace.trace_id), status=500)
