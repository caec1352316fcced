"""Prometheus metrics, served at `/metrics` (deploy/grafana's dashboard reads these names).

    agent_gateway_requests_total{tool,decision,status}  direct tool calls; decision is
                                                         allow | deny | none (refused before policy)
    agent_gateway_stage_seconds{stage}                   histogram per pipeline stage (STAGES)
    agent_gateway_commits_total{outcome}                 committed | failed | unknown
    agent_gateway_commit_batch_size{step}                calls per statement of a commit's
                                                         reserve | record step (PostgreSQL)
    agent_gateway_rate_limited_total{tool}               calls refused with 429
    agent_gateway_rate_limit_storage_up                  1 while the rate-limit store answers
    agent_gateway_approvals_pending                      read from the database at scrape time
    agent_gateway_ledger_head_seq                        read from the database at scrape time
    agent_gateway_policy_version_info{version}           1 for the policy version serving
    agent_gateway_policy_reload_success                  1 when the latest (re)load succeeded

Every series is created with fixed label values (configured tool names, never a name
from a request), so a caller cannot grow the label set. The hot path only looks up a
label child and adds to it; stage timers are pre-resolved children.

Several worker processes (uvicorn --workers): with PROMETHEUS_MULTIPROC_DIR set before
start, each worker writes its values to files in that folder, and whichever worker
answers /metrics sums counters and histograms over all of them; the gauges take the
most recent value of a live worker. The folder must be emptied before the workers start.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response

from gateway.storage.models import Approval, LedgerHead

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("authenticate", "envelope", "schema", "rate_limit", "policy", "upstream", "record")
# From 50 µs (a token check) to 30 s (the default upstream read timeout).
BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
COMMIT_OUTCOMES = ("committed", "failed", "unknown")
COMMIT_STEPS = ("reserve", "record")
# gateway/commits/batched.py: a call alone, or up to BATCH_LIMIT (32) together.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
SCRAPE_QUERY_TIMEOUT = 2.0


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """One gateway's metrics, in a registry of its own (tests run many gateways in one process)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "agent_gateway_requests",
            "Direct tool calls by tool, policy decision and HTTP status.",
            ("tool", "decision", "status"),
            registry=registry,
        )
        stage = Histogram(
            "agent_gateway_stage_seconds",
            "Seconds spent in each pipeline stage.",
            ("stage",),
            buckets=BUCKETS,
            registry=registry,
        )
        self.stage = {name: stage.labels(name) for name in STAGES}
        commits = Counter(
            "agent_gateway_commits",
            "Commits that reached the tool, by outcome.",
            ("outcome",),
            registry=registry,
        )
        self.commits = {outcome: commits.labels(outcome) for outcome in COMMIT_OUTCOMES}
        batch = Histogram(
            "agent_gateway_commit_batch_size",
            "Calls per statement of the commit's one-statement steps on PostgreSQL, by step.",
            ("step",),
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.commit_batches = {step: batch.labels(step) for step in COMMIT_STEPS}
        self.rate_limited = Counter(
            "agent_gateway_rate_limited",
            "Calls refused by a rate limit, by tool.",
            ("tool",),
            registry=registry,
        )
        self.rate_limit_storage_up = self._gauge(
            "agent_gateway_rate_limit_storage_up", "1 while the rate-limit store answers, else 0."
        )
        self.rate_limit_storage_up.set(1)
        self.approvals_pending = self._gauge("agent_gateway_approvals_pending", "Approvals waiting.")
        self.ledger_head_seq = self._gauge("agent_gateway_ledger_head_seq", "Sequence of the ledger head.")
        self.policy_reload_success = self._gauge(
            "agent_gateway_policy_reload_success", "1 when the latest policy (re)load succeeded, else 0."
        )
        self.policy_version = self._gauge(
            "agent_gateway_policy_version_info", "The policy version serving (value 1).", ("version",)
        )
        self._version: str | None = None
        self._requests: dict[tuple[str, str, int], Any] = {}

    def _gauge(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry, multiprocess_mode="livemostrecent")

    def request(self, tool: str, decision: str, status: int) -> None:
        key = (tool, decision, status)
        child = self._requests.get(key)
        if child is None:  # labels() costs several times a cached child's inc()
            child = self._requests[key] = self.requests.labels(tool, decision, str(status))
        child.inc()

    def commit(self, outcome: str) -> None:
        counter = self.commits.get(outcome)
        if counter is not None:
            counter.inc()

    def commit_batch(self, step: str, size: int) -> None:
        histogram = self.commit_batches.get(step)
        if histogram is not None:
            histogram.observe(size)

    def policy(self, version: str, ok: bool) -> None:
        self.policy_reload_success.set(1 if ok else 0)
        if version != self._version:
            if self._version:
                self.policy_version.labels(self._version).set(0)
                if not multiprocess_dir():  # worker files cannot drop a series; it stays at 0
                    self.policy_version.remove(self._version)
            if version:
                self.policy_version.labels(version).set(1)
            self._version = version

    def exposition(self) -> bytes:
        if multiprocess_dir():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


async def refresh(gateway: Gateway) -> None:
    """The gauges that are cheaper to read when scraped than to keep up to date."""
    metrics = gateway.metrics
    metrics.policy(gateway.policy.version, bool(gateway.policy.last_reload.get("ok")))
    try:
        async with asyncio.timeout(SCRAPE_QUERY_TIMEOUT), gateway.db.sessions() as session:
            pending = await session.scalar(
                select(func.count()).select_from(Approval).where(Approval.status == "pending")
            )
            head = await session.scalar(select(LedgerHead.seq).where(LedgerHead.id == 1))
    except Exception as error:  # noqa: BLE001 - a scrape shows the last values rather than failing
        log.warning("metrics: database gauges not refreshed: %s", type(error).__name__)
        return
    metrics.approvals_pending.set(pending or 0)
    metrics.ledger_head_seq.set(head or 0)


async def endpoint(gateway: Gateway, request: Request) -> Response:
    await refresh(gateway)
    if multiprocess_dir():  # reads every worker's files: off the event loop
        body = await asyncio.to_thread(gateway.metrics.exposition)
    else:
        body = gateway.metrics.exposition()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
