"""Human approval (contract §5) through the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.approvals.webhook import verify_signature
from gateway.config import ConfigError
from tests.conftest import REPO, role_token
from tests.protocol import Agents, commit_config, new_task, propose_and_verify
from tests.servers import run_server

PROBLEMS = "https://agent-gateway.dev/problems/"
TRANSFER = {"from_account": "acc-1", "to_account": "acc-2", "amount": 2500, "currency": "EUR"}
SECRET = "s3cret-for-the-webhook"


def problem(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEMS + name, body
    return body


class Gw:
    def __init__(self, client: httpx.AsyncClient, app: Any, agents: Agents, keys_dir: Path) -> None:
        self.client, self.app, self.agents, self.keys_dir = client, app, agents, keys_dir

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    def approver(self, sub: str = "approver-1") -> dict[str, str]:
        return {"Authorization": f"Bearer {role_token(self.keys_dir, 'approver', sub)}"}

    async def pending_transfer(self, task: str | None = None, key: str | None = None) -> tuple[str, str, str]:
        """(task, intent id, approval id) of a verified transfer whose commit waits for approval."""
        task = task or new_task()
        iid = await propose_and_verify(self.client, self.agents, task, "payments.transfer", TRANSFER)
        response = await self.commit(task, iid, key)
        assert response.status_code == 202, response.text
        return task, iid, response.json()["approval_id"]

    async def commit(self, task: str, iid: str, key: str | None = None) -> httpx.Response:
        headers = self.agents.headers("committer", task, key=key or f"key-{task}")
        return await self.client.post(f"/intents/{iid}/commit", headers=headers)

    async def decide(
        self, approval_id: str, decision: str, reason: str = "checked", sub: str = "approver-1"
    ) -> httpx.Response:
        return await self.client.post(
            f"/approvals/{approval_id}/decision",
            json={"decision": decision, "reason": reason},
            headers=self.approver(sub),
        )

    async def events(self, iid: str) -> list[str]:
        body = (await self.client.get("/ledger", params={"intent_id": iid}, headers=self.approver())).json()
        return [entry["event"] for entry in body["entries"]]


@contextlib.asynccontextmanager
async def running(config: Any, keys_dir: Path) -> AsyncIterator[Gw]:
    from gateway.app import create_app

    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield Gw(client, app, Agents(keys_dir), keys_dir)


def policies_requiring(tmp_path: Path, approvals: int) -> str:
    folder = tmp_path / "policies"
    folder.mkdir()
    for path in (REPO / "policies").glob("*.rego"):
        shutil.copy(path, folder / path.name)
    data = json.loads((REPO / "policies" / "data.json").read_text())
    data["approval"]["high_risk_requires"] = approvals
    (folder / "data.json").write_text(json.dumps(data))
    return str(folder)


@pytest.fixture
async def gw(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> AsyncIterator[Gw]:
    async with running(commit_config(tmp_path, database_url, upstream[0], keys_dir), keys_dir) as gw:
        yield gw


# --- the whole flow -----------------------------------------------------------------


async def test_approve_executes_once_and_the_committer_retry_returns_the_result(gw: Gw, effects: Any) -> None:
    task, iid, approval_id = await gw.pending_transfer()
    assert effects.calls["payments.transfer"] == 0

    listed = await gw.client.get("/approvals", params={"status": "pending"}, headers=gw.approver())
    assert listed.status_code == 200, listed.text
    [item] = [a for a in listed.json()["approvals"] if a["approval_id"] == approval_id]
    assert item["intent_id"] == iid and item["tool"] == "payments.transfer"
    assert item["arguments"] == TRANSFER and item["status"] == "pending"
    assert item["approvals_required"] == 1 and item["approvals_given"] == 0
    assert any("high risk" in reason for reason in item["reasons"])
    assert item["proposer"]["sub"] == "planner-1" and item["verifier"]["sub"] == "verifier-1"
    assert item["requested_by"]["sub"] == "committer-1" and item["expires_at"]

    shown = await gw.client.get(f"/approvals/{approval_id}", headers=gw.approver())
    assert shown.status_code == 200 and shown.json()["approval_id"] == approval_id

    decided = await gw.decide(approval_id, "approve", "the invoice matches")
    assert decided.status_code == 200, decided.text
    body = decided.json()
    assert body["status"] == "approved" and body["intent_status"] == "committed"
    assert body["result"]["status"] == 200 and body["executed_at"]
    decisions = [(d["approver"], d["decision"], d["reason"]) for d in body["decisions"]]
    assert decisions == [("approver-1", "approve", "the invoice matches")]
    assert effects.calls["payments.transfer"] == 1

    retry = await gw.commit(task, iid)
    assert retry.status_code == 200, retry.text
    assert retry.headers.get("idempotent-replayed") == "true"
    assert retry.json()["status"] == "committed" and retry.json()["intent_id"] == iid
    assert effects.calls["payments.transfer"] == 1

    again = await gw.decide(approval_id, "approve", sub="approver-2")
    problem(again, 409, "approval-closed")
    events = await gw.events(iid)
    for event in (
        "approval_requested",
        "approval_decided",
        "approval_approved",
        "commit_started",
        "committed",
        "approval_executed",
    ):
        assert event in events, events
    assert (
        events.index("approval_approved") < events.index("commit_started") < events.index("approval_executed")
    )
    assert not (
        await gw.client.get("/approvals", params={"status": "pending"}, headers=gw.approver())
    ).json()["approvals"]

    from gateway.ledger import verify

    assert (await verify(gw.gateway.db)).ok


async def test_only_approvers_may_see_or_decide(gw: Gw, effects: Any) -> None:
    task, _, approval_id = await gw.pending_transfer()
    for role in ("planner", "verifier", "committer", "worker"):
        headers = {"Authorization": f"Bearer {role_token(gw.keys_dir, role)}"}
        problem(await gw.client.get("/approvals", headers=headers), 403, "forbidden")
        problem(await gw.client.get(f"/approvals/{approval_id}", headers=headers), 403, "forbidden")
        decided = await gw.client.post(
            f"/approvals/{approval_id}/decision", json={"decision": "approve", "reason": "x"}, headers=headers
        )
        problem(decided, 403, "forbidden")
    problem(await gw.client.get("/approvals"), 401, "token-invalid")
    problem(await gw.client.get("/approvals/ap_nope", headers=gw.approver()), 404, "approval-not-found")
    bad = await gw.client.post(
        f"/approvals/{approval_id}/decision", json={"decision": "maybe", "reason": ""}, headers=gw.approver()
    )
    problem(bad, 422, "approval-decision-invalid")
    problem(await gw.client.get("/approvals?status=odd", headers=gw.approver()), 400, "bad-request")
    assert effects.calls["payments.transfer"] == 0


async def test_self_approval_is_refused(gw: Gw, effects: Any) -> None:
    """An approver token held by the proposer, verifier or committer cannot decide (compared by `sub`)."""
    _, _, approval_id = await gw.pending_transfer()
    for involved in ("planner-1", "verifier-1", "committer-1"):
        for decision in ("approve", "deny"):
            problem(await gw.decide(approval_id, decision, sub=involved), 403, "self-approval")
    shown = (await gw.client.get(f"/approvals/{approval_id}", headers=gw.approver())).json()
    assert shown["status"] == "pending" and shown["approvals_given"] == 0 and shown["decisions"] == []
    assert effects.calls["payments.transfer"] == 0


async def test_two_distinct_approvers_are_required(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    config = commit_config(
        tmp_path, database_url, upstream[0], keys_dir, policy={"dir": policies_requiring(tmp_path, 2)}
    )
    async with running(config, keys_dir) as gw:
        task, iid, approval_id = await gw.pending_transfer()
        shown = (await gw.client.get(f"/approvals/{approval_id}", headers=gw.approver())).json()
        assert shown["approvals_required"] == 2

        first = await gw.decide(approval_id, "approve", sub="alice")
        assert first.status_code == 200, first.text
        assert first.json()["status"] == "pending" and first.json()["approvals_given"] == 1
        problem(await gw.decide(approval_id, "approve", sub="alice"), 409, "approval-already-decided")
        assert effects.calls["payments.transfer"] == 0
        assert (await gw.commit(task, iid)).status_code == 202

        second = await gw.decide(approval_id, "approve", sub="bob")
        assert second.status_code == 200, second.text
        assert second.json()["status"] == "approved" and second.json()["intent_status"] == "committed"
        assert [d["approver"] for d in second.json()["decisions"]] == ["alice", "bob"]
        assert effects.calls["payments.transfer"] == 1
        assert (await gw.commit(task, iid)).json()["status"] == "committed"
        assert (await gw.events(iid)).count("approval_decided") == 2


async def test_denial_is_final(gw: Gw, effects: Any) -> None:
    task, iid, approval_id = await gw.pending_transfer()
    problem(await gw.decide(approval_id, "deny", reason="  "), 422, "approval-decision-invalid")
    denied = await gw.decide(approval_id, "deny", reason="unknown payee")
    assert denied.status_code == 200, denied.text
    assert denied.json()["status"] == "denied" and denied.json()["intent_status"] == "denied"
    problem(await gw.decide(approval_id, "approve", sub="approver-2"), 409, "approval-closed")
    problem(await gw.commit(task, iid), 403, "approval-denied")
    problem(await gw.commit(task, iid, key="another-key"), 403, "approval-denied")
    assert effects.calls["payments.transfer"] == 0
    assert "approval_denied" in await gw.events(iid)


async def test_expiry_on_read_on_decision_and_by_the_sweep(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    config = commit_config(
        tmp_path,
        database_url,
        upstream[0],
        keys_dir,
        gateway={
            "database": database_url,
            "keys_dir": str(keys_dir),
            "decision_log": str(tmp_path / "decisions.jsonl"),
            "approval_ttl_seconds": 1,
        },
        approvals={"sweep_interval": 3600},
    )
    async with running(config, keys_dir) as gw:
        read_task, read_iid, on_read = await gw.pending_transfer()
        _, _, on_decision = await gw.pending_transfer()
        _, swept_iid, by_sweep = await gw.pending_transfer()
        await asyncio.sleep(1.1)

        shown = await gw.client.get(f"/approvals/{on_read}", headers=gw.approver())
        assert shown.json()["status"] == "expired" and shown.json()["intent_status"] == "expired"
        problem(await gw.decide(on_decision, "approve"), 409, "approval-expired")
        await gw.gateway.approvals.sweep()
        from gateway.storage.models import Approval

        async with gw.gateway.db.reading() as session:
            assert (await session.get(Approval, by_sweep)).status == "expired"
        problem(await gw.commit(read_task, read_iid), 409, "approval-expired")
        assert "approval_expired" in await gw.events(swept_iid)
        assert effects.calls["payments.transfer"] == 0


async def test_concurrent_decisions_execute_once(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    """Two approvers click at once, on two gateway replicas sharing the database."""
    config = commit_config(tmp_path, database_url, upstream[0], keys_dir)
    async with running(config, keys_dir) as one, running(config, keys_dir) as two:
        for _ in range(2):
            task, iid, approval_id = await one.pending_transfer()
            answers = await asyncio.gather(
                one.decide(approval_id, "approve", sub="alice"),
                two.decide(approval_id, "approve", sub="bob"),
                one.decide(approval_id, "approve", sub="carol"),
                two.decide(approval_id, "approve", sub="alice"),
            )
            statuses = sorted(answer.status_code for answer in answers)
            assert statuses == [200, 409, 409, 409], [a.text for a in answers]
            for answer in answers:
                if answer.status_code == 409:
                    assert answer.json()["type"].rsplit("/", 1)[1] in (
                        "approval-closed",
                        "approval-already-decided",
                    )
            assert (await one.commit(task, iid)).json()["status"] == "committed"
            assert (await one.events(iid)).count("committed") == 1
        assert effects.calls["payments.transfer"] == 2
        assert len({effect["idempotency_key"] for effect in effects.effects}) == 2


# --- the webhook --------------------------------------------------------------------


class Receiver:
    """A loopback webhook receiver whose first answers are 500s."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.requests.append((dict(request.headers), await request.body()))
        if len(self.requests) <= self.failures:
            return JSONResponse({"error": "try later"}, status_code=500)
        return JSONResponse({"ok": True})


def webhook_config(tmp_path: Path, database_url: str, upstream_url: str, keys_dir: Path, url: str) -> Any:
    approvals = {
        "webhook_url": url,
        "webhook_secret_env": "AGW_TEST_WEBHOOK_SECRET",
        "webhook_backoff_seconds": 0.05,
        "webhook_max_attempts": 4,
        "sweep_interval": 0.05,
        "public_url": "https://gateway.example.com",
    }
    return commit_config(tmp_path, database_url, upstream_url, keys_dir, approvals=approvals)


async def test_webhook_is_signed_and_retried_after_a_500(
    tmp_path: Path,
    database_url: str,
    upstream: tuple[str, Any],
    keys_dir: Path,
    effects: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGW_TEST_WEBHOOK_SECRET", SECRET)
    receiver = Receiver(failures=1)
    with run_server(receiver.app) as receiver_url:
        config = webhook_config(tmp_path, database_url, upstream[0], keys_dir, receiver_url + "/hook")
        async with running(config, keys_dir) as gw:
            _, iid, approval_id = await gw.pending_transfer()
            for _ in range(200):
                if len(receiver.requests) >= 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # no further delivery after the success
            from gateway.storage.models import Approval

            async with gw.gateway.db.reading() as session:
                row = await session.get(Approval, approval_id)
                assert (row.webhook_state, row.webhook_attempts) == ("delivered", 2)
    assert len(receiver.requests) == 2
    for attempt, (headers, body) in enumerate(receiver.requests, start=1):
        assert headers["content-type"] == "application/json"
        assert verify_signature(SECRET.encode(), body, headers["x-signature"])
        assert not verify_signature(b"another secret", body, headers["x-signature"])
        assert headers["x-agent-gateway-delivery"] == approval_id
        payload = json.loads(body)
        assert payload["event"] == "approval.requested" and payload["attempt"] == attempt
        assert payload["approval"]["approval_id"] == approval_id and payload["approval"]["intent_id"] == iid
        assert payload["approval"]["arguments"] == TRANSFER
        assert payload["links"]["page"] == f"https://gateway.example.com/ui/approvals/{approval_id}"
    assert effects.calls["payments.transfer"] == 0


async def test_webhook_without_its_secret_refuses_to_start(
    tmp_path: Path, upstream: tuple[str, Any], keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.app import create_app

    monkeypatch.delenv("AGW_TEST_WEBHOOK_SECRET", raising=False)
    url = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    with pytest.raises(ConfigError, match="AGW_TEST_WEBHOOK_SECRET"):
        create_app(webhook_config(tmp_path, url, upstream[0], keys_dir, "http://127.0.0.1:9/hook"))
    from gateway.config import parse_config

    with pytest.raises(ConfigError, match="webhook_secret_env"):
        parse_config({"approvals": {"webhook_url": "https://hooks.example.com/x"}})
