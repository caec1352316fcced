"""MCP: agents reach MCP tool servers through the gateway, under the same policy and commit protocol.

    endpoint.py   POST|GET|DELETE /mcp/{server}: the Streamable HTTP relay
    calls.py      tools/call, stage by stage (as gateway.pipeline for HTTP tools)
    commit.py     an effectful tools/call commits a verified intent (gateway.commits)
    execute.py    the committed call itself, over the gateway's own MCP session
    authorize.py  what policy is asked: the session gate, tool listing, calls
    catalog.py    each server's tool list: the input schemas calls are checked against
    sessions.py   Mcp-Session-Id bound to the agent that opened the session
    upstream.py   headers both ways (no token passthrough), streaming to the server
    client.py     the gateway's own SDK sessions (tool lists, committed calls)
    sse.py        server-sent events relayed one event at a time
    jsonrpc.py    JSON-RPC framing; gateway problems as JSON-RPC errors
    meta.py       the `params._meta` keys the gateway reads and writes
    servers.py    per-server state, started and stopped with the gateway

Tools are named `mcp:<server>/<tool>` in policy, intents and the ledger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Route

from gateway.mcp.servers import McpServers

if TYPE_CHECKING:
    from gateway.state import Gateway

__all__ = ["McpServers", "routes"]


def routes(gateway: Gateway) -> list[BaseRoute]:
    from gateway.app import bind
    from gateway.mcp.endpoint import handle_mcp

    return [Route("/mcp/{server}", bind(gateway, handle_mcp), methods=["GET", "POST", "DELETE"])]
