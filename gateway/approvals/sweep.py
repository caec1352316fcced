"""The approvals' background work, one task per gateway process: expire, resume, notify.

Every `sweep_interval` seconds: pending approvals past their deadline expire, approved
intents whose approver's request died before the commit ran are run, and queued
webhooks are sent. Each step claims rows with conditional UPDATEs, so replicas
sweeping the same database never do the same work twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.approvals import store
from gateway.approvals.webhook import Webhook
from gateway.background import Pauses

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.approvals")


class ApprovalSweeper:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.interval = gateway.config.approvals.sweep_interval
        self.webhook = Webhook.from_config(gateway.config.approvals)  # ConfigError now if the secret is unset
        self._task: asyncio.Task[None] | None = None
        self._pauses = Pauses()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="approvals-sweep")

    async def stop(self) -> None:
        await self._pauses.stop(self._task)
        self._task = None
        if self.webhook is not None:
            await self.webhook.close()

    async def sweep(self) -> None:
        await store.expire_due(self.gateway)
        await store.resume_approved(self.gateway)
        if self.webhook is not None:
            await self.webhook.deliver_due(self.gateway)

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next tick
                log.exception("approvals sweep failed")
            if not await self._pauses.pause(self.interval):
                return
