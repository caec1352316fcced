"""Helpers for commit-protocol tests: role tokens plus handoff envelopes, per task."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import role_token


class Agents:
    """Headers for an agent of `role` acting on `task_id`, handed the work by the planner agent key."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._tokens: dict[tuple[str, str], str] = {}

    def headers(
        self,
        role: str,
        task_id: str,
        *,
        sub: str | None = None,
        key: str | None = None,
        parent: str | None = None,
    ) -> dict[str, str]:
        from gateway.envelopes import mint_envelope
        from gateway.keys import load_private_key

        sub = sub or f"{role}-1"
        if (role, sub) not in self._tokens:
            self._tokens[(role, sub)] = role_token(self.keys_dir, role, sub, ttl=3600)
        envelope = mint_envelope(
            load_private_key(self.keys_dir / "agents" / "planner.key.pem"),
            iss="planner",
            sub=sub,
            task_id=task_id,
            audience="agent-gateway",
            deadline_seconds=3600,
            parent=parent,
        )
        headers = {"Authorization": f"Bearer {self._tokens[(role, sub)]}", "Agent-Handoff": envelope}
        if key is not None:
            headers["Idempotency-Key"] = f'"{key}"'
        return headers


def new_task() -> str:
    return f"task-{uuid.uuid4().hex[:10]}"


async def propose_and_verify(
    client: httpx.AsyncClient,
    agents: Agents,
    task_id: str,
    tool: str,
    arguments: dict[str, Any],
    **extra: Any,
) -> str:
    response = await client.post(
        "/intents",
        json={"task_id": task_id, "tool": tool, "arguments": arguments, **extra},
        headers=agents.headers("planner", task_id),
    )
    assert response.status_code == 201, response.text
    intent_id = response.json()["intent_id"]
    response = await client.post(
        f"/intents/{intent_id}/verify",
        json={"verdict": "accept", "reason": "ok"},
        headers=agents.headers("verifier", task_id),
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "verified"
    return str(intent_id)


def extra_tools(upstream_url: str) -> list[dict[str, Any]]:
    """Schemaless demo tools: `delay` and `fail` arguments steer the demo upstream."""
    return [
        {"name": "email.notify", "upstream": f"{upstream_url}/effects/email.notify", "effect": "write"},
        {
            "name": "email.reserve",
            "upstream": f"{upstream_url}/effects/email.reserve",
            "effect": "write",
            "compensation": "email.release",
        },
        {"name": "email.release", "upstream": f"{upstream_url}/effects/email.release", "effect": "write"},
        {"name": "email.down", "upstream": "http://127.0.0.1:9/effects/down", "effect": "write"},
    ]


def commit_config(
    tmp_path: Path, database_url: str, upstream_url: str, keys_dir: Path, **overrides: Any
) -> Any:
    from tests.conftest import gateway_config

    base = gateway_config(tmp_path, database_url, upstream_url, keys_dir=keys_dir)
    tools = [tool.model_dump(exclude_defaults=True) for tool in base.tools] + extra_tools(upstream_url)
    return gateway_config(tmp_path, database_url, upstream_url, keys_dir=keys_dir, tools=tools, **overrides)
