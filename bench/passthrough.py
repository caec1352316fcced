"""The benchmark's baseline: a plain pass-through HTTP proxy with no checks at all.

    python bench/passthrough.py --port 9102 --upstream http://127.0.0.1:9101

aiohttp server + one pooled aiohttp client session, one process: every request's
method, path, query, headers (less hop-by-hop ones) and body go to the upstream,
and its status, headers and body come back. No authentication, no policy, no
log: what the gateway's read path costs is measured against this.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def _clean(headers: object) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() not in HOP_BY_HOP}  # type: ignore[attr-defined]


async def serve(host: str, port: int, upstream: str) -> None:
    upstream = upstream.rstrip("/")
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read() if request.body_exists else None
        async with session.request(
            request.method,
            upstream + request.path_qs,
            headers=_clean(request.headers),
            data=body,
            allow_redirects=False,
        ) as response:
            payload = await response.read()
            return web.Response(status=response.status, headers=_clean(response.headers), body=payload)

    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9101")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, args.upstream))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
