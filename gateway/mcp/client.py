"""The gateway's own MCP sessions, opened with the official SDK.

Agents' sessions are relayed; these are the gateway's: to fetch a server's tool list
when a call names a tool the catalog has not seen, and to run a committed tool call —
which must not depend on any agent's session, because an approval can trigger it
long after the agent left. The SDK negotiates the revision (`server/discover` for
2026-07-28, else the `initialize` handshake), and the gateway's credential for the
server is the only one sent.

The SDK is imported on first use (it takes seconds to import on a busy host), so a
gateway without MCP servers never pays for it; `warm_up` imports it at start when
servers are configured.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.config import McpServer

if TYPE_CHECKING:
    import httpx2
    from mcp import ClientSession

MAX_PAGES = 100


def warm_up() -> None:
    import gateway.mcp.execute  # noqa: F401 - imports the SDK, client and types


def _on_tools_call(headers: Mapping[str, str]) -> Any:
    """An httpx2 request hook adding `headers` to the POST that carries a tools/call only.

    An idempotency key on every POST of the session would make a server that honours it
    take `notifications/initialized` or `tools/list` for a replay of `initialize`.
    """

    async def hook(request: httpx2.Request) -> None:
        if request.method != "POST":
            return
        try:
            message = json.loads(request.content)
        except ValueError:
            return
        if isinstance(message, dict) and message.get("method") == "tools/call":
            request.headers.update(headers)

    return hook


@asynccontextmanager
async def connect(
    server: McpServer,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    call_headers: Mapping[str, str] | None = None,
) -> AsyncIterator[ClientSession]:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp_types import Implementation

    timeout = httpx2.Timeout(connect_timeout, read=server.read_timeout)
    hooks = {"request": [_on_tools_call(call_headers)]} if call_headers else {}
    async with httpx2.AsyncClient(headers=dict(headers), timeout=timeout, event_hooks=hooks) as http:
        transport = streamable_http_client(server.url, http_client=http)
        client = Client(
            transport,
            mode="auto",
            cache=None,
            read_timeout_seconds=server.read_timeout,
            client_info=Implementation(name="agent-gateway", version=__version__),
        )
        async with client:
            yield client.session


async def list_tools(session: ClientSession) -> list[dict[str, Any]]:
    """Every page of `tools/list`, as JSON objects in wire form."""
    from mcp_types import PaginatedRequestParams

    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += [tool.model_dump(by_alias=True, mode="json", exclude_none=True) for tool in page.tools]
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools
