"""Compensation (the saga's undo): reverse order, each step exactly once, failures retryable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.protocol import Agents, commit_config, new_task, propose_and_verify


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


async def commit(client: httpx.AsyncClient, agents: Agents, task: str, iid: str) -> dict[str, Any]:
    response = await client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key=iid))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_three_step_task_is_compensated_in_reverse_order_exactly_once(gw: Any, effects: Any) -> None:
    client, _, agents = gw
    task = new_task()
    steps = []
    for number, arguments in enumerate([{"step": 1}, {"step": 2}, {"step": 3, "fail": True}], start=1):
        iid = await propose_and_verify(client, agents, task, "email.reserve", arguments)
        outcome = await commit(client, agents, task, iid)
        assert outcome["status"] == ("failed" if number == 3 else "committed")
        steps.append(iid)

    first, second = await asyncio.gather(
        client.post(f"/tasks/{task}/compensate", headers=agents.headers("committer", task, key="undo-a")),
        client.post(f"/tasks/{task}/compensate", headers=agents.headers("committer", task, key="undo-b")),
    )
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert first.json() == second.json()
    summary = first.json()
    assert summary["status"] == "compensated"
    assert [step["intent_id"] for step in summary["steps"]] == [steps[1], steps[0]]
    assert {step["status"] for step in summary["steps"]} == {"compensated"}

    released = [effect["arguments"] for effect in effects.effects if effect["tool"] == "email.release"]
    assert released == [{"step": 2}, {"step": 1}]
    assert effects.calls["email.release"] == 2
    assert effects.calls["email.reserve"] == 3

    replay = await client.post(
        f"/tasks/{task}/compensate", headers=agents.headers("committer", task, key="undo-a")
    )
    assert replay.content == first.content and replay.headers["idempotent-replayed"] == "true"
    later = await client.post(
        f"/tasks/{task}/compensate", headers=agents.headers("committer", task, key="undo-c")
    )
    assert later.json()["status"] == "compensated"
    assert effects.calls["email.release"] == 2

    states = [
        (await client.get(f"/intents/{iid}", headers=agents.headers("worker", task))).json() for iid in steps
    ]
    assert [state["status"] for state in states] == ["compensated", "compensated", "failed"]
    events = [item["event"] for item in states[0]["history"]]
    assert events[-2:] == ["compensation_started", "compensated"]
    release_keys = [
        h["idempotency-key"] for h in effects.headers if h.get("idempotency-key", "").endswith('.1"')
    ]
    assert sorted(release_keys) == sorted(f'"{iid}.compensation.1"' for iid in steps[:2])


async def test_failed_step_stops_the_walk_and_stays_retryable(gw: Any, effects: Any) -> None:
    client, _, agents = gw
    task = new_task()
    early = await propose_and_verify(client, agents, task, "email.reserve", {"step": "early"})
    late = await propose_and_verify(
        client,
        agents,
        task,
        "email.notify",
        {"step": "late"},
        compensation={"tool": "email.notify", "arguments": {"undo": "late", "fail": True}},
    )
    await commit(client, agents, task, early)
    await commit(client, agents, task, late)

    response = await client.post(
        f"/tasks/{task}/compensate", headers=agents.headers("committer", task, key="c1")
    )
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["status"] == "compensation_failed"
    by_id = {step["intent_id"]: step for step in summary["steps"]}
    assert by_id[late]["compensation_status"] == "failed" and by_id[late]["result"]["attempt"] == 1
    assert by_id[early]["status"] == "committed"  # not undone out of order
    assert effects.calls["email.release"] == 0

    retry = await client.post(
        f"/tasks/{task}/compensate", headers=agents.headers("committer", task, key="c2")
    )
    by_id = {step["intent_id"]: step for step in retry.json()["steps"]}
    assert by_id[late]["result"]["attempt"] == 2
    assert effects.calls["email.release"] == 0
    problem = await client.post(f"/tasks/{task}/compensate", headers=agents.headers("worker", task, key="c3"))
    assert problem.status_code == 403
    missing = await client.post(
        "/tasks/no-such-task/compensate", headers=agents.headers("committer", "no-such-task")
    )
    assert missing.status_code == 400
