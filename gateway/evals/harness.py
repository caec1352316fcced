"""What every scenario uses: agents with tokens and envelopes, timed HTTP calls, the oracles.

The oracles are outside the gateway's answers: the tool upstream's `/_effects`
(calls per tool, effects performed) and the ledger (`GET /ledger`, whose hash chain
is recomputed here).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway import canonical
from gateway.envelopes import mint_envelope
from gateway.identity import DEV_ISSUER, mint_role_token
from gateway.keys import load_private_key

AUDIENCE = "agent-gateway"
ZERO = "0" * 64


@dataclass
class Call:
    status: int
    body: Any
    raw: bytes


@dataclass
class Check:
    """Collects a scenario's broken expectations."""

    failures: list[str] = field(default_factory=list)
    duplicate_effects: int = 0
    lost_writes: int = 0

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            self.failures.append(message)


class Harness:
    def __init__(
        self,
        clients: list[httpx.AsyncClient],
        upstream: httpx.AsyncClient,
        keys_dir: Path,
        *,
        rng: random.Random,
        workers: int,
        rounds: int,
        delay: float,
        decision_log: Path | None = None,
    ) -> None:
        # Several gateway replicas: requests go round-robin, so racing calls cross replicas.
        self.clients = clients
        self._next = itertools.cycle(clients)
        self.upstream = upstream
        self.keys_dir = keys_dir
        self.rng = rng
        self.workers = workers
        self.rounds = rounds
        self.delay = delay
        self.decision_log = decision_log
        self.latencies: list[float] = []
        self.run_id = uuid.UUID(int=rng.getrandbits(128)).hex[:8]
        self._tokens: dict[tuple[str, str], str] = {}
        self._counter = 0

    # --- agents -----------------------------------------------------------------

    def task(self, label: str) -> str:
        self._counter += 1
        return f"eval-{self.run_id}-{label}-{self._counter}"

    def token(self, role: str, sub: str | None = None) -> str:
        sub = sub or f"{role}-1"
        if (role, sub) not in self._tokens:
            self._tokens[(role, sub)] = mint_role_token(
                load_private_key(self.keys_dir / "issuer.key.pem"),
                iss=DEV_ISSUER,
                sub=sub,
                role=role,
                audience=AUDIENCE,
                ttl=3600,
            )
        return self._tokens[(role, sub)]

    def envelope(
        self, sub: str, task_id: str, *, goal_revision: int = 0, iss: str = "planner", key: Any = None
    ) -> str:
        signer = key or load_private_key(self.keys_dir / "agents" / f"{iss}.key.pem")
        return mint_envelope(
            signer,
            iss=iss,
            sub=sub,
            task_id=task_id,
            audience=AUDIENCE,
            deadline_seconds=3600,
            goal_revision=goal_revision,
        )

    def headers(
        self,
        role: str,
        task_id: str,
        *,
        sub: str | None = None,
        key: str | None = None,
        goal_revision: int = 0,
        envelope: str | None = None,
    ) -> dict[str, str]:
        sub = sub or f"{role}-1"
        headers = {
            "Authorization": f"Bearer {self.token(role, sub)}",
            "Agent-Handoff": envelope or self.envelope(sub, task_id, goal_revision=goal_revision),
        }
        if key is not None:
            headers["Idempotency-Key"] = f'"{key}"'
        return headers

    def key(self) -> str:
        return uuid.UUID(int=self.rng.getrandbits(128)).hex

    # --- timed calls ------------------------------------------------------------

    async def request(self, method: str, url: str, **kwargs: Any) -> Call:
        started = time.perf_counter()
        response = await next(self._next).request(method, url, **kwargs)
        self.latencies.append(time.perf_counter() - started)
        try:
            body = response.json()
        except ValueError:
            body = None
        return Call(response.status_code, body, response.content)

    async def propose(
        self, task_id: str, tool: str, arguments: Any, *, goal_revision: int = 0, **extra: Any
    ) -> Call:
        payload = {"task_id": task_id, "tool": tool, "arguments": arguments, **extra}
        headers = self.headers("planner", task_id, goal_revision=goal_revision)
        return await self.request("POST", "/intents", json=payload, headers=headers)

    async def verify(self, task_id: str, intent_id: str, *, goal_revision: int = 0) -> Call:
        headers = self.headers("verifier", task_id, goal_revision=goal_revision)
        body = {"verdict": "accept", "reason": "eval"}
        return await self.request("POST", f"/intents/{intent_id}/verify", json=body, headers=headers)

    async def commit(
        self,
        task_id: str,
        intent_id: str,
        key: str,
        *,
        sub: str | None = None,
        role: str = "committer",
        goal_revision: int = 0,
        envelope: str | None = None,
    ) -> Call:
        headers = self.headers(
            role, task_id, sub=sub, key=key, goal_revision=goal_revision, envelope=envelope
        )
        return await self.request("POST", f"/intents/{intent_id}/commit", headers=headers)

    async def ready_intent(
        self, task_id: str, tool: str, arguments: Any, *, goal_revision: int = 0, **extra: Any
    ) -> str:
        """Propose and verify; the intent id."""
        proposed = await self.propose(task_id, tool, arguments, goal_revision=goal_revision, **extra)
        if proposed.status not in (200, 201):
            raise EvalSetupError(f"propose {tool} answered {proposed.status}: {proposed.raw[:300]!r}")
        intent_id = str(proposed.body["intent_id"])
        verified = await self.verify(task_id, intent_id, goal_revision=goal_revision)
        if verified.status != 200:
            raise EvalSetupError(f"verify {intent_id} answered {verified.status}: {verified.raw[:300]!r}")
        return intent_id

    async def ready_intent_or_existing(self, task_id: str, tool: str, arguments: Any) -> str:
        """Propose again; verify only if the intent is still merely proposed."""
        proposed = await self.propose(task_id, tool, arguments)
        if proposed.status not in (200, 201):
            raise EvalSetupError(f"propose {tool} answered {proposed.status}: {proposed.raw[:300]!r}")
        intent_id = str(proposed.body["intent_id"])
        if proposed.body.get("status") == "proposed":
            verified = await self.verify(task_id, intent_id)
            if verified.status != 200:
                raise EvalSetupError(f"verify {intent_id} answered {verified.status}")
        return intent_id

    async def memory_set(
        self,
        task_id: str,
        namespace: str,
        key: str,
        value: Any,
        *,
        if_revision: int | None = None,
        goal_revision: int = 0,
        sub: str | None = None,
    ) -> Call:
        """Write a canonical key through a `memory.set` commit; the commit's answer."""
        write: dict[str, Any] = {"namespace": namespace, "key": key, "value": value}
        if if_revision is not None:
            write["if_revision"] = if_revision
        proposed = await self.propose(
            task_id,
            "memory.set",
            {"by": sub, "value": value},
            goal_revision=goal_revision,
            memory_writes=[write],
        )
        if proposed.status not in (200, 201):
            return proposed
        intent_id = proposed.body["intent_id"]
        verified = await self.verify(task_id, intent_id, goal_revision=goal_revision)
        if verified.status != 200:
            return verified
        return await self.commit(task_id, intent_id, self.key(), sub=sub, goal_revision=goal_revision)

    async def memory_revision(self, namespace: str, key: str) -> int:
        found = await self.request(
            "GET", f"/memory/{namespace}/{key}", headers={"Authorization": f"Bearer {self.token('planner')}"}
        )
        if found.status == 404:
            return 0
        if found.status != 200:
            raise EvalSetupError(f"GET /memory/{namespace}/{key} answered {found.status}")
        return int(found.body["revision"])

    async def memory_history(self, namespace: str, key: str) -> list[dict[str, Any]]:
        revisions: list[dict[str, Any]] = []
        after: Any = 0
        headers = {"Authorization": f"Bearer {self.token('planner')}"}
        while after is not None:
            found = await self.request(
                "GET", f"/memory/{namespace}/{key}/history", params={"after": after}, headers=headers
            )
            if found.status == 404:
                return revisions
            if found.status != 200:
                raise EvalSetupError(f"history of {namespace}/{key} answered {found.status}")
            revisions += found.body["revisions"]
            after = found.body.get("next_after")
        return revisions

    # --- oracles ----------------------------------------------------------------

    async def upstream_calls(self) -> dict[str, int]:
        response = await self.upstream.get("/_effects")
        response.raise_for_status()
        return {str(k): int(v) for k, v in response.json()["calls"].items()}

    async def upstream_effects(self) -> list[dict[str, Any]]:
        response = await self.upstream.get("/_effects")
        response.raise_for_status()
        return list(response.json()["effects"])

    async def ledger(
        self, *, task_id: str | None = None, intent_id: str | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {}
        if task_id:
            params["task_id"] = task_id
        if intent_id:
            params["intent_id"] = intent_id
        entries: list[dict[str, Any]] = []
        after: Any = None
        headers = {"Authorization": f"Bearer {self.token('planner')}"}
        while True:
            page = await self.clients[0].get(
                "/ledger",
                params={**params, **({"after": after} if after is not None else {})},
                headers=headers,
            )
            page.raise_for_status()
            body = page.json()
            entries += body["entries"]
            after = body.get("next_after")
            if after is None or not body["entries"]:
                return entries

    async def ledger_chain_problems(self) -> list[str]:
        """Recompute the whole hash chain from `GET /ledger`; every break found."""
        problems: list[str] = []
        previous = ZERO
        for entry in await self.ledger():
            document = {k: v for k, v in entry.items() if k not in ("prev_hash", "hash")}
            expected = hashlib.sha256(canonical.dumps(document) + bytes.fromhex(previous)).hexdigest()
            if entry.get("prev_hash") not in (previous, None):
                problems.append(f"ledger seq {entry['seq']}: prev_hash does not link to the entry before")
            if entry.get("hash") != expected:
                problems.append(f"ledger seq {entry['seq']}: hash does not match its content")
            previous = entry.get("hash") or expected
            if len(problems) >= 5:
                break
        return problems


def events(entries: list[dict[str, Any]], event: str, intent_id: str | None = None) -> list[dict[str, Any]]:
    return [e for e in entries if e["event"] == event and (intent_id is None or e["intent_id"] == intent_id)]


class EvalSetupError(Exception):
    """A scenario could not even be set up: the gateway refused a legitimate step."""
