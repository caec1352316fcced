"""Versioned memory (contract §6) through the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import ledger
from gateway.intents import intent_id
from gateway.memory.names import dependency_errors, write_errors
from gateway.memory.scratch import parse_tags
from gateway.problems import BadRequest
from tests.protocol import Agents, commit_config, new_task

PROBLEMS = "https://agent-gateway.dev/problems/"


# --- units --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("writes", "wrong"),
    [
        (None, None),
        ([{"namespace": "plans", "key": "k", "value": 1}], None),
        ([{"namespace": "plans", "key": "k", "value": None, "if_revision": 0}], None),
        ([{"namespace": "goals", "key": "t-1", "value": "ship it"}], None),
        ([], "a list of 1 to"),
        ({"namespace": "plans"}, "a list of 1 to"),
        ([{"namespace": "plans", "key": "k"}], "must be {namespace, key, value"),
        ([{"namespace": "plans", "key": "k", "value": 1, "extra": 2}], "must be {namespace, key, value"),
        ([{"namespace": "scratch", "key": "k", "value": 1}], "never canonical"),
        ([{"namespace": "scratch/t-1", "key": "k", "value": 1}], "never canonical"),
        ([{"namespace": "a/b", "key": "k", "value": 1}], "one path segment"),
        ([{"namespace": "plans", "key": "a/b", "value": 1}], "without '/'"),
        ([{"namespace": "plans", "key": "", "value": 1}], "without '/'"),
        ([{"namespace": "goals", "key": "t-2", "value": 1}], "may only write goals/t-1"),
        ([{"namespace": "plans", "key": "k", "value": 1, "if_revision": -1}], "non-negative"),
        ([{"namespace": "plans", "key": "k", "value": 1, "if_revision": True}], "non-negative"),
        ([{"namespace": "plans", "key": "k", "value": 1}] * 2, "written twice"),
    ],
)
def test_memory_writes_are_checked_at_propose(writes: Any, wrong: str | None) -> None:
    errors = write_errors(writes, "t-1")
    if wrong is None:
        assert errors == []
    else:
        assert len(errors) == 1 and wrong in errors[0], errors


@pytest.mark.parametrize(
    ("depends_on", "ok"),
    [
        (None, True),
        ([{"namespace": "goals", "key": "another-task", "revision": 3}], True),
        ([{"namespace": "plans", "key": "k", "revision": 0}], True),
        ([{"namespace": "plans", "key": "k"}], False),
        ([{"namespace": "plans", "key": "k", "revision": "1"}], False),
        ([{"namespace": "scratch", "key": "k", "revision": 1}], False),
    ],
)
def test_dependencies_are_checked_at_propose(depends_on: Any, ok: bool) -> None:
    assert (dependency_errors(depends_on) == []) is ok


def test_entity_tags() -> None:
    assert parse_tags("*") is None
    assert parse_tags('"3"') == ["3"]
    assert parse_tags(' "3", W/"4" ,"5"') == ["3", "5"]  # weak tags never match If-Match
    with pytest.raises(BadRequest):
        parse_tags("3")


def test_an_intent_that_writes_other_values_is_another_intent() -> None:
    plain = intent_id("t1", "memory.set", {})
    assert plain == intent_id("t1", "memory.set", {}, {"depends_on": None, "memory_writes": None})
    first = intent_id(
        "t1", "memory.set", {}, {"memory_writes": [{"namespace": "goals", "key": "t1", "value": 1}]}
    )
    second = intent_id(
        "t1", "memory.set", {}, {"memory_writes": [{"namespace": "goals", "key": "t1", "value": 2}]}
    )
    assert len({plain, first, second}) == 3


# --- through the app ----------------------------------------------------------------


class MemoryAgents(Agents):
    """Agents whose handoff envelopes carry a goal revision."""

    def headers(  # type: ignore[override]
        self, role: str, task_id: str, *, goal: int = 0, sub: str | None = None, key: str | None = None
    ) -> dict[str, str]:
        from gateway.envelopes import mint_envelope
        from gateway.keys import load_private_key

        headers = super().headers(role, task_id, sub=sub, key=key)
        headers["Agent-Handoff"] = mint_envelope(
            load_private_key(self.keys_dir / "agents" / "planner.key.pem"),
            iss="planner",
            sub=sub or f"{role}-1",
            task_id=task_id,
            audience="agent-gateway",
            deadline_seconds=3600,
            goal_revision=goal,
        )
        return headers


class Memory:
    def __init__(self, client: httpx.AsyncClient, app: Any, agents: MemoryAgents) -> None:
        self.client, self.app, self.agents = client, app, agents

    async def intent(self, task: str, tool: str = "memory.set", goal: int = 0, **proposal: Any) -> str:
        body = {"task_id": task, "tool": tool, "arguments": proposal.pop("arguments", {}), **proposal}
        response = await self.client.post(
            "/intents", json=body, headers=self.agents.headers("planner", task, goal=goal)
        )
        assert response.status_code == 201, response.text
        intent = response.json()["intent_id"]
        response = await self.client.post(
            f"/intents/{intent}/verify",
            json={"verdict": "accept", "reason": "ok"},
            headers=self.agents.headers("verifier", task, goal=goal),
        )
        assert response.status_code == 200, response.text
        return str(intent)

    async def commit(self, intent: str, task: str, goal: int = 0, sub: str | None = None) -> httpx.Response:
        headers = self.agents.headers("committer", task, goal=goal, sub=sub, key=uuid.uuid4().hex)
        return await self.client.post(f"/intents/{intent}/commit", headers=headers)

    async def write(
        self, task: str, namespace: str, key: str, value: Any, goal: int = 0, **extra: Any
    ) -> str:
        write = {"namespace": namespace, "key": key, "value": value, **extra}
        intent = await self.intent(task, goal=goal, memory_writes=[write])
        response = await self.commit(intent, task, goal=goal)
        assert response.status_code == 200, response.text
        return intent

    async def get(self, path: str, **params: Any) -> httpx.Response:
        headers = self.agents.headers("worker", "any-task")
        return await self.client.get(f"/memory/{path}", params=params, headers=headers)


@pytest.fixture
async def memory(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> AsyncIterator[Memory]:
    from gateway.app import create_app

    app = create_app(commit_config(tmp_path, database_url, upstream[0], keys_dir))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield Memory(client, app, MemoryAgents(keys_dir))


def problem(response: httpx.Response, status: int, *names: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert body["type"] in {PROBLEMS + name for name in names}, body
    return dict(body)


async def test_commits_write_revisions_with_provenance_in_the_ledger(memory: Memory) -> None:
    task = new_task()
    first = await memory.write(task, "plans", "route", {"via": "north"})
    # Verified against revision 1; refused at commit, before anything happens, once it moves on.
    stale = await memory.intent(
        task, memory_writes=[{"namespace": "plans", "key": "route", "value": 3, "if_revision": 1}]
    )
    second = await memory.write(task, "plans", "route", {"via": "south"}, if_revision=1)

    response = await memory.get("plans/route")
    assert response.status_code == 200 and response.headers["etag"] == '"2"'
    view = response.json()
    assert view["value"] == {"via": "south"} and view["revision"] == 2
    assert view["provenance"]["intent_id"] == second and view["provenance"]["agent"] == "planner-1"

    history = (await memory.get("plans/route/history")).json()["revisions"]
    assert [(item["revision"], item["provenance"]["intent_id"]) for item in history] == [
        (1, first),
        (2, second),
    ]
    gateway = memory.app.state.gateway
    report = await ledger.verify(gateway.db)
    assert report.ok, report.problem
    entries = (
        await memory.client.get(
            "/ledger", params={"task_id": task}, headers=memory.agents.headers("worker", task)
        )
    ).json()["entries"]
    by_seq = {entry["seq"]: entry for entry in entries}
    for item in history:
        entry = by_seq[item["provenance"]["ledger_seq"]]
        assert entry["event"] == "memory_written" and entry["intent_id"] == item["provenance"]["intent_id"]
        assert entry["data"]["namespace"] == "plans" and entry["data"]["revision"] == item["revision"]
        assert entry["effect_digest"] == ledger.digest(item["value"])
        assert entry["seq"] > next(
            e["seq"] for e in entries if e["intent_id"] == entry["intent_id"] and e["event"] == "committed"
        )

    body = problem(await memory.commit(stale, task), 409, "stale-dependency")
    assert body["stale"][0]["current"] == 2
    assert (await memory.get("plans/route")).json()["revision"] == 2
    problem(await memory.get("plans/nothing"), 404, "not-found")


async def test_two_workers_racing_from_one_revision_land_exactly_one_commit(
    memory: Memory, effects: Any
) -> None:
    task = new_task()
    intents = [
        await memory.intent(
            task,
            "email.notify",
            arguments={"n": n, "delay": 0.3},
            memory_writes=[{"namespace": "plans", "key": "owner", "value": f"worker-{n}", "if_revision": 0}],
        )
        for n in range(2)
    ]
    answers = await asyncio.gather(
        *(memory.commit(intent, task, sub=f"committer-{n}") for n, intent in enumerate(intents))
    )
    assert sorted(answer.status_code for answer in answers) == [200, 409], [a.text for a in answers]
    winner = next(n for n, answer in enumerate(answers) if answer.status_code == 200)
    loser = answers[1 - winner]
    problem(loser, 409, "stale-dependency", "memory-busy")
    assert effects.calls["email.notify"] == 1  # the loser's tool was never called
    view = (await memory.get("plans/owner")).json()
    assert view["revision"] == 1 and view["value"] == f"worker-{winner}"
    assert view["provenance"]["intent_id"] == intents[winner]
    loser_view = (
        await memory.client.get(
            f"/intents/{intents[1 - winner]}", headers=memory.agents.headers("worker", task)
        )
    ).json()
    assert loser_view["status"] == "verified"


async def test_memory_only_commits_race_too(memory: Memory) -> None:
    task = new_task()
    intents = [
        await memory.intent(
            task, memory_writes=[{"namespace": "plans", "key": "k", "value": n, "if_revision": 0}]
        )
        for n in range(4)
    ]
    answers = await asyncio.gather(
        *(memory.commit(intent, task, sub=f"c-{n}") for n, intent in enumerate(intents))
    )
    assert sorted(answer.status_code for answer in answers) == [200, 409, 409, 409]
    history = (await memory.get("plans/k/history")).json()["revisions"]
    assert len(history) == 1


async def test_a_worker_acting_on_a_superseded_goal_is_refused(memory: Memory, effects: Any) -> None:
    task = new_task()
    await memory.write(task, "goals", task, "book a flight")
    work = await memory.intent(task, "email.notify", goal=1, arguments={"to": "ops"})
    await memory.write(task, "goals", task, "book a train", goal=1, if_revision=1)

    body = problem(await memory.commit(work, task, goal=1), 409, "stale-goal")
    assert body["goal_revision"] == 2
    tool = await memory.client.get(
        "/tools/docs.search", params={"q": "x"}, headers=memory.agents.headers("worker", task, goal=1)
    )
    problem(tool, 409, "stale-goal")
    assert effects.calls["email.notify"] == 0

    goal = await memory.get(f"goals/{task}")
    assert goal.json()["value"] == "book a train" and goal.headers["etag"] == '"2"'
    assert (await memory.commit(work, task, goal=2)).status_code == 200
    assert effects.calls["email.notify"] == 1
    trace = (
        await memory.client.get(f"/trace/{work}", headers=memory.agents.headers("worker", task, goal=2))
    ).json()
    assert [entry["data"]["revision"] for entry in trace["goal"]] == [1, 2]


async def test_proposals_are_checked_and_goals_belong_to_their_task(memory: Memory) -> None:
    task = new_task()
    headers = memory.agents.headers("planner", task)
    for proposal in (
        {"tool": "memory.set", "arguments": {}},
        {"tool": "memory.set", "memory_writes": [{"namespace": "goals", "key": "other", "value": 1}]},
        {"tool": "memory.set", "memory_writes": [{"namespace": "scratch", "key": "k", "value": 1}]},
        {"tool": "email.notify", "depends_on": [{"namespace": "scratch", "key": "k", "revision": 1}]},
        {"tool": "email.notify", "compensation": {"tool": "memory.set"}},
    ):
        response = await memory.client.post("/intents", json={"task_id": task, **proposal}, headers=headers)
        problem(response, 422, "intent-invalid")
    response = await memory.client.put("/memory/goals/" + task, json={"value": 1}, headers=headers)
    problem(response, 405, "method-not-allowed")


async def test_depends_on_is_checked_at_verify_and_at_commit(memory: Memory, effects: Any) -> None:
    task = new_task()
    await memory.write(task, "plans", "budget", 100)
    depends_on = [{"namespace": "plans", "key": "budget", "revision": 1}]
    verified = await memory.intent(task, "email.notify", arguments={"n": 1}, depends_on=depends_on)
    response = await memory.client.post(
        "/intents",
        json={"task_id": task, "tool": "email.notify", "arguments": {"n": 2}, "depends_on": depends_on},
        headers=memory.agents.headers("planner", task),
    )
    proposed = response.json()["intent_id"]
    await memory.write(task, "plans", "budget", 50, if_revision=1)

    response = await memory.client.post(
        f"/intents/{proposed}/verify",
        json={"verdict": "accept", "reason": "ok"},
        headers=memory.agents.headers("verifier", task),
    )
    problem(response, 409, "stale-dependency")
    problem(await memory.commit(verified, task), 409, "stale-dependency")
    assert effects.calls["email.notify"] == 0


async def test_policy_sees_the_revisions_a_call_touches(memory: Memory) -> None:
    task = new_task()
    await memory.write(task, "goals", task, "g")
    await memory.write(task, "plans", "a", 1, goal=1)
    seen: list[dict[str, Any]] = []
    policy = memory.app.state.gateway.policy
    decide = policy.decide

    async def recording(input: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen.append(input)
        return await decide(input, *args, **kwargs)

    policy.decide = recording
    intent = await memory.intent(
        task,
        "email.notify",
        goal=1,
        depends_on=[{"namespace": "plans", "key": "a", "revision": 1}],
        memory_writes=[{"namespace": "plans", "key": "b", "value": 2}],
    )
    assert (await memory.commit(intent, task, goal=1)).status_code == 200
    await memory.client.get("/tools/docs.search", headers=memory.agents.headers("worker", task, goal=1))
    expected = {f"goals/{task}": {"revision": 1}, "plans/a": {"revision": 1}, "plans/b": {"revision": 0}}
    assert [item["action"] for item in seen] == ["propose", "verify", "commit", "call"]
    assert all(item["memory"] == expected for item in seen[:3])
    assert seen[2]["intent"]["memory_writes"][0]["key"] == "b"
    assert seen[3]["memory"] == {f"goals/{task}": {"revision": 1}}


async def test_min_revision_reads_after_write(memory: Memory) -> None:
    task = new_task()
    await memory.write(task, "plans", "step", 1)
    body = problem(await memory.get("plans/step", min_revision=2), 409, "revision-not-reached")
    assert body["revision"] == 1 and body["min_revision"] == 2
    assert (await memory.get("plans/step", min_revision=1)).json()["revision"] == 1
    problem(await memory.get("plans/step", wait=31), 400, "bad-request")

    waiting = asyncio.create_task(memory.get("plans/step", min_revision=2, wait=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await memory.write(task, "plans", "step", 2, if_revision=1)
    response = await asyncio.wait_for(waiting, 10)
    assert response.status_code == 200 and response.json()["value"] == 2


async def test_scratch_writes_are_conditional(memory: Memory) -> None:
    task = new_task()
    path = f"/memory/scratch/{task}/notes"
    worker = memory.agents.headers("worker", task)

    async def put(value: Any, **headers: str) -> httpx.Response:
        return await memory.client.put(path, json={"value": value}, headers={**worker, **headers})

    problem(await put("a"), 428, "precondition-required")
    problem(await put("a", **{"If-Match": '"1"'}), 412, "precondition-failed")
    created = await put("a", **{"If-None-Match": "*"})
    assert created.status_code == 201 and created.headers["etag"] == '"1"'
    problem(await put("b", **{"If-None-Match": "*"}), 412, "precondition-failed")
    updated = await put("b", **{"If-Match": '"1"'})
    assert updated.status_code == 200 and updated.json()["revision"] == 2
    lost = await put("c", **{"If-Match": '"1"'})  # a second writer from revision 1 loses
    problem(lost, 412, "precondition-failed")
    assert lost.headers["etag"] == '"2"'
    assert (await put("d", **{"If-Match": 'W/"2"'})).status_code == 412  # weak tags never match
    assert (await put("d", **{"If-Match": '"7", "2"'})).json()["revision"] == 3
    assert (await put("e", **{"If-Match": "*"})).json()["revision"] == 4

    read = await memory.client.get(path, headers=worker)
    assert read.json()["value"] == "e" and read.headers["etag"] == '"4"' and read.json()["canonical"] is False

    problem(await memory.client.delete(path, headers=worker), 428, "precondition-required")
    problem(
        await memory.client.delete(path, headers={**worker, "If-Match": '"3"'}), 412, "precondition-failed"
    )
    assert (await memory.client.delete(path, headers={**worker, "If-Match": '"4"'})).status_code == 204
    problem(await memory.client.get(path, headers=worker), 404, "not-found")
    problem(await put("f", **{"If-Match": "*"}), 412, "precondition-failed")
    recreated = await put("f", **{"If-None-Match": "*"})
    assert recreated.status_code == 201 and recreated.json()["revision"] == 6  # revisions never repeat

    racers = await asyncio.gather(*(put(n, **{"If-Match": '"6"'}) for n in range(5)))
    assert sorted(r.status_code for r in racers) == [200, 412, 412, 412, 412]


async def test_scratch_is_scoped_per_task_and_never_canonical(memory: Memory) -> None:
    task, other = new_task(), new_task()
    worker = memory.agents.headers("worker", task)
    created = await memory.client.put(
        f"/memory/scratch/{task}/draft", json={"value": "x"}, headers={**worker, "If-None-Match": "*"}
    )
    assert created.status_code == 201
    assert created.json()["provenance"] == {
        **created.json()["provenance"],
        "intent_id": None,
        "ledger_seq": None,
    }
    elsewhere = await memory.client.put(
        f"/memory/scratch/{other}/draft", json={"value": "x"}, headers={**worker, "If-None-Match": "*"}
    )
    problem(elsewhere, 403, "policy-denied")
    committer = memory.agents.headers("committer", task)
    problem(
        await memory.client.put(
            f"/memory/scratch/{task}/d2", json={"value": 1}, headers={**committer, "If-None-Match": "*"}
        ),
        403,
        "policy-denied",
    )

    # Nothing canonical knows of it: no revision, no history, no ledger entry, no dependency.
    problem(await memory.get(f"scratch/{task}"), 404, "not-found")
    problem(await memory.get(f"scratch/{task}/draft/history"), 404, "not-found")
    entries = (await memory.client.get("/ledger", params={"task_id": task}, headers=worker)).json()["entries"]
    assert entries == []
    response = await memory.client.post(
        "/intents",
        json={
            "task_id": task,
            "tool": "email.notify",
            "depends_on": [{"namespace": f"scratch/{task}", "key": "draft", "revision": 1}],
        },
        headers=memory.agents.headers("planner", task),
    )
    problem(response, 422, "intent-invalid")
