"""A fast, minimal tool upstream for the read-path benchmark.

    python bench/upstream.py --port 9101

aiohttp's low-level server (C HTTP parser), one process, no routing framework:
`GET /search?q=...` answers a small JSON document, `GET /healthz` answers "ok".
It must never be the bottleneck of what is being measured, so it does as little
as a real upstream possibly could.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

SEARCH_BODY = json.dumps(
    {"query": "gateway", "results": [{"id": "doc-1", "title": "Agent gateway", "score": 0.93}]},
    separators=(",", ":"),
).encode()


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    if request.path == "/search":
        return web.Response(body=SEARCH_BODY, content_type="application/json")
    if request.path == "/healthz":
        return web.Response(text="ok")
    return web.Response(status=404, text="not found")


async def serve(host: str, port: int) -> None:
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
