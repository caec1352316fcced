"""Exactly once across three gateway processes sharing one PostgreSQL database.

200 commits of 20 intents race: each intent is committed under several keys, by two
committer identities, through all three processes at once. The demo upstream counts
every request it receives (not only the effects it dedupes by key), so a second call
for any intent would show.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo.upstream import create_upstream
from gateway.storage import upgrade_database
from tests.conftest import create_pg_database, drop_pg_database
from tests.processes import gateways, ledger_verify, write_config
from tests.protocol import Agents, new_task
from tests.servers import run_server

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

INTENTS = 20
COMMITS = 200


@pytest.fixture
def fresh_upstream() -> Iterator[tuple[str, Any]]:
    app = create_upstream()
    with run_server(app) as url:
        yield url, app.state.effects


@pytest.fixture
async def pg_url() -> Any:
    name = await create_pg_database()
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    try:
        await upgrade_database(url)
        yield url
    finally:
        await drop_pg_database(name)


async def commit_until_settled(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> httpx.Response:
    for _ in range(200):
        response = await client.post(url, headers=headers)
        if response.status_code not in (409, 503):  # in progress; or overloaded (fail closed): retry
            return response
        await asyncio.sleep(0.05)
    raise AssertionError(f"still in progress: {response.text}")


async def test_200_racing_commits_on_3_processes_execute_each_intent_once(
    tmp_path: Path, pg_url: str, fresh_upstream: tuple[str, Any], keys_dir: Path
) -> None:
    upstream_url, effects = fresh_upstream
    config = write_config(
        tmp_path / "gateway.toml",
        database_url=pg_url,
        upstream_url=upstream_url,
        keys_dir=keys_dir,
        db_pool=8,  # 3 x 16 connections: the PostgreSQL server may be shared
    )
    agents = Agents(keys_dir)
    task = new_task()
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    with gateways(config, 3) as processes:
        urls = [process.url for process in processes]
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            intent_ids = []
            for number in range(INTENTS):
                proposal = {
                    "task_id": task,
                    "tool": "email.notify",
                    "arguments": {"n": number, "delay": 0.05},
                }
                proposed = await client.post(
                    urls[number % 3] + "/intents", json=proposal, headers=agents.headers("planner", task)
                )
                assert proposed.status_code == 201, proposed.text
                iid = proposed.json()["intent_id"]
                verified = await client.post(
                    urls[(number + 1) % 3] + f"/intents/{iid}/verify",
                    json={"verdict": "accept", "reason": "ok"},
                    headers=agents.headers("verifier", task),
                )
                assert verified.status_code == 200, verified.text
                intent_ids.append(iid)

            jobs = []
            for index in range(COMMITS):
                number = index % INTENTS
                iid = intent_ids[number]
                # 10 commits per intent: 2 committers x several keys, some keys repeated by racing clients
                sub = f"committer-{1 + index % 2}"
                key = f"intent-{number}-k{(index // INTENTS) % 3}"
                headers = agents.headers("committer", task, sub=sub, key=key)
                url = urls[index % 3] + f"/intents/{iid}/commit"
                jobs.append((iid, commit_until_settled(client, url, headers)))
            responses = await asyncio.gather(*(job for _, job in jobs))

    bodies: dict[str, set[bytes]] = defaultdict(set)
    for (iid, _), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "committed"
        bodies[iid].add(response.content)
    assert all(len(contents) == 1 for contents in bodies.values()), "clients saw different results"
    assert len(bodies) == INTENTS

    assert effects.calls["email.notify"] == INTENTS  # requests received, not just effects recorded
    per_intent = defaultdict(int)
    for effect in effects.effects:
        per_intent[effect["arguments"]["n"]] += 1
    assert per_intent == dict.fromkeys(range(INTENTS), 1)

    verified = ledger_verify(config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ledger ok" in verified.stdout
