"""Talking to MCP servers over Streamable HTTP: headers in both directions, and streaming.

Requests carry only what the MCP transport defines (an allowlist) plus the gateway's
own credential for that server: the caller's `Authorization` is never forwarded —
the MCP specification forbids token passthrough, and the server would otherwise
trust a token that was minted for the gateway. Responses carry back only MCP and
caching headers, so a server cannot set cookies on, or start an OAuth dance with,
the agent through the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from gateway.config import McpServer, Timeouts
from gateway.problems import UpstreamUnavailable

log = logging.getLogger("gateway.mcp")

SESSION_HEADER = "mcp-session-id"
VERSION_HEADER = "mcp-protocol-version"
REQUEST_HEADERS = frozenset(
    {"accept", "content-type", VERSION_HEADER, "mcp-method", "mcp-name", "last-event-id", "tracestate"}
)
PARAM_HEADER_PREFIX = "mcp-param-"
RESPONSE_HEADERS = frozenset({"content-type", "cache-control", SESSION_HEADER, VERSION_HEADER, "retry-after"})


def request_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in incoming.items()
        if name.lower() in REQUEST_HEADERS or name.lower().startswith(PARAM_HEADER_PREFIX)
    }


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in upstream.items() if name.lower() in RESPONSE_HEADERS}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # already filtered, lower-case names
    body: AsyncIterator[bytes]
    _response: aiohttp.ClientResponse

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    async def read(self, limit: int) -> bytes:
        chunks, size = [], 0
        async for chunk in self.body:
            size += len(chunk)
            if size > limit:
                self.release()
                raise UpstreamUnavailable(f"the MCP server's answer exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def release(self) -> None:
        self._response.release()


class McpForwarder:
    """One pooled aiohttp session for every MCP server; timeouts per server."""

    def __init__(self, timeouts: Timeouts) -> None:
        self._connect = timeouts.connect
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, server: McpServer, method: str, headers: Mapping[str, str], body: bytes | None
    ) -> Reply:
        await self.start()
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect, sock_read=server.read_timeout)
        try:
            response = await self._session.request(
                method, server.url, headers=dict(headers), data=body, allow_redirects=False, timeout=timeout
            )
        except TimeoutError as error:
            raise UpstreamUnavailable(f"MCP server {server.name!r} timed out", status=504) from error
        except aiohttp.ClientError as error:
            raise UpstreamUnavailable(
                f"MCP server {server.name!r} refused or dropped the connection"
            ) from error
        return Reply(response.status, response_headers(response.headers), _stream(server, response), response)


async def _stream(server: McpServer, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    # An event stream may idle for long; past `read_timeout` it ends cleanly, and the
    # client resumes it (Last-Event-ID) or reopens it. Any other silence is a failure.
    sse = response.headers.get("content-type", "").lower().startswith("text/event-stream")
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except TimeoutError as error:
        if sse:
            log.info("MCP server %s: event stream idle for %ss, ended", server.name, server.read_timeout)
            return
        raise UpstreamUnavailable(f"MCP server {server.name!r} went silent mid-answer", status=504) from error
    except aiohttp.ClientError as error:
        raise UpstreamUnavailable(f"MCP server {server.name!r} dropped the stream") from error
    finally:
        response.release()
