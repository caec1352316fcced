"""`tools/call`, one named stage per step, as for HTTP tools (gateway.pipeline):

    read params → resolve tool → verify envelope → validate input
    → read tool:       policy "call" → relay over the agent's own session
    → effectful tool:  the commit protocol (gateway.mcp.commit), never a relay

Each stage takes the `McpCall` it enriches and can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from gateway.config import McpServer, McpToolRef
from gateway.intents import UnknownTool
from gateway.mcp import authorize
from gateway.mcp.catalog import ListedTool, validate_arguments
from gateway.mcp.jsonrpc import Message
from gateway.mcp.meta import HANDOFF
from gateway.problems import BadRequest
from gateway.tracing import TraceContext

if TYPE_CHECKING:
    from gateway.identity import Principal
    from gateway.policy import Decision
    from gateway.state import Gateway


@dataclass
class McpCall:
    request: Request
    server: McpServer
    principal: Principal
    message: Message
    trace: TraceContext
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    tool: McpToolRef | None = None
    listed: ListedTool | None = None
    envelope: dict[str, Any] | None = None
    decision: Decision | None = None


def read_params(call: McpCall) -> None:
    params = call.message.params
    name, arguments = params.get("name"), params.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise BadRequest("tools/call needs params.name, a non-empty string")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise BadRequest("tools/call params.arguments must be an object")
    call.name, call.arguments = name, arguments
    call.tool = call.server.tool(name)


async def resolve_tool(gateway: Gateway, call: McpCall) -> None:
    """The server must list the tool: its input schema is what the arguments are checked against."""
    call.listed = await gateway.mcp.catalog(call.server.name).lookup(call.name)
    if call.listed is None:
        raise UnknownTool(f"MCP server {call.server.name!r} lists no tool named {call.name!r}")


async def verify_envelope(gateway: Gateway, call: McpCall) -> None:
    header = call.request.headers.get("agent-handoff")
    carried = call.message.meta.get(HANDOFF)
    if carried is not None and not isinstance(carried, str):
        raise BadRequest(f"params._meta[{HANDOFF!r}] must be a compact JWS string")
    if header is not None and carried is not None and header.strip() != carried.strip():
        raise BadRequest(f"the Agent-Handoff header and params._meta[{HANDOFF!r}] carry different envelopes")
    envelope = await gateway.envelopes.verify(header if header is not None else carried, call.principal)
    call.envelope = envelope.claims if envelope is not None else None


def validate_input(call: McpCall) -> None:
    assert call.tool is not None and call.listed is not None
    validate_arguments(call.tool.name, call.listed, call.arguments)


async def authorize_call(gateway: Gateway, call: McpCall) -> None:
    assert call.tool is not None
    question = authorize.policy_input(
        call.request,
        call.principal,
        call.server,
        "tools/call",
        "call",
        tool=authorize.tool_view(call.tool, call.listed),
        arguments=call.arguments,
        envelope=call.envelope,
    )
    call.decision = authorize.require(await gateway.policy.decide(question))


async def prepare(gateway: Gateway, call: McpCall) -> None:
    """Every stage both kinds of tool share."""
    read_params(call)
    await resolve_tool(gateway, call)
    await verify_envelope(gateway, call)
    validate_input(call)
