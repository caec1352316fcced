"""The commit protocol (contract §4) through the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import rfc8785

from gateway.idempotency import KeyInvalid, KeyMissing, parse_key
from gateway.intents import intent_id
from tests.protocol import Agents, commit_config, new_task, propose_and_verify

PROBLEMS = "https://agent-gateway.dev/problems/"


# --- units --------------------------------------------------------------------------


def test_intent_id_is_deterministic_and_canonical() -> None:
    first = intent_id("t1", "email.send", {"to": "a@example.com", "n": [1, 2.0], "z": {"b": 1, "a": 2}})
    second = intent_id("t1", "email.send", {"z": {"a": 2, "b": 1}, "n": [1, 2], "to": "a@example.com"})
    assert first == second
    assert re.fullmatch(r"in_[a-z2-7]{52}", first)
    canonical = rfc8785.dumps({"task_id": "t1", "tool": "email.send", "arguments": {"x": 1}})
    expected = base64.b32encode(hashlib.sha256(canonical).digest()).decode().rstrip("=").lower()
    assert intent_id("t1", "email.send", {"x": 1}) == "in_" + expected
    assert intent_id("t2", "email.send", {"x": 1}) != intent_id("t1", "email.send", {"x": 1})
    assert intent_id("t1", "email.send", {"x": 1}) != intent_id("t1", "email.send", {"x": "1"})


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ('"8e03978e-40d5-43e8"', "8e03978e-40d5-43e8"),
        ("abc-123", "abc-123"),
        ("8e03978e-40d5", "8e03978e-40d5"),
        ('"with space and \\"quote\\""', 'with space and "quote"'),
        ('  "padded"  ', "padded"),
        ('"' + "k" * 255 + '"', "k" * 255),
    ],
)
def test_idempotency_key_parsing(header: str, key: str) -> None:
    assert parse_key(header) == key


@pytest.mark.parametrize("header", [None, "", "   "])
def test_idempotency_key_missing(header: str | None) -> None:
    with pytest.raises(KeyMissing):
        parse_key(header)


@pytest.mark.parametrize(
    "header", ['""', '"' + "k" * 256 + '"', '"unterminated', "two words", '"tab\there"', "é"]
)
def test_idempotency_key_invalid(header: str) -> None:
    with pytest.raises(KeyInvalid):
        parse_key(header)


# --- through the app ----------------------------------------------------------------


@pytest.fixture
async def gw(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Any, Agents]]:
    from gateway.app import create_app

    app = create_app(commit_config(tmp_path, database_url, upstream[0], keys_dir))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, app, Agents(keys_dir)


def problem(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEMS + name, body
    return body


EMAIL = {"to": "ops@example.com", "subject": "hello", "body": "hi"}


async def test_propose_verify_commit_and_replay(gw: Any, effects: Any) -> None:
    client, _, agents = gw
    task = new_task()
    proposal = {"task_id": task, "tool": "email.send", "arguments": EMAIL}
    first = await client.post("/intents", json=proposal, headers=agents.headers("planner", task))
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["status"] == "proposed"
    assert body["intent_id"] == intent_id(task, "email.send", EMAIL)
    assert first.headers["location"] == f"/intents/{body['intent_id']}"
    again = await client.post("/intents", json=proposal, headers=agents.headers("planner", task))
    assert again.status_code == 200 and again.json()["intent_id"] == body["intent_id"]
    iid = body["intent_id"]

    verified = await client.post(
        f"/intents/{iid}/verify",
        json={"verdict": "accept", "reason": "looks right"},
        headers=agents.headers("verifier", task),
    )
    assert verified.status_code == 200, verified.text
    assert verified.json()["status"] == "verified"

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {
        **agents.headers("committer", task, key="k-1"),
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
    }
    committed = await client.post(f"/intents/{iid}/commit", headers=headers)
    assert committed.status_code == 200, committed.text
    result = committed.json()
    assert result["intent_id"] == iid and result["status"] == "committed"
    assert result["result"]["status"] == 200 and result["result"]["body"]["status"] == "done"
    assert committed.headers["gateway-decision-id"]
    assert len(effects.effects) == 1
    sent = effects.headers[-1]
    assert sent["idempotency-key"] == f'"{iid}"'
    assert sent["traceparent"].split("-")[1] == trace_id
    assert "authorization" not in sent and "agent-handoff" not in sent

    replay = await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="k-1"))
    assert replay.status_code == 200 and replay.content == committed.content
    assert replay.headers["idempotent-replayed"] == "true"
    other_key = await client.post(
        f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="k-2")
    )
    assert other_key.status_code == 200 and other_key.content == committed.content
    other_agent = await client.post(
        f"/intents/{iid}/commit", headers=agents.headers("committer", task, sub="committer-2", key="k-1")
    )
    assert other_agent.content == committed.content
    assert effects.calls["email.send"] == 1

    read = await client.get(f"/intents/{iid}", headers=agents.headers("worker", task))
    assert read.status_code == 200
    state = read.json()
    assert state["status"] == "committed"
    assert state["result"]["body"] == result
    assert [item["event"] for item in state["history"]] == [
        "proposed",
        "verified",
        "commit_started",
        "committed",
    ]
    entries = (
        await client.get("/ledger", params={"intent_id": iid}, headers=agents.headers("worker", task))
    ).json()
    assert [entry["event"] for entry in entries["entries"]] == [
        "proposed",
        "verified",
        "commit_started",
        "committed",
    ]
    assert entries["entries"][-1]["trace_id"] == trace_id
    assert entries["entries"][0]["actor"] == {"sub": "planner-1", "role": "planner"}


async def test_commit_key_errors(gw: Any, effects: Any) -> None:
    client, _, agents = gw
    task = new_task()
    first = await propose_and_verify(client, agents, task, "email.notify", {"n": 1})
    second = await propose_and_verify(client, agents, task, "email.notify", {"n": 2})
    problem(
        await client.post(f"/intents/{first}/commit", headers=agents.headers("committer", task)),
        400,
        "idempotency-key-missing",
    )
    problem(
        await client.post(
            f"/intents/{first}/commit",
            headers={**agents.headers("committer", task), "Idempotency-Key": '"' + "x" * 300 + '"'},
        ),
        400,
        "idempotency-key-invalid",
    )
    assert (
        await client.post(f"/intents/{first}/commit", headers=agents.headers("committer", task, key="a"))
    ).status_code == 200
    reused = await client.post(
        f"/intents/{second}/commit", headers=agents.headers("committer", task, key="a")
    )
    problem(reused, 422, "idempotency-key-reused")
    other_body = await client.post(
        f"/intents/{first}/commit",
        content=b'{"note": 1}',
        headers={**agents.headers("committer", task, key="a"), "content-type": "application/json"},
    )
    problem(other_body, 422, "idempotency-key-reused")
    assert effects.calls["email.notify"] == 1


async def test_concurrent_commit_gets_409_while_executing_then_the_result(gw: Any, effects: Any) -> None:
    client, app, agents = gw
    app.state.gateway.commit_wait = 0.2
    task = new_task()
    iid = await propose_and_verify(client, agents, task, "email.notify", {"delay": 1.5})
    slow = asyncio.create_task(
        client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="s"))
    )
    for _ in range(200):  # until the upstream is working on it
        if effects.calls["email.notify"]:
            break
        await asyncio.sleep(0.02)
    same_key = await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="s"))
    other_key = await client.post(
        f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="t")
    )
    body = problem(same_key, 409, "commit-in-progress")
    assert body["intent_id"] == iid and same_key.headers["retry-after"]
    problem(other_key, 409, "commit-in-progress")
    done = await slow
    assert done.status_code == 200, done.text
    later = await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="t"))
    assert later.content == done.content
    assert effects.calls["email.notify"] == 1


async def test_roles_states_and_separation_of_duties(gw: Any, effects: Any) -> None:
    client, _, agents = gw
    task = new_task()
    proposed = await client.post(
        "/intents",
        json={"task_id": task, "tool": "email.notify", "arguments": {"n": 1}},
        headers=agents.headers("planner", task, sub="alice"),
    )
    iid = proposed.json()["intent_id"]
    problem(
        await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="u")),
        409,
        "intent-not-verified",
    )
    problem(
        await client.post(
            f"/intents/{iid}/verify",
            json={"verdict": "accept", "reason": "mine"},
            headers=agents.headers("verifier", task, sub="alice"),
        ),
        403,
        "forbidden",
    )
    problem(
        await client.post(
            f"/intents/{iid}/verify",
            json={"verdict": "accept", "reason": "x"},
            headers=agents.headers("planner", task, sub="bob"),
        ),
        403,
        "policy-denied",
    )
    verified = await client.post(
        f"/intents/{iid}/verify",
        json={"verdict": "accept", "reason": "ok"},
        headers=agents.headers("verifier", task),
    )
    assert verified.json()["status"] == "verified"
    problem(
        await client.post(f"/intents/{iid}/commit", headers=agents.headers("verifier", task, key="v")),
        403,
        "forbidden",
    )
    problem(
        await client.post(f"/intents/{iid}/commit", headers={"Idempotency-Key": '"v"'}), 401, "token-invalid"
    )
    assert effects.calls["email.notify"] == 0
    # the refused commit above did not burn its key: it works once the intent is verified
    assert (
        await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="u"))
    ).status_code == 200

    rejected_id = (
        await client.post(
            "/intents",
            json={"task_id": task, "tool": "email.notify", "arguments": {"n": 2}},
            headers=agents.headers("planner", task),
        )
    ).json()["intent_id"]
    rejected = await client.post(
        f"/intents/{rejected_id}/verify",
        json={"verdict": "reject", "reason": "no"},
        headers=agents.headers("verifier", task),
    )
    assert rejected.json()["status"] == "rejected"
    problem(
        await client.post(
            f"/intents/{rejected_id}/verify",
            json={"verdict": "accept", "reason": "now yes"},
            headers=agents.headers("verifier", task, sub="verifier-2"),
        ),
        409,
        "intent-state-conflict",
    )
    body = problem(
        await client.post(
            f"/intents/{rejected_id}/commit", headers=agents.headers("committer", task, key="w")
        ),
        409,
        "intent-not-verified",
    )
    assert body["intent_status"] == "rejected"
    assert effects.calls["email.notify"] == 1


async def test_proposal_validation(gw: Any) -> None:
    client, _, agents = gw
    task = new_task()
    headers = agents.headers("planner", task)
    problem(
        await client.post(
            "/intents", json={"task_id": task, "tool": "no.such", "arguments": {}}, headers=headers
        ),
        422,
        "unknown-tool",
    )
    body = problem(
        await client.post(
            "/intents",
            json={"task_id": task, "tool": "email.send", "arguments": {"to": "nobody"}},
            headers=headers,
        ),
        422,
        "input-invalid",
    )
    assert body["detail"]
    problem(
        await client.post(
            "/intents", json={"task_id": task, "tool": "email.notify", "bogus": 1}, headers=headers
        ),
        422,
        "intent-invalid",
    )
    problem(
        await client.post(
            "/intents", json={"task_id": "other-task", "tool": "email.notify"}, headers=headers
        ),
        422,
        "envelope-invalid",
    )
    problem(
        await client.post(
            "/intents",
            json={"task_id": task, "tool": "email.notify"},
            headers={"Authorization": headers["Authorization"]},
        ),
        403,
        "policy-denied",
    )
    problem(await client.get("/intents/in_nothing", headers=headers), 404, "not-found")
    problem(
        await client.post("/intents/in_nothing/commit", headers=agents.headers("committer", task, key="n")),
        404,
        "not-found",
    )


async def test_failures_are_stored_and_replayed(gw: Any, effects: Any) -> None:
    client, _, agents = gw
    task = new_task()
    failing = await propose_and_verify(client, agents, task, "email.notify", {"fail": True})
    first = await client.post(
        f"/intents/{failing}/commit", headers=agents.headers("committer", task, key="f")
    )
    assert first.status_code == 200 and first.json()["status"] == "failed"
    assert first.json()["result"]["status"] == 500
    replay = await client.post(
        f"/intents/{failing}/commit", headers=agents.headers("committer", task, key="f")
    )
    assert replay.content == first.content
    assert effects.calls["email.notify"] == 1

    down = await propose_and_verify(client, agents, task, "email.down", {"n": 1})
    refused = await client.post(f"/intents/{down}/commit", headers=agents.headers("committer", task, key="d"))
    body = problem(refused, 502, "upstream-unavailable")
    assert body["intent_status"] == "failed"
    again = await client.post(f"/intents/{down}/commit", headers=agents.headers("committer", task, key="d2"))
    assert again.content == refused.content

    slow = await propose_and_verify(client, agents, task, "email.notify", {"delay": 3})
    timed_out = await client.post(
        f"/intents/{slow}/commit", headers=agents.headers("committer", task, key="t")
    )
    assert problem(timed_out, 504, "upstream-unavailable")["intent_status"] == "unknown"
    state = (await client.get(f"/intents/{slow}", headers=agents.headers("worker", task))).json()
    assert state["status"] == "unknown"


async def test_high_risk_commit_waits_for_approval(gw: Any, effects: Any) -> None:
    client, app, agents = gw
    task = new_task()
    transfer = {"from_account": "a", "to_account": "b", "amount": 5, "currency": "EUR"}
    iid = await propose_and_verify(client, agents, task, "payments.transfer", transfer)
    pending = await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="p"))
    assert pending.status_code == 202, pending.text
    body = pending.json()
    assert body["status"] == "pending_approval" and body["intent_id"] == iid and body["approval_id"]
    assert pending.headers["location"] == f"/approvals/{body['approval_id']}"
    again = await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="p"))
    assert again.status_code == 202 and again.json() == body
    assert effects.calls["payments.transfer"] == 0

    # The seam for the approvals module: approve, then execute exactly once.
    from sqlalchemy import update

    from gateway.commits import execute_commit
    from gateway.idempotency import KeyRef
    from gateway.storage.models import Approval, Intent

    gateway = app.state.gateway
    async with gateway.db.transaction() as session:
        await session.execute(update(Intent).where(Intent.intent_id == iid).values(status="approved"))
        approval = await session.get(Approval, body["approval_id"])
        ref = KeyRef(approval.idempotency_scope, approval.idempotency_key, "")
    result = await execute_commit(gateway, iid, actor={"sub": "approver-1", "role": "approver"}, ref=ref)
    assert result.status == 200 and json.loads(result.body)["status"] == "committed"
    replay = await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="p"))
    assert replay.status_code == 200 and replay.content == result.body.encode()
    assert effects.calls["payments.transfer"] == 1


# --- the one-statement steps (PostgreSQL) and the general path behind them ---------------


async def _key_rows(app: Any, key: str) -> list[Any]:
    from sqlalchemy import select

    from gateway.storage.models import IdempotencyRecord

    async with app.state.gateway.db.reading() as session:
        return list(
            (await session.execute(select(IdempotencyRecord).where(IdempotencyRecord.key == key))).scalars()
        )


async def _events(client: httpx.AsyncClient, agents: Agents, task: str, iid: str) -> list[str]:
    read = await client.get(f"/intents/{iid}", headers=agents.headers("worker", task))
    return [item["event"] for item in read.json()["history"]]


async def test_a_plain_commit_on_postgresql_never_needs_the_general_path(
    gw: Any, effects: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.commits import execute

    client, app, agents = gw
    if app.state.gateway.db.dialect != "postgresql":
        pytest.skip("the one-statement reservation is PostgreSQL's")

    async def general_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the general reservation ran")

    monkeypatch.setattr(execute, "_reserve_once", general_path)
    task = new_task()
    iid = await propose_and_verify(client, agents, task, "email.notify", {"n": 1})
    committed = await client.post(
        f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="p")
    )
    assert committed.status_code == 200 and committed.json()["status"] == "committed", committed.text
    replay = await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="p"))
    assert replay.content == committed.content and replay.headers["idempotent-replayed"] == "true"
    assert effects.calls["email.notify"] == 1
    assert await _events(client, agents, task, iid) == ["proposed", "verified", "commit_started", "committed"]
    [row] = await _key_rows(app, "p")
    assert row.state == "done" and row.response_body == committed.text


async def test_a_reservation_that_cannot_finish_changes_nothing(gw: Any, effects: Any) -> None:
    client, app, agents = gw
    task = new_task()
    proposal = {"task_id": task, "tool": "email.notify", "arguments": {"n": 2}}
    proposed = await client.post("/intents", json=proposal, headers=agents.headers("planner", task))
    iid = proposed.json()["intent_id"]
    # Not verified yet: refused, and the key is not kept.
    problem(
        await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="early")),
        409,
        "intent-not-verified",
    )
    assert await _key_rows(app, "early") == []
    verified = await client.post(
        f"/intents/{iid}/verify",
        json={"verdict": "accept", "reason": "ok"},
        headers=agents.headers("verifier", task),
    )
    assert verified.status_code == 200
    # The key is held (live) for another intent: 422, and the intent is left verified.
    other = await propose_and_verify(client, agents, task, "email.notify", {"n": 3})
    held = await client.post(
        f"/intents/{other}/commit", headers=agents.headers("committer", task, key="held")
    )
    assert held.status_code == 200
    problem(
        await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="held")),
        422,
        "idempotency-key-reused",
    )
    assert await _events(client, agents, task, iid) == ["proposed", "verified"]
    [row] = await _key_rows(app, "held")
    assert row.intent_id == other
    # The key refused earlier was never kept, so it works now.
    committed = await client.post(
        f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="early")
    )
    assert committed.status_code == 200 and committed.json()["status"] == "committed", committed.text
    assert effects.calls["email.notify"] == 2
    assert await _events(client, agents, task, iid) == ["proposed", "verified", "commit_started", "committed"]


async def test_without_a_ledger_head_a_commit_changes_nothing(gw: Any, effects: Any) -> None:
    from sqlalchemy import delete

    from gateway.ledger import LedgerError
    from gateway.storage.models import Intent, LedgerHead

    client, app, agents = gw
    task = new_task()
    iid = await propose_and_verify(client, agents, task, "email.notify", {"n": 9})
    async with app.state.gateway.db.transaction() as session:
        await session.execute(delete(LedgerHead))
    with pytest.raises(LedgerError):  # a 500 from a real server
        await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key="nohead"))
    assert effects.calls["email.notify"] == 0
    assert await _key_rows(app, "nohead") == []
    async with app.state.gateway.db.reading() as session:
        intent = await session.get(Intent, iid)
    assert intent is not None and intent.status == "verified"
