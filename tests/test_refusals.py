"""Refusals of authenticated agents are ledgered; unauthenticated requests write nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.envelopes import mint_envelope
from gateway.keys import load_private_key
from tests.conftest import role_token


async def ledger_events(client: Any, keys_dir: Path) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {role_token(keys_dir, 'planner')}"}
    response = await client.get("/ledger", params={"limit": 1000}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["entries"]


async def test_an_escalation_attempt_is_ledgered_with_its_actor(
    app_client: Any, keys_dir: Path, effects: Any
) -> None:
    client, _ = app_client
    # A worker signs its own handoff: authentic, but not a delegation.
    self_issued = mint_envelope(
        load_private_key(keys_dir / "agents" / "worker.key.pem"),
        iss="worker",
        sub="worker",
        task_id="t-escalate",
        audience="agent-gateway",
    )
    headers = {
        "Authorization": f"Bearer {role_token(keys_dir, 'worker', sub='worker')}",
        "Agent-Handoff": self_issued,
    }
    response = await client.get("/tools/docs.search", params={"q": "x"}, headers=headers)
    assert response.status_code == 403, response.text
    assert effects.calls["docs.search"] == 0

    refused = [entry for entry in await ledger_events(client, keys_dir) if entry["event"] == "refused"]
    assert len(refused) == 1
    entry = refused[0]
    assert entry["actor"] == {"sub": "worker", "role": "worker"}
    assert entry["data"]["problem"] == "envelope-self-issued"
    assert entry["data"]["path"] == "/tools/docs.search"
    assert "Bearer" not in str(entry) and self_issued not in str(entry)


async def test_a_worker_committing_is_ledgered_but_a_request_without_a_token_is_not(
    app_client: Any, keys_dir: Path
) -> None:
    client, _ = app_client
    worker = {"Authorization": f"Bearer {role_token(keys_dir, 'worker')}", "Idempotency-Key": '"k-1"'}
    response = await client.post("/intents/in_doesnotmatter/commit", headers=worker)
    assert response.status_code == 403, response.text
    response = await client.post("/intents/in_doesnotmatter/commit", headers={"Idempotency-Key": '"k-2"'})
    assert response.status_code == 401

    refused = [entry for entry in await ledger_events(client, keys_dir) if entry["event"] == "refused"]
    recorded = [(entry["actor"]["role"], entry["intent_id"]) for entry in refused]
    assert recorded == [("worker", "in_doesnotmatter")]
