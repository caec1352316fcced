"""The configured MCP servers and what the gateway keeps for each: credential, tool catalog, sessions."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from gateway.config import Config, McpServer
from gateway.credentials import Credentials
from gateway.mcp.catalog import ToolCatalog
from gateway.mcp.client import connect, list_tools, warm_up
from gateway.mcp.sessions import SessionBinder
from gateway.mcp.upstream import McpForwarder
from gateway.problems import NotFound, UpstreamUnavailable

log = logging.getLogger("gateway.mcp")


class McpServers:
    def __init__(self, config: Config, credentials: Credentials) -> None:
        self.config = config
        self._servers = {server.name: server for server in config.mcp_servers}
        self._credentials = credentials  # read at start: a missing value fails `serve`
        self._catalogs = {
            server.name: ToolCatalog(self._fetcher(server), ttl=server.schema_ttl)
            for server in config.mcp_servers
        }
        self.forwarder = McpForwarder(config.gateway.timeouts)
        self.sessions = SessionBinder(secrets.token_bytes(32))

    def server(self, name: str) -> McpServer:
        found = self._servers.get(name)
        if found is None:
            raise NotFound(f"no MCP server named {name!r} is configured")
        return found

    def credentials(self, name: str, role: str | None = None) -> dict[str, str]:
        """The gateway's own credential for server `name` (per role, if configured so)."""
        found = self._credentials.header(f"mcp:{name}", role)
        return {found[0]: found[1].reveal()} if found is not None else {}

    def catalog(self, name: str) -> ToolCatalog:
        return self._catalogs[name]

    def _fetcher(self, server: McpServer) -> Any:
        async def fetch() -> list[dict[str, Any]]:
            try:
                async with connect(
                    server,
                    self.credentials(server.name),
                    connect_timeout=self.config.gateway.timeouts.connect,
                ) as session:
                    return await list_tools(session)
            except Exception as error:  # noqa: BLE001 - any failure: the schemas are unknown, fail closed
                log.warning(
                    "listing the tools of MCP server %s failed: %s", server.name, type(error).__name__
                )
                raise UpstreamUnavailable(
                    f"could not list the tools of MCP server {server.name!r}"
                ) from error

        return fetch

    async def start(self) -> None:
        # After Gateway.start generated dev keys, so the gateway key exists by now.
        self.sessions = SessionBinder.from_key_file(self.config.path(self.config.gateway.signing_key))
        await self.forwarder.start()
        if self._servers:
            warm_up()

    async def stop(self) -> None:
        await self.forwarder.stop()
