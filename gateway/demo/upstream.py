"""A demo tool upstream that counts every effect, so tests and evals can check exactly-once.

It honours `Idempotency-Key` the way a careful payments API does: a repeated key
returns the first answer without a second effect. `/_effects` lists every effect
it performed (the test oracle), `/_reset` clears them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class EffectLog:
    def __init__(self) -> None:
        self.effects: list[dict[str, Any]] = []
        self.by_key: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []
        self.ids = itertools.count(1)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def create_upstream(log: EffectLog | None = None) -> Starlette:
    effects = log or EffectLog()

    async def _body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        return json.loads(raw) if raw else {}

    async def effect(request: Request) -> Response:
        tool = request.path_params["tool"]
        effects.calls[tool] += 1
        effects.headers.append(dict(request.headers))
        arguments = await _body(request)
        delay = float(arguments.get("delay", 0)) if isinstance(arguments, dict) else 0.0
        if delay:
            await asyncio.sleep(min(delay, 30.0))
        if isinstance(arguments, dict) and arguments.get("fail"):
            return JSONResponse({"error": "the tool failed as asked"}, status_code=500)
        key = request.headers.get("idempotency-key")
        if key and key in effects.by_key:
            return JSONResponse(effects.by_key[key], headers={"Idempotent-Replayed": "true"})
        result = {"id": f"fx_{next(effects.ids)}", "tool": tool, "arguments": arguments, "status": "done"}
        effects.effects.append({**result, "idempotency_key": key})
        if key:
            effects.by_key[key] = result
        return JSONResponse(result, status_code=200)

    async def search(request: Request) -> Response:
        effects.calls["docs.search"] += 1
        effects.headers.append(dict(request.headers))
        query = request.query_params.get("q", "")
        return JSONResponse({"query": query, "results": [f"result for {query}"]})

    async def stream(request: Request) -> Response:
        count = min(int(request.query_params.get("chunks", "5")), 1000)
        pause = min(float(request.query_params.get("pause", "0.05")), 2.0)

        async def chunks() -> Any:
            for index in range(count):
                yield f"chunk {index}\n".encode()
                await asyncio.sleep(pause)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def echo(request: Request) -> Response:
        effects.headers.append(dict(request.headers))
        body = await request.body()
        return JSONResponse(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": dict(request.headers),
                "body_bytes": len(body),
            }
        )

    async def slow(request: Request) -> Response:
        await asyncio.sleep(min(float(request.query_params.get("seconds", "5")), 30.0))
        return JSONResponse({"slow": True})

    async def listing(request: Request) -> Response:
        return JSONResponse({"effects": effects.effects, "calls": dict(effects.calls)})

    async def reset(request: Request) -> Response:
        effects.reset()
        return JSONResponse({"reset": True})

    app = Starlette(
        routes=[
            Route("/search", search, methods=["GET", "POST"]),
            Route("/stream", stream, methods=["GET"]),
            Route("/echo", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            Route("/echo/{rest:path}", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            Route("/slow", slow, methods=["GET", "POST"]),
            Route("/_effects", listing, methods=["GET"]),
            Route("/_reset", reset, methods=["POST"]),
            Route("/effects/{tool}", effect, methods=["POST"]),
        ]
    )
    app.state.effects = effects
    return app
