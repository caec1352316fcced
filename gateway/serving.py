"""`agent-gateway serve`: uvicorn, with a drain before the graceful shutdown.

    SIGTERM (or SIGINT)   Gateway.draining = True: /readyz answers 503 at once, so the
                          balancer (a Kubernetes Service, a health-checking proxy) stops
                          sending new calls, while calls that still arrive are served
    + drain_seconds       uvicorn shuts down: it closes its listening socket (new
                          connections are refused), closes idle keep-alive connections
                          and gives requests in flight up to shutdown_timeout to finish
    lifespan shutdown     Gateway.stop() waits for commits and compensations still running,
                          so a clean shutdown never leaves an intent `executing` (or a step
                          `running`), then closes the rest

A second signal during the drain skips what is left of it.
"""

from __future__ import annotations

import logging
import math
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from gateway.state import Gateway

log = logging.getLogger("gateway")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_seconds: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_seconds = drain_seconds
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None and not self.should_exit:
            # Runs in the signal handler: only flags are set here, the loop does the rest.
            self.drain_started = time.monotonic()
            self.gateway.draining = True
            if self.drain_seconds > 0:
                log.warning("signal %d: draining for %.1f s, then shutting down", sig, self.drain_seconds)
                return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        started = self.drain_started
        if started is not None and not self.should_exit and time.monotonic() - started >= self.drain_seconds:
            log.warning("drain over: refusing new connections, finishing requests in flight")
            self.should_exit = True
        return await super().on_tick(counter)


def serve(app: Starlette, *, host: str, port: int, log_level: str) -> bool:
    """Serve until a signal and the drain; False when the app failed to start."""
    gateway: Gateway = app.state.gateway
    settings = gateway.config.gateway
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
    )
    server = DrainingServer(config, gateway, settings.drain_seconds)
    server.run()
    return server.started
