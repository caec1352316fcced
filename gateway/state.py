"""The running gateway: configuration plus every long-lived component, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from gateway import memory
from gateway.approvals.sweep import ApprovalSweeper
from gateway.commits import batched
from gateway.commits.recovery import Recovery
from gateway.config import Config
from gateway.credentials import AssertionSigner, Credentials
from gateway.envelopes import EnvelopeVerifier
from gateway.identity import Revocations, TokenVerifier
from gateway.keys import generate_dev_keys
from gateway.ledger import ensure_head
from gateway.mcp import McpServers
from gateway.metrics import Metrics
from gateway.policy import DecisionLog, PolicyEngine, build_engine
from gateway.problems import GatewayError
from gateway.proxy import Forwarder
from gateway.ratelimits import RateLimiter
from gateway.schemas import ToolSchemas
from gateway.storage import Database, upgrade_database
from gateway.storage.models import Intent, LedgerEntry

log = logging.getLogger("gateway")

# (session, intent, its `committed` ledger entry), inside the transaction that records the commit.
CommitHook = Callable[[AsyncSession, Intent, LedgerEntry], Awaitable[None]]
# (session, intent), inside the transaction that makes the intent `executing`; raising refuses.
ReserveHook = Callable[[AsyncSession, Intent], Awaitable[None]]
T = TypeVar("T")


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.instance_id = uuid.uuid4().hex[:12]
        self.keys_dir = config.path(config.gateway.keys_dir)
        self.db = Database(
            config.database_url,
            pool_size=config.gateway.db_pool_size,
            max_overflow=config.gateway.db_max_overflow,
            statement_pool_size=config.gateway.db_statement_pool_size,
        )
        self.revocations = Revocations(self.db)
        self.tokens = TokenVerifier(
            config.issuers,
            config.gateway.audience,
            self.keys_dir,
            self.revocations,
            base_dir=Path(config.base_dir),
        )
        self.envelopes = EnvelopeVerifier(config, self.keys_dir)
        self.schemas = ToolSchemas(config)
        log_path = config.gateway.decision_log
        self.decision_log = DecisionLog(
            config.path(log_path) if log_path else None, instance_id=self.instance_id
        )
        self.policy: PolicyEngine = build_engine(config, self.decision_log)
        self.forwarder = Forwarder(config.gateway.timeouts)
        self.draining = False
        self.stopping = False
        self.metrics = Metrics()
        batched.observe(self.db, self.metrics.commit_batch)
        self.limiter = RateLimiter(config, self.metrics)
        self.credentials = Credentials(config)  # ConfigError now if a value is missing
        self.mcp = McpServers(config, self.credentials)
        self.assertions = AssertionSigner(config)
        # Work that must finish even when its request is cancelled: stop() waits for it.
        self.executions: set[asyncio.Future[Any]] = set()
        # Intents this process is committing or compensating right now (commits.execute,
        # commits.compensate): the recovery sweep leaves these alone.
        self.in_flight: Counter[str] = Counter()
        # Commit protocol: how long a racing commit waits for the winner's stored result,
        # callbacks run in the transaction that records a commit (memory writes), recovery.
        self.commit_wait = 2.0
        self.commit_hooks: list[CommitHook] = []
        self.reserve_hooks: list[ReserveHook] = []
        self.recovery = Recovery(self)
        memory.install(self)  # reserve/commit hooks, and the goals behind `goal_revision`
        self.approvals = ApprovalSweeper(self)  # expiry, webhooks (ConfigError if its secret is unset)
        self._revocation_refresh: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.config.issuers:
            # Embedded defaults: the dev issuer. Only missing files are created.
            created = generate_dev_keys(self.keys_dir)
            if created:
                log.warning("generated dev keys in %s (never use them in production)", self.keys_dir)
        if self.assertions.required:
            self.assertions.load()
        await upgrade_database(self.config.database_url)
        await self.revocations.refresh()
        await self.policy.start()
        await self.forwarder.start()
        await self.limiter.start()
        await self.mcp.start()
        await ensure_head(self.db)
        await self.recovery.start()
        await self.approvals.start()
        self._revocation_refresh = asyncio.create_task(self.revocations.run())

    @contextmanager
    def working_on(self, intent_id: str) -> Iterator[None]:
        """Count `intent_id` in `in_flight` while the block runs (the sweep leaves it alone)."""
        self.in_flight[intent_id] += 1
        try:
            yield
        finally:
            self.in_flight[intent_id] -= 1
            if self.in_flight[intent_id] <= 0:
                del self.in_flight[intent_id]

    async def complete(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work` (a commit, a compensation walk) even when the caller is cancelled.

        A cancelled request leaves the work running, and stop() closes nothing it needs
        until it is done, so a clean shutdown never leaves an intent `executing`. What
        the work raises once nobody awaits it is logged here (asyncio would otherwise
        report every refusal as an exception never retrieved).
        """
        future = asyncio.ensure_future(work)
        self.executions.add(future)
        future.add_done_callback(self.executions.discard)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_report_unawaited)
            raise

    async def stop(self) -> None:
        self.stopping = True  # work waiting on another replica's intent gives up now
        if self.executions:
            timeouts = self.config.gateway.timeouts
            log.info("waiting for %d commit(s) or compensation(s) in flight", len(self.executions))
            await asyncio.wait(set(self.executions), timeout=timeouts.connect + timeouts.read + 15)
        await self.revocations.pauses.stop(self._revocation_refresh)
        self._revocation_refresh = None
        await self.approvals.stop()
        await self.recovery.stop()
        await self.forwarder.stop()
        await self.mcp.stop()
        await self.policy.stop()
        await self.limiter.stop()
        self.decision_log.close()
        await self.db.close()


def _report_unawaited(future: asyncio.Future[Any]) -> None:
    """The outcome of work whose caller went away (`Gateway.complete`)."""
    if future.cancelled():
        return
    error = future.exception()
    if isinstance(error, GatewayError):  # a refusal the caller would have received
        log.info("work whose caller went away ended with %s: %s", error.name, error.detail)
    elif error is not None:
        log.error("work whose caller went away failed", exc_info=error)
