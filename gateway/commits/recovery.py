"""Crash recovery: intents left `executing` by a dead gateway become `unknown`.

Every gateway process registers itself in `gateway_instances` and beats every
`heartbeat` seconds. An executor is dead when its row is gone (clean stop), its
heartbeat is older than `ttl`, or it ran on this very machine under a pid that no
longer exists (a restart after SIGKILL is noticed at once). Its executing intents —
and compensations it was running — are then marked unknown, with a ledger entry:
the tool may or may not have acted, so nothing is re-run blindly. Replicas on other
hosts rely on the heartbeat alone (clocks kept in sync by NTP, as usual).

The sweep runs at start and then every `sweep_every` heartbeats; it also purges
expired idempotency keys and forgets pending task-level keys of dead instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Delete, delete, select, text, update

from gateway import idempotency, ledger
from gateway.background import Pauses
from gateway.commits.execute import unknown_after_crash
from gateway.storage.models import (
    INTENTS_IN_FLIGHT,
    TASK_KEYS_PENDING,
    GatewayInstance,
    IdempotencyRecord,
    Intent,
)

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.recovery")


def node_id() -> str:
    """This machine: the host name plus the kernel's boot id (pids are only meaningful per boot)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "-"
    return f"{socket.gethostname()}/{boot}"[:255]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Why an `executing` intent became `unknown`: (the ledger's reason, the answer's cause).
STOPPED = ("executor stopped mid-call", "the gateway instance executing this commit stopped mid-call")
ABANDONED = (
    "its executor has no call in flight for it",
    "the gateway instance that reserved this commit has no call in flight for it"
    " (it lost the reservation's reply, or could not record the outcome)",
)

# Both read through a partial index of the same condition (gateway.storage.models).
IN_FLIGHT = select(
    Intent.intent_id, Intent.task_id, Intent.executor, Intent.status, Intent.compensation_executor
).where(text(INTENTS_IN_FLIGHT))


def dead_task_keys(alive: set[str]) -> Delete:
    return delete(IdempotencyRecord).where(text(TASK_KEYS_PENDING), IdempotencyRecord.owner.not_in(alive))


class Recovery:
    def __init__(
        self, gateway: Gateway, *, ttl: float = 10.0, heartbeat: float = 1.0, sweep_every: int = 2
    ) -> None:
        self.gateway = gateway
        self.ttl, self.heartbeat, self.sweep_every = ttl, heartbeat, sweep_every
        self.node = node_id()
        self._task: asyncio.Task[None] | None = None
        self._pauses = Pauses()

    @property
    def actor(self) -> dict[str, str]:
        return {"sub": f"gateway:{self.gateway.instance_id}", "role": "gateway"}

    async def start(self) -> None:
        at = datetime.now(UTC)
        async with self.gateway.db.transaction() as session:
            session.add(
                GatewayInstance(
                    instance_id=self.gateway.instance_id,
                    node=self.node,
                    pid=os.getpid(),
                    started_at=at,
                    heartbeat_at=at,
                )
            )
        await self.sweep()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await self._pauses.stop(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            async with self.gateway.db.transaction() as session:
                await session.execute(
                    delete(GatewayInstance).where(GatewayInstance.instance_id == self.gateway.instance_id)
                )

    async def _run(self) -> None:
        beats = 0
        while await self._pauses.pause(self.heartbeat):
            beats += 1
            try:
                await self.beat()
                if beats % self.sweep_every == 0:
                    await self.sweep()
                if beats % 600 == 0:
                    await idempotency.purge_expired(self.gateway.db)
            except Exception:  # keep beating; a missed beat only risks a spurious `unknown`
                log.exception("heartbeat or sweep failed")

    async def beat(self) -> None:
        async with self.gateway.db.transaction() as session:
            await session.execute(
                update(GatewayInstance)
                .where(GatewayInstance.instance_id == self.gateway.instance_id)
                .values(heartbeat_at=datetime.now(UTC))
            )

    async def alive(self) -> set[str]:
        cutoff = datetime.now(UTC) - timedelta(seconds=self.ttl)
        async with self.gateway.db.reading() as session:
            rows = (await session.execute(select(GatewayInstance))).scalars().all()
        alive = {self.gateway.instance_id}
        for row in rows:
            if ledger.utc(row.heartbeat_at) < cutoff:
                continue
            if (
                row.node == self.node
                and row.instance_id != self.gateway.instance_id
                and not pid_alive(row.pid)
            ):
                continue
            alive.add(row.instance_id)
        return alive

    async def sweep(self) -> int:
        """Mark the work of dead executors unknown; returns how many intents changed."""
        alive = await self.alive()
        async with self.gateway.db.reading() as session:
            orphans = (await session.execute(IN_FLIGHT)).all()
        changed = 0
        mine = self.gateway.instance_id
        for intent_id, task_id, executor, status, compensator in orphans:
            if status == "executing" and executor not in alive:
                changed += await self._orphaned_commit(intent_id, task_id, executor, STOPPED)
            elif status == "executing" and executor == mine and intent_id not in self.gateway.in_flight:
                # Ours, and nothing here will finish it: a reservation that committed after
                # its caller lost the reply, or an outcome that could not be recorded.
                changed += await self._orphaned_commit(intent_id, task_id, executor, ABANDONED)
            elif status != "executing" and compensator not in alive:
                changed += await self._orphaned_compensation(intent_id, task_id, compensator, STOPPED[0])
            elif status != "executing" and compensator == mine and intent_id not in self.gateway.in_flight:
                changed += await self._orphaned_compensation(intent_id, task_id, compensator, ABANDONED[0])
        await self._forget_dead_keys(alive)
        return changed

    async def _orphaned_commit(
        self, intent_id: str, task_id: str, executor: str | None, why: tuple[str, str]
    ) -> int:
        reason, cause = why
        response = unknown_after_crash(intent_id, cause)
        async with self.gateway.db.transaction() as session:
            result = await session.execute(
                update(Intent)
                .where(
                    Intent.intent_id == intent_id, Intent.status == "executing", Intent.executor == executor
                )
                .values(
                    status="unknown",
                    result_status=response.status,
                    result_body=response.body,
                    result_content_type=response.headers["content-type"],
                    updated_at=datetime.now(UTC),
                )
            )
            if result.rowcount != 1:
                return 0
            await ledger.append(
                session,
                event="unknown",
                actor=self.actor,
                task_id=task_id,
                intent_id=intent_id,
                parent=intent_id,
                data={"executor": executor, "reason": reason},
            )
        log.warning("intent %s: outcome unknown (executor %s: %s)", intent_id, executor, reason)
        return 1

    async def _orphaned_compensation(
        self, intent_id: str, task_id: str, executor: str | None, reason: str
    ) -> int:
        async with self.gateway.db.transaction() as session:
            result = await session.execute(
                update(Intent)
                .where(
                    Intent.intent_id == intent_id,
                    Intent.compensation_status == "running",
                    Intent.compensation_executor == executor,
                )
                .values(compensation_status="unknown", updated_at=datetime.now(UTC))
            )
            if result.rowcount != 1:
                return 0
            await ledger.append(
                session,
                event="compensation_failed",
                actor=self.actor,
                task_id=task_id,
                intent_id=intent_id,
                parent=intent_id,
                data={"executor": executor, "reason": f"{reason}; outcome unknown"},
            )
        return 1

    async def _forget_dead_keys(self, alive: set[str]) -> None:
        # Commit keys resolve from their intent's state; task-level keys (compensate) have no
        # intent, so a pending one whose owner died would block its caller: drop it.
        async with self.gateway.db.transaction() as session:
            await session.execute(dead_task_keys(alive))
