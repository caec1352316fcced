"""The `opa` engine: decisions from an OPA server, through opa-python-client.

The OPA server owns its policies (the operator pushes them, or OPA pulls
bundles); the gateway only asks `POST /v1/data/gateway/decision`. The async
client holds an aiohttp session that exists only between `__aenter__` and
`__aexit__`, so one client is entered in `start()` and exited in `stop()`.

Failing closed: an unreachable server, a timeout or an HTTP error is
PolicyUnavailable (503); an undefined decision (`{}`) is a deny. `version`
is empty while the server is unreachable, so /readyz reports not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opa_client import AsyncOpaClient

from gateway.config import ConfigError
from gateway.policy.decision import Decision, decision_from_result
from gateway.policy.decision_log import DecisionLog
from gateway.problems import PolicyUnavailable

log = logging.getLogger("gateway.policy")

# OPA reports its own evaluation time and the bundle revisions that decided.
QUERY_PARAMS = {"metrics": "true", "provenance": "true"}


def _provenance_version(body: dict[str, Any]) -> str:
    """`opa:<bundle>@<revision>,...` from a response's provenance, else `opa`."""
    provenance = body.get("provenance")
    bundles = provenance.get("bundles") if isinstance(provenance, dict) else None
    if not isinstance(bundles, dict) or not bundles:
        return "opa"
    revisions = (
        f"{name}@{info.get('revision', '') if isinstance(info, dict) else ''}"
        for name, info in bundles.items()
    )
    return "opa:" + ",".join(sorted(revisions))


class OpaEngine:
    def __init__(
        self,
        url: str,
        *,
        decision_log: DecisionLog | None = None,
        health_interval: float = 1.0,
        timeout: float = 2.0,
        retries: int = 1,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            raise ConfigError(f"policy.opa_url: expected http(s)://host:port, got {url!r}")
        self.url = url
        self._client_args: dict[str, Any] = {
            "host": parts.hostname,
            "port": parts.port or (443 if parts.scheme == "https" else 8181),
            "ssl": parts.scheme == "https",
            "timeout": timeout,
            "retries": retries,
        }
        self.decision_log = decision_log
        self.health_interval = health_interval
        self._client: AsyncOpaClient | None = None
        self._version = ""
        self._last_reload: dict[str, Any] = {"ok": False, "error": "not started", "at": None}
        self._watcher: asyncio.Task[None] | None = None

    @property
    def version(self) -> str:
        return self._version

    @property
    def last_reload(self) -> dict[str, Any]:
        return dict(self._last_reload)

    async def start(self) -> None:
        if self._client is None:
            client = AsyncOpaClient(**self._client_args)
            await client.__aenter__()
            self._client = client
        await self.check_health()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="opa-health")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)

    async def check_health(self) -> bool:
        healthy = self._client is not None and await self._client.check_health()
        if healthy and not self._version:
            self._version = "opa"
        elif not healthy:
            self._version = ""
        error = None if healthy else f"OPA server at {self.url} is not healthy or unreachable"
        self._last_reload = {
            "ok": healthy,
            "error": error,
            "at": datetime.now(UTC).isoformat(),
            "version": self._version,
        }
        return healthy

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_health()
            except Exception:  # the watcher must outlive any one failed probe
                log.exception("OPA health check failed")

    async def decide(self, input: dict[str, Any], *, labels: dict[str, Any] | None = None) -> Decision:
        client = self._client
        if client is None:
            raise PolicyUnavailable("the OPA engine is not started")
        started = time.perf_counter_ns()
        try:
            body = await client.query_rule(input, "gateway", "decision", query_params=QUERY_PARAMS)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
            self._version = ""
            detail = f"{type(error).__name__}: {error}".rstrip(": ")
            raise PolicyUnavailable(f"OPA server at {self.url} failed: {detail}") from error
        if not isinstance(body, dict):
            body = {"error": "OPA answered with something other than a JSON object"}
        metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
        eval_ns = metrics.get("timer_rego_query_eval_ns") or time.perf_counter_ns() - started
        self._version = _provenance_version(body)
        raw = {key: body[key] for key in ("result", "error") if key in body}
        decision = decision_from_result(raw, policy_version=self._version)
        if self.decision_log is not None:
            self.decision_log.record(decision, input, labels=labels, eval_ns=eval_ns)
        return decision
