"""A lean asyncio HTTP/1.1 keep-alive client for loopback benchmarks.

Why it exists: on the project's 2-vCPU machine aiohttp's client costs about 0.4 ms of
CPU per request, the same order as what the commit benchmark measures (a few ms of CPU
per commit, shared by gateways, PostgreSQL, the upstream and the load generator on the
same two cores). Like `wrk`, this client does as little as it can per request: the
request is written as one `bytes` object, the answer is parsed by `httptools` (llhttp,
C), and nothing else is built (no header objects, no cookies, no URL objects, no
decompression). Unlike `wrk`, it sends a fixed set of requests from Python, so a
benchmark keeps checking every answer and timing every request.

    async with Client() as client:
        status, body = await client.request("POST", "http://127.0.0.1:8000/x", {"A": "b"}, b"{}")

Scope: plain `http://`, one request in flight per connection (no pipelining), a small
pool of keep-alive connections per (host, port) with a cap. Answers framed by
`Content-Length`, chunked (decoded by llhttp) or by the end of the connection are
read; `Connection: close` answers close their connection. An idle pooled connection
that the server closed, or that sat idle longer than `idle_timeout`, is replaced by a
new one *before* the request is written. A request is never sent twice: if the
connection fails after the request was written, `request` raises (the benchmarks check
exactly-once effects, and a resend would be a second attempt). `HEAD` is not supported
(llhttp would wait for the body its `Content-Length` announces).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import cast

import httptools

__all__ = ["Client", "ProtocolError"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ProtocolError(ConnectionError):
    """The server's answer could not be parsed, or the connection ended before it was complete."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the `httptools` parser calls back into it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._headers_done = False
        self._framed = False  # Content-Length or Transfer-Encoding seen in the current answer
        self.reusable = False  # open, idle between answers, and the server has not closed it
        self.since = 0.0  # loop time of the last request written, or of the return to the pool

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        with contextlib.suppress(OSError, AttributeError):  # asyncio and uvloop set it already
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reusable = True

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(ProtocolError(f"unparsable answer: {exc!r}"))

    def eof_received(self) -> bool:
        self.reusable = False
        if self._waiter is not None and self._headers_done and not self._framed:
            self._answer()  # a body delimited by the end of the connection
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._transport = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                ProtocolError(
                    "the connection ended after the request was sent, before the answer was complete "
                    "(not retried: the server may have acted on it)" + (f": {exc!r}" if exc else "")
                )
            )
        self._waiter = None

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._framed:
            name = name.lower()
            self._framed = name == b"content-length" or name == b"transfer-encoding"

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:  # an interim answer (100, 103): the real one follows
            self._body, self._headers_done, self._framed = [], False, False
            return
        self._answer()

    # the client's side

    def _answer(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done() or not self._parser.should_keep_alive():
            self.close()  # an answer nobody waits for, or Connection: close
        elif self._transport is not None:
            self.reusable = True
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), b"".join(self._body)))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def send(self, payload: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Write one request; the future gets (status, body) once the answer is complete."""
        if self._transport is None or not self.reusable:
            raise ProtocolError("the connection is not open for a request")
        self.reusable = False
        self._waiter = waiter = self._loop.create_future()
        self._body, self._headers_done, self._framed = [], False, False
        self._transport.write(payload)
        return waiter

    def expire(self, timeout: float) -> None:
        self._fail(TimeoutError(f"no complete answer within {timeout} s"))

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()


class _Pool:
    __slots__ = ("host", "port", "host_line", "idle", "size", "waiters")

    def __init__(self, host: str, port: int, host_line: str) -> None:
        self.host, self.port = host, port
        self.host_line = host_line
        self.idle: list[_Connection] = []
        self.size = 0  # connections open or opening, idle or busy
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()


class Client:
    """Keep-alive HTTP/1.1 client: at most `limit_per_host` connections per (host, port).

    `base_url` (`http://host:port[/prefix]`) lets `request` take a path; `idle_timeout`
    should stay below the servers' own keep-alive timeout (uvicorn: 5 s), so that a
    pooled connection is not reused just as the server closes it; `timeout` bounds each
    request (its connection is closed and `TimeoutError` raised), checked by one watchdog
    every second or so rather than a timer per request. Use a client on one event loop.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        limit_per_host: int = 32,
        idle_timeout: float = 3.0,
        timeout: float | None = 120.0,
    ) -> None:
        if limit_per_host < 1:
            raise ValueError("limit_per_host must be at least 1")
        self._base: tuple[_Pool, str] | None = None
        self._pools: dict[str, _Pool] = {}
        self._limit = limit_per_host
        self._idle_timeout = idle_timeout
        self._timeout = timeout
        self._busy: set[_Connection] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        if base_url is not None:
            pool, prefix = self._split(base_url)
            self._base = pool, prefix.rstrip("/")

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the idle connections now, and each busy one when its request ends."""
        self._closed = True
        if self._watchdog is not None and not self._busy:
            self._watchdog.cancel()
            self._watchdog = None
        for pool in self._pools.values():
            for connection in pool.idle:
                connection.close()
            pool.size -= len(pool.idle)
            pool.idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        """Send one request and return (status, body) of its answer.

        `url` is `http://host:port/path?query`, or a path (`/...`) under `base_url`.
        `headers` are written as given: they must not contain Host, Content-Length,
        Transfer-Encoding or Connection (the client writes what it needs).
        """
        if self._closed:
            raise RuntimeError("the client is closed")
        if method == "HEAD":
            raise ValueError("HEAD is not supported")
        if url.startswith("/"):
            if self._base is None:
                raise ValueError(f"a path ({url}) needs the client's base_url")
            pool, target = self._base[0], self._base[1] + url
        else:
            pool, target = self._split(url)
        if headers:
            fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
            if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
                raise ValueError("a header name or value contains CR or LF")
        else:
            fields = ""
        if body is None and method in _BODY_METHODS:
            body = b""
        head = f"{method} {target} HTTP/1.1\r\n{pool.host_line}{fields}"
        if body is None:
            payload = f"{head}\r\n".encode("latin-1")
        else:
            payload = f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body

        loop = asyncio.get_running_loop()
        connection = self._idle(pool, loop.time()) or await self._connect(pool)
        try:
            answer = connection.send(payload)
            connection.since = loop.time()
            self._busy.add(connection)
            if self._watchdog is None and self._timeout is not None:
                self._watchdog = loop.call_later(min(1.0, self._timeout / 10), self._watch)
            return await answer
        except BaseException:
            connection.close()  # in an unknown state: never reused
            raise
        finally:
            self._busy.discard(connection)
            self._release(pool, connection, loop.time())

    def _watch(self) -> None:
        """Expire the requests older than the timeout; runs every `min(1 s, timeout / 10)`."""
        assert self._timeout is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connection in [c for c in self._busy if now - c.since > self._timeout]:
            connection.expire(self._timeout)
        self._watchdog = None
        if self._busy or not self._closed:
            self._watchdog = loop.call_later(min(1.0, self._timeout / 10), self._watch)

    # the pool

    def _split(self, url: str) -> tuple[_Pool, str]:
        """The pool for the URL's origin, and the request target (path and query)."""
        if not url.startswith("http://"):
            raise ValueError(f"only http:// URLs are supported: {url!r}")
        cut = len(url)
        for mark in "/?#":
            index = url.find(mark, 7)
            if 0 <= index < cut:
                cut = index
        origin, target = url[:cut], url[cut:].split("#", 1)[0]
        if not target.startswith("/"):
            target = "/" + target
        pool = self._pools.get(origin)
        if pool is None:
            authority = origin[7:]
            host, colon, port = authority.rpartition(":")
            if not colon or "]" in port:  # no port (or the tail of an IPv6 literal)
                host, port = authority, "80"
            if not host or not port.isdigit():
                raise ValueError(f"not an http://host[:port] URL: {url!r}")
            pool = _Pool(host.strip("[]"), int(port), f"Host: {authority}\r\n")
            self._pools[origin] = pool
        return pool, target

    def _idle(self, pool: _Pool, now: float) -> _Connection | None:
        """A pooled connection still fit for a request, most recently used first; None if none is."""
        idle = pool.idle
        while idle:
            connection = idle.pop()
            if connection.reusable and now - connection.since < self._idle_timeout:
                return connection
            connection.close()  # closed by the server, or idle too long: replaced, nothing was sent
            pool.size -= 1
        return None

    async def _connect(self, pool: _Pool) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            connection = self._idle(pool, loop.time())
            if connection is not None:
                return connection
            if pool.size < self._limit:
                pool.size += 1
                try:
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(loop), pool.host, pool.port
                    )
                except BaseException:
                    pool.size -= 1
                    self._wake(pool)
                    raise
                if not protocol.reusable:  # closed by the server before anything was sent
                    pool.size -= 1
                    self._wake(pool)
                    raise ProtocolError(f"{pool.host}:{pool.port} closed a new connection at once")
                return protocol
            waiter: asyncio.Future[None] = loop.create_future()
            pool.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake(pool)  # pass the turn on
                else:
                    with contextlib.suppress(ValueError):
                        pool.waiters.remove(waiter)
                raise

    def _release(self, pool: _Pool, connection: _Connection, now: float) -> None:
        if connection.reusable and not self._closed:
            connection.since = now
            pool.idle.append(connection)
        else:
            connection.close()
            pool.size -= 1
        self._wake(pool)

    @staticmethod
    def _wake(pool: _Pool) -> None:
        waiters = pool.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
