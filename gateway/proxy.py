"""Forwarding to tool upstreams.

aiohttp's client is used rather than httpx: measured on this machine under 32
concurrent connections, httpx's default pool forwarded about a tenth of the
requests per second (see bench/README.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import aiohttp
from starlette.requests import Request

from gateway.config import Timeouts
from gateway.problems import BadRequest, PayloadTooLarge, UpstreamUnavailable

# RFC 9110 §7.6.1 hop-by-hop fields, plus what the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Credentials of the caller never travel upstream: the tool gets the gateway's own.
# Forwarding headers sent by an agent are unverified claims, so they are dropped too.
CALLER_ONLY = frozenset(
    {
        "authorization",
        "cookie",
        "agent-handoff",
        "gateway-assertion",
        "traceparent",
        "tracestate",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    }
)


def upstream_request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    connection_listed = {
        token.strip().lower() for token in headers.get("connection", "").split(",") if token.strip()
    }
    drop = HOP_BY_HOP | CALLER_ONLY | connection_listed
    return {name: value for name, value in headers.items() if name.lower() not in drop}


def downstream_response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    connection_listed = {
        token.strip().lower() for token in headers.get("connection", "").split(",") if token.strip()
    }
    drop = HOP_BY_HOP | connection_listed | {"set-cookie", "server", "date", "content-encoding"}
    return {name: value for name, value in headers.items() if name.lower() not in drop}


def upstream_url(base: str, rest: str, query: str) -> str:
    """Join the configured URL with the caller's sub-path, never leaving the configured origin."""
    url = base
    if rest:
        segments = rest.split("/")
        if any(segment in {".", ".."} for segment in segments):
            raise BadRequest("path segments '.' and '..' are not allowed")
        url = base.rstrip("/") + "/" + "/".join(quote(segment, safe="") for segment in segments)
    if query:
        url += ("&" if urlsplit(url).query else "?") + query
    return url


def check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")


async def stream_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body chunk by chunk, stopped with 413 as soon as it passes `limit`."""
    check_declared_length(request, limit)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        if chunk:
            yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body (for JSON arguments that policy and schemas read)."""
    return b"".join([chunk async for chunk in stream_body(request, limit)])


def has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return (length is not None and length != "0") or "transfer-encoding" in request.headers


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]
    release: aiohttp.ClientResponse
    # The upstream's declared length; Content-Length itself is not passed downstream.
    content_length: int | None = None


KEEPALIVE_SECONDS = 4.0


class Forwarder:
    """One pooled aiohttp session for every upstream, with finite timeouts."""

    def __init__(self, timeouts: Timeouts, *, pool_size: int = 256) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            # Idle connections are dropped before common servers drop them (uvicorn: 5 s),
            # so a commit is never written onto a connection the upstream already closed:
            # such a call would have to be recorded `unknown`.
            connector = aiohttp.TCPConnector(
                limit=self._pool_size, ttl_dns_cache=300, keepalive_timeout=KEEPALIVE_SECONDS
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | AsyncIterator[bytes] | None
    ) -> UpstreamResponse:
        await self.start()
        assert self._session is not None
        try:
            response = await self._session.request(
                method, url, headers=dict(headers), data=body, allow_redirects=False
            )
        except PayloadTooLarge:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as error:
            raise UpstreamUnavailable("tool upstream timed out", status=504) from error
        except aiohttp.ClientError as error:
            # aiohttp wraps what a streamed body raised; the size limit is the caller's fault.
            cause = _find_cause(error, PayloadTooLarge)
            if cause is not None:
                raise cause from None
            raise UpstreamUnavailable("tool upstream refused or dropped the connection") from error
        return UpstreamResponse(
            response.status,
            downstream_response_headers(response.headers),
            _stream(response),
            response,
            response.content_length,
        )

    async def call(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        """Send and read the whole answer: for commits, whose result is stored."""
        response = await self.send(method, url, headers, body)
        chunks = [chunk async for chunk in response.body]
        return response.status, response.headers, b"".join(chunks)


def _find_cause(error: BaseException, kind: type[PayloadTooLarge]) -> PayloadTooLarge | None:
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def _stream(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ServerTimeoutError) as error:
        raise UpstreamUnavailable("tool upstream timed out mid-response", status=504) from error
    except aiohttp.ClientError as error:
        raise UpstreamUnavailable("tool upstream dropped the connection mid-response") from error
    finally:
        response.release()
