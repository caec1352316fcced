"""`/metrics`: Prometheus text that parses, with counters that match the calls made."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, role_token
from tests.protocol import Agents, commit_config, new_task, propose_and_verify


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}; the parser rejects malformed text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def gw(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    from gateway.app import create_app

    limits = [{"name": "echo", "match": {"tool": "docs.echo"}, "rate": "1/minute"}]
    app = create_app(commit_config(tmp_path, database_url, upstream[0], keys_dir, limits=limits))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, app


async def test_metrics_parse_and_count_the_calls_made(gw: Any, keys_dir: Path, effects: Any) -> None:
    client, app = gw
    before = samples((await client.get("/metrics")).text)
    assert (
        value(before, "agent_gateway_requests_total", tool="docs.search", decision="allow", status="200") == 0
    )

    worker = {"Authorization": f"Bearer {role_token(keys_dir, 'worker')}"}
    for n in range(3):
        assert (await client.get("/tools/docs.search", params={"q": n}, headers=worker)).status_code == 200
    for _ in range(2):
        assert (await client.get("/tools/docs.search")).status_code == 401
    intruder = {"Authorization": f"Bearer {role_token(keys_dir, 'intruder')}"}
    assert (await client.get("/tools/docs.search", headers=intruder)).status_code == 403
    assert (await client.get("/tools/no.such.tool", headers=worker)).status_code == 404
    assert (await client.get("/tools/docs.echo", headers=worker)).status_code == 200
    assert (await client.get("/tools/docs.echo", headers=worker)).status_code == 429

    agents, task = Agents(keys_dir), new_task()
    committed = await propose_and_verify(client, agents, task, "email.notify", {"n": 1})
    failed = await propose_and_verify(client, agents, task, "email.notify", {"fail": True})
    transfer = await propose_and_verify(
        client,
        agents,
        task,
        "payments.transfer",
        {"from_account": "a", "to_account": "b", "amount": 5, "currency": "EUR"},
    )
    for n, intent in enumerate((committed, failed, transfer)):
        answer = await client.post(
            f"/intents/{intent}/commit", headers=agents.headers("committer", task, key=f"m{n}")
        )
        assert answer.status_code in (200, 202), answer.text
    assert answer.status_code == 202  # high risk: waits for an approver

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    requests = "agent_gateway_requests_total"
    assert value(found, requests, tool="docs.search", decision="allow", status="200") == 3
    assert value(found, requests, tool="docs.search", decision="none", status="401") == 2
    assert value(found, requests, tool="docs.search", decision="deny", status="403") == 1
    assert value(found, requests, tool="(unknown)", decision="none", status="404") == 1
    assert value(found, requests, tool="docs.echo", decision="allow", status="200") == 1
    assert value(found, requests, tool="docs.echo", decision="none", status="429") == 1
    assert sum(v for (name, _), v in found.items() if name == requests) == 9
    assert value(found, "agent_gateway_rate_limited_total", tool="docs.echo") == 1

    stage = "agent_gateway_stage_seconds_count"
    assert value(found, stage, stage="authenticate") == 9  # every direct call, refused or not
    assert value(found, stage, stage="upstream") == 3 + 1 + 2  # forwarded calls and the two commits run
    assert value(found, stage, stage="record") == 2
    assert value(found, stage, stage="policy") == 5  # the allowed calls and the denied one
    assert value(found, "agent_gateway_stage_seconds_bucket", stage="authenticate", le="+Inf") == 9

    assert value(found, "agent_gateway_commits_total", outcome="committed") == 1
    assert value(found, "agent_gateway_commits_total", outcome="failed") == 1
    assert value(found, "agent_gateway_approvals_pending") == 1
    version = app.state.gateway.policy.version
    assert version and value(found, "agent_gateway_policy_version_info", version=version) == 1
    assert value(found, "agent_gateway_policy_reload_success") == 1
    assert value(found, "agent_gateway_rate_limit_storage_up") == 1
    entries = (await client.get(f"/ledger?task_id={task}", headers=worker)).json()["entries"]
    assert value(found, "agent_gateway_ledger_head_seq") == max(entry["seq"] for entry in entries)


def test_metrics_sum_over_worker_processes(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, what each worker counted shows up in any worker's /metrics."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    worker = textwrap.dedent(
        """
        import sys
        from gateway.metrics import Metrics
        metrics = Metrics()
        for _ in range(int(sys.argv[1])):
            metrics.request("docs.search", "allow", 200)
        metrics.stage["policy"].observe(0.001)
        metrics.commit("committed")
        metrics.policy("v1", True)
        """
    )
    for count in ("2", "3"):
        subprocess.run([sys.executable, "-c", worker, count], env=env, check=True, timeout=60)
    reader = "from gateway.metrics import Metrics; print(Metrics().exposition().decode())"
    done = subprocess.run(
        [sys.executable, "-c", reader], env=env, check=True, timeout=60, capture_output=True, text=True
    )
    found = samples(done.stdout)
    assert (
        value(found, "agent_gateway_requests_total", tool="docs.search", decision="allow", status="200") == 5
    )
    assert value(found, "agent_gateway_stage_seconds_count", stage="policy") == 2
    assert value(found, "agent_gateway_commits_total", outcome="committed") == 2


async def test_the_commit_batch_histogram_counts_every_reservation_and_record(
    gw: Any, keys_dir: Path, effects: Any, database_url: str
) -> None:
    """On PostgreSQL every commit's reservation and record is one call of some statement:
    the histogram's sums are the commits, and its counts the statements that ran them."""
    client, _ = gw
    agents, task = Agents(keys_dir), new_task()
    intents = [await propose_and_verify(client, agents, task, "email.notify", {"n": n}) for n in range(12)]
    answers = await asyncio.gather(
        *(
            client.post(f"/intents/{iid}/commit", headers=agents.headers("committer", task, key=f"b{n}"))
            for n, iid in enumerate(intents)
        )
    )
    assert [answer.status_code for answer in answers] == [200] * 12
    found = samples((await client.get("/metrics")).text)
    for step in ("reserve", "record"):
        calls = value(found, "agent_gateway_commit_batch_size_sum", step=step)
        statements = value(found, "agent_gateway_commit_batch_size_count", step=step)
        if database_url.startswith("postgresql"):
            assert calls == 12
            assert 1 <= statements <= 12
        else:  # SQLite commits take the general path
            assert calls == statements == 0
