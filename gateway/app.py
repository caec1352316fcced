"""The ASGI application: routes, error handling and lifespan, built in one visible place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway import approvals, commits, intents, mcp, memory, metrics, openapi, traces, web
from gateway.config import Config
from gateway.pipeline import handle_tool_call
from gateway.problems import GatewayError, MethodNotAllowed, NotFound, problem_response
from gateway.refusals import record_refusal
from gateway.state import Gateway

log = logging.getLogger("gateway")

Endpoint = Callable[[Gateway, Request], Awaitable[Response]]
TOOL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def bind(gateway: Gateway, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        return await endpoint(gateway, request)

    handler.__name__ = endpoint.__name__
    return handler


async def healthz(gateway: Gateway, request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(gateway: Gateway, request: Request) -> Response:
    checks: dict[str, Any] = {"policy": gateway.policy.last_reload, "draining": gateway.draining}
    ready = not gateway.draining and bool(gateway.policy.version)
    try:
        await gateway.db.ping()
        checks["database"] = "ok"
    except Exception:  # noqa: BLE001 - any failure means not ready
        checks["database"] = "unreachable"
        ready = False
    # Reported, not a reason to leave the pool: every replica shares the one store, and
    # tools without limits keep working while limited calls fail closed with 503.
    checks["rate_limits"] = await gateway.limiter.check()
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def jwks(gateway: Gateway, request: Request) -> Response:
    """The gateway's public key, for tools that verify `Gateway-Assertion`."""
    return JSONResponse(gateway.assertions.jwks(), headers={"Cache-Control": "max-age=300"})


def core_routes(gateway: Gateway) -> list[BaseRoute]:
    return [
        Route("/healthz", bind(gateway, healthz), methods=["GET"]),
        Route("/readyz", bind(gateway, readyz), methods=["GET"]),
        Route("/metrics", bind(gateway, metrics.endpoint), methods=["GET"]),
        Route("/openapi.json", bind(gateway, openapi.endpoint), methods=["GET"]),
        Route("/.well-known/jwks.json", bind(gateway, jwks), methods=["GET"]),
        Route("/tools/{tool}", bind(gateway, handle_tool_call), methods=TOOL_METHODS),
        Route("/tools/{tool}/{rest:path}", bind(gateway, handle_tool_call), methods=TOOL_METHODS),
    ]


def _trace_id(request: Request) -> str | None:
    header = request.headers.get("traceparent", "")
    parts = header.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


async def on_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    await record_refusal(request.app.state.gateway, request, exc)
    return problem_response(exc, trace_id=_trace_id(request))


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: GatewayError = NotFound(f"no route for {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = GatewayError(str(exc.detail), status=exc.status_code, name="http-error", title="HTTP error")
    return problem_response(error, headers=dict(exc.headers or {}))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(GatewayError("the gateway hit an unexpected error; it has been logged"))


def create_app(config: Config, *, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(
        routes=core_routes(gateway)
        + intents.routes(gateway)
        + commits.routes(gateway)
        + approvals.routes(gateway)
        + web.routes(gateway)
        + traces.routes(gateway)
        + memory.routes(gateway)
        + mcp.routes(gateway)
        + (extra_routes or []),
        exception_handlers={
            GatewayError: on_gateway_error,
            HTTPException: on_http_exception,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app


def from_environment() -> Starlette:
    """For `uvicorn --factory gateway.app:from_environment --workers N`: the file named by
    AGENT_GATEWAY_CONFIG (default gateway.toml). Set PROMETHEUS_MULTIPROC_DIR for /metrics."""
    from gateway.config import load_config

    return create_app(load_config())
