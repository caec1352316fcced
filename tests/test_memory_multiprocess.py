"""Versioned memory across two gateway processes sharing one PostgreSQL database:
read-after-write with `min_revision`, racing writers, superseded goals, and a ledger
that `agent-gateway ledger verify` accepts afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.storage import upgrade_database
from tests.conftest import create_pg_database, drop_pg_database
from tests.processes import gateways, ledger_verify, write_config
from tests.protocol import new_task
from tests.test_memory import Memory, MemoryAgents, problem

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    name = await create_pg_database()
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    try:
        await upgrade_database(url)
        yield url
    finally:
        await drop_pg_database(name)


async def test_memory_across_two_gateway_processes(
    tmp_path: Path, pg_url: str, upstream: tuple[str, Any], effects: Any, keys_dir: Path
) -> None:
    config = write_config(
        tmp_path / "gateway.toml", database_url=pg_url, upstream_url=upstream[0], keys_dir=keys_dir
    )
    # No drain on stop: nothing balances these processes, and the test waits for each stop.
    config.write_text(config.read_text().replace("[gateway]\n", "[gateway]\ndrain_seconds = 0\n", 1))
    agents = MemoryAgents(keys_dir)
    task = new_task()
    with gateways(config, 2) as (first, second):
        async with (
            httpx.AsyncClient(base_url=first.url, timeout=30) as a_client,
            httpx.AsyncClient(base_url=second.url, timeout=30) as b_client,
        ):
            a, b = Memory(a_client, None, agents), Memory(b_client, None, agents)

            # B is asked for revision 1 before it exists; A's commit makes it visible.
            waiting = asyncio.create_task(b.get("plans/k", min_revision=1, wait=15))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            written = await a.write(task, "plans", "k", "from A", if_revision=0)
            response = await asyncio.wait_for(waiting, 15)
            assert response.status_code == 200, response.text
            assert response.json()["revision"] == 1 and response.json()["provenance"]["intent_id"] == written
            assert (await b.get("plans/k", min_revision=1)).json()["value"] == "from A"
            problem(await b.get("plans/k", min_revision=2), 409, "revision-not-reached")

            # Two writers from revision 1, one through each process: exactly one lands.
            racing = [
                await a.intent(
                    task,
                    "email.notify",
                    arguments={"n": n, "delay": 0.3},
                    memory_writes=[{"namespace": "plans", "key": "k", "value": n, "if_revision": 1}],
                )
                for n in range(2)
            ]
            answers = await asyncio.gather(
                a.commit(racing[0], task, sub="committer-a"), b.commit(racing[1], task, sub="committer-b")
            )
            assert sorted(answer.status_code for answer in answers) == [200, 409], [x.text for x in answers]
            assert effects.calls["email.notify"] == 1
            history = (await a.get("plans/k/history")).json()["revisions"]
            assert [item["revision"] for item in history] == [1, 2]

            # A goal revised through A is stale for a worker that reaches B.
            await a.write(task, "goals", task, "v1")
            work = await b.intent(task, "email.notify", goal=1, arguments={"to": "ops"})
            await a.write(task, "goals", task, "v2", goal=1, if_revision=1)
            problem(await b.commit(work, task, goal=1), 409, "stale-goal")
            assert effects.calls["email.notify"] == 1

    verified = ledger_verify(config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
