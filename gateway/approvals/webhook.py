"""The new-approval webhook: an outbox in the `approvals` table, drained in the background.

A pending approval is born `webhook_state = 'queued'` in the commit's own transaction,
so the commit path never waits for the receiver. The sweep claims due rows with a
conditional UPDATE (attempts = what it read), so of several replicas exactly one sends
each attempt; a claim is a lease (`webhook_next_at`), so a replica that dies mid-send
is followed by another's retry. Delivery is at least once: receivers dedupe on
`X-Agent-Gateway-Delivery` (the approval id).

    POST <webhook_url>
    Content-Type: application/json
    X-Signature: sha256=<hex HMAC-SHA256(secret, body)>
    X-Agent-Gateway-Event: approval.requested
    X-Agent-Gateway-Delivery: <approval_id>

Any 2xx is delivered; anything else (or no answer) is retried after backoff * 2^(n-1)
seconds, up to `webhook_max_attempts`; then the row is `failed` and a warning logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import or_, select, update

from gateway import ledger
from gateway.approvals.store import PENDING, Loaded, utcnow, view
from gateway.config import ApprovalsSection, ConfigError
from gateway.storage.models import Approval, Intent

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.approvals.webhook")

QUEUED, DELIVERED, FAILED, SKIPPED = "queued", "delivered", "failed", "skipped"
EVENT = "approval.requested"
BATCH = 20


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """For receivers (and tests): constant-time comparison of `X-Signature`."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)


class Webhook:
    def __init__(
        self, settings: ApprovalsSection, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        assert settings.webhook_url is not None and settings.webhook_secret_env is not None
        secret = os.environ.get(settings.webhook_secret_env, "")
        if not secret:
            raise ConfigError(
                f"approvals.webhook_secret_env: environment variable {settings.webhook_secret_env} is not set"
            )
        self.url = settings.webhook_url
        self._secret = secret.encode()
        self.settings = settings
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.webhook_timeout), follow_redirects=False, transport=transport
        )

    def __repr__(self) -> str:  # the secret never shows up in logs
        return f"Webhook({self.url!r}, secret=***)"

    @classmethod
    def from_config(cls, settings: ApprovalsSection) -> Webhook | None:
        return cls(settings) if settings.webhook_url else None

    async def close(self) -> None:
        await self._http.aclose()

    def body(self, loaded: Loaded, attempt: int) -> bytes:
        approval = view(loaded)
        base = (self.settings.public_url or "").rstrip("/")
        payload: dict[str, Any] = {
            "event": EVENT,
            "delivery_id": loaded.approval.approval_id,
            "attempt": attempt,
            "sent_at": ledger.timestamp(utcnow()),
            "approval": {
                key: approval[key]
                for key in (
                    "approval_id",
                    "intent_id",
                    "task_id",
                    "tool",
                    "arguments",
                    "status",
                    "approvals_required",
                    "reasons",
                    "requested_by",
                    "proposer",
                    "verifier",
                    "created_at",
                    "expires_at",
                )
            },
            "links": {name: base + path for name, path in approval["links"].items()},
        }
        return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()

    async def send(self, body: bytes, delivery_id: str) -> bool:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "agent-gateway-webhook/1",
            "X-Signature": signature(self._secret, body),
            "X-Agent-Gateway-Event": EVENT,
            "X-Agent-Gateway-Delivery": delivery_id,
        }
        try:
            response = await self._http.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as error:
            log.warning("approval webhook %s: %s", delivery_id, type(error).__name__)
            return False
        if response.is_success:
            return True
        log.warning("approval webhook %s: receiver answered %d", delivery_id, response.status_code)
        return False

    def backoff(self, attempts: int) -> timedelta:
        return timedelta(seconds=self.settings.webhook_backoff_seconds * 2 ** max(attempts - 1, 0))

    async def deliver_due(self, gateway: Gateway) -> int:
        """Send every due notification once (concurrently); returns how many were delivered."""
        now = utcnow()
        async with gateway.db.reading() as session:
            rows = (
                await session.execute(
                    select(Approval, Intent)
                    .join(Intent, Intent.intent_id == Approval.intent_id)
                    .where(
                        Approval.webhook_state == QUEUED,
                        or_(Approval.webhook_next_at.is_(None), Approval.webhook_next_at <= now),
                    )
                    .order_by(Approval.created_at)
                    .limit(BATCH)
                )
            ).all()
        results = await asyncio.gather(
            *(self._deliver(gateway, Loaded(approval, intent, [])) for approval, intent in rows)
        )
        return sum(results)

    async def _deliver(self, gateway: Gateway, loaded: Loaded) -> bool:
        approval = loaded.approval
        table = Approval.__table__
        same = (table.c.approval_id == approval.approval_id, table.c.webhook_state == QUEUED)
        if approval.status != PENDING:  # decided before anyone was told: nothing to ask for any more
            async with gateway.db.transaction() as session:
                await session.execute(update(table).where(*same).values(webhook_state=SKIPPED))
            return False
        attempt = approval.webhook_attempts + 1
        lease = utcnow() + timedelta(seconds=self.settings.webhook_timeout + 5)
        async with gateway.db.transaction() as session:
            claimed = await session.execute(
                update(table)
                .where(*same, table.c.webhook_attempts == approval.webhook_attempts)
                .values(webhook_attempts=attempt, webhook_next_at=lease)
            )
        if claimed.rowcount != 1:
            return False  # another replica has it
        delivered = await self.send(self.body(loaded, attempt), approval.approval_id)
        if delivered:
            values: dict[str, Any] = {"webhook_state": DELIVERED, "webhook_next_at": None}
        elif attempt >= self.settings.webhook_max_attempts:
            log.warning("approval webhook %s: giving up after %d attempts", approval.approval_id, attempt)
            values = {"webhook_state": FAILED, "webhook_next_at": None}
        else:
            values = {"webhook_next_at": utcnow() + self.backoff(attempt)}
        async with gateway.db.transaction() as session:
            await session.execute(
                update(table).where(*same, table.c.webhook_attempts == attempt).values(**values)
            )
        return delivered
