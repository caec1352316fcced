"""What policy is asked about MCP traffic, and what it decides.

    any request but tools/call      action "list_tools", no tool      may this agent use the server?
    each tool in a tools/list       action "list_tools", that tool    is the tool shown to this agent?
    tools/call of a read tool       action "call"                     as for HTTP tools
    tools/call of an effectful one  action "commit"                   through the commit protocol

Tools are named `mcp:<server>/<tool>` and carry the effect and risk the gateway's
configuration gives them; the server's `annotations` are passed along as
`tool.annotations` for policies that want to look, but they are the server's claims
and never decide the effect. Policy also gets `mcp: {server, method, protocol_version}`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from gateway.config import McpServer, McpToolRef
from gateway.mcp.catalog import ListedTool
from gateway.mcp.upstream import VERSION_HEADER
from gateway.pipeline import POLICY_VISIBLE_HEADERS
from gateway.problems import PolicyDenied

if TYPE_CHECKING:
    from gateway.identity import Principal
    from gateway.policy import Decision
    from gateway.state import Gateway


def tool_view(tool: McpToolRef, listed: ListedTool | None) -> dict[str, Any]:
    return {
        "name": tool.name,
        "effect": tool.effect,
        "risk": tool.risk,
        "server": tool.server,
        "mcp_name": tool.mcp_name,
        "annotations": listed.annotations if listed else None,
    }


def policy_input(
    request: Request,
    principal: Principal,
    server: McpServer,
    method: str,
    action: str,
    *,
    tool: dict[str, Any] | None = None,
    arguments: Any = None,
    envelope: dict[str, Any] | None = None,
) -> dict[str, Any]:
    headers = {name: request.headers[name] for name in POLICY_VISIBLE_HEADERS if name in request.headers}
    return {
        "action": action,
        "principal": {"sub": principal.sub, "role": principal.role, "iss": principal.iss},
        "tool": tool,
        "arguments": arguments,
        "envelope": envelope,
        "intent": None,
        "approval": None,
        "request": {"method": request.method, "path": request.url.path, "headers": headers},
        "mcp": {
            "server": server.name,
            "method": method,
            "protocol_version": request.headers.get(VERSION_HEADER),
        },
        "time": datetime.now(UTC).isoformat(),
    }


def require(decision: Decision) -> Decision:
    if not decision.allow:
        raise PolicyDenied(
            "; ".join(decision.reasons) or "denied by policy",
            decision_id=decision.decision_id,
            reasons=decision.reasons,
        )
    return decision


async def authorize_session(
    gateway: Gateway, request: Request, principal: Principal, server: McpServer, method: str
) -> Decision:
    """The gate for everything but tools/call: initialize, tools/list, resources, prompts, streams."""
    decision = await gateway.policy.decide(policy_input(request, principal, server, method, "list_tools"))
    return require(decision)


async def visible_tools(
    gateway: Gateway, request: Request, principal: Principal, server: McpServer, tools: list[Any]
) -> list[Any]:
    """The entries of a tools/list page this agent may see, in the server's order."""

    async def shown(entry: Any) -> bool:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            return False
        tool = server.tool(entry["name"])
        view = tool_view(tool, None)
        view["annotations"] = entry.get("annotations") if isinstance(entry.get("annotations"), dict) else None
        question = policy_input(request, principal, server, "tools/list", "list_tools", tool=view)
        return (await gateway.policy.decide(question)).allow

    verdicts = await asyncio.gather(*(shown(entry) for entry in tools))
    return [entry for entry, keep in zip(tools, verdicts, strict=True) if keep]
