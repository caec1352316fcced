"""Running it in production: three replicas behind the real nginx, on PostgreSQL and Redis.

One cluster (`deploy/local/cluster up --replicas 3`) serves the module. The tests run
in file order: quota, revocation, metrics and credentials with all three replicas up,
then SIGTERM to one replica under load, and last a search for the secrets in every
log, decision-log line, ledger row, error body and metric the run produced.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.credentials import arguments_digest
from gateway.keys import key_from_jwk
from tests.conftest import REPO, drop_pg_database, role_token
from tests.protocol import Agents, new_task
from tests.servers import free_port_block

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CLUSTER = REPO / "deploy" / "local" / "cluster"
QUOTA = 10
SEARCH_SECRET = f"search-{uuid.uuid4().hex}"
NOTIFY_SECRET = f"notify-{uuid.uuid4().hex}"


@dataclass
class Cluster:
    url: str
    state_dir: Path
    keys_dir: Path
    database: str
    decision_log: Path
    replicas: list[dict[str, Any]]
    effects: Any
    bodies: list[str] = field(default_factory=list)  # every error body seen, for the secrets search
    stopped: set[int] = field(default_factory=set)

    def token(self, role: str, sub: str | None = None) -> str:
        return role_token(self.keys_dir, role, sub, ttl=3600)

    def auth(self, role: str = "worker", sub: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, sub)}"}

    def replica_url(self, replica: dict[str, Any]) -> str:
        return f"http://127.0.0.1:{replica['port']}"

    def keep(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            self.bodies.append(response.text)
        return response


def run_cluster(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLUSTER), *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def write_config(tmp: Path, *, database: str, demo_url: str) -> Path:
    (tmp / "search.secret").write_text(SEARCH_SECRET + "\n")
    (tmp / "notify.secret").write_text(NOTIFY_SECRET)
    prefix = f"agw-cluster-{uuid.uuid4().hex[:8]}"
    text = f"""
[gateway]
database = "postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
keys_dir = "{tmp / "keys"}"
decision_log = "{tmp / "decisions.jsonl"}"
redis_url = "redis://127.0.0.1:6379/0"
drain_seconds = 1.0
shutdown_timeout = 10
[gateway.timeouts]
connect = 1.0
read = 10.0
[policy]
dir = "{REPO / "policies"}"
reload = false
[rate_limits]
key_prefix = "{prefix}"

[[limits]]
name = "quota-search"
match = {{sub = "quota-agent", tool = "docs.*"}}
rate = "{QUOTA}/minute"

[[tools]]
name = "docs.search"
upstream = "{demo_url}/search"
assertion = true
[tools.credential]
prefix = "Bearer "
value_file = "search.secret"

[[tools]]
name = "email.notify"
upstream = "{demo_url}/effects/email.notify"
effect = "write"
assertion = true
[tools.credential]
header = "X-Api-Key"
value_file = "notify.secret"
"""
    path = tmp / "gateway.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream: tuple[str, Any]) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("production")
    state_dir = tmp / "state"
    database = f"agw_prod_{os.urandom(6).hex()}"
    config = write_config(tmp, database=database, demo_url=upstream[0])
    port = free_port_block(4)
    try:
        started = run_cluster(
            "up", "--replicas", "3", "--config", str(config), "--port", str(port), state_dir=state_dir
        )
        assert started.returncode == 0, started.stdout + started.stderr
        state = json.loads((state_dir / "state.json").read_text())
        yield Cluster(
            url=f"http://127.0.0.1:{port}",
            state_dir=state_dir,
            keys_dir=tmp / "keys",
            database=database,
            decision_log=tmp / "decisions.jsonl",
            replicas=state["replicas"],
            effects=upstream[1],
        )
    finally:
        stopped = run_cluster("down", state_dir=state_dir)
        asyncio.run(drop_pg_database(database))
        assert stopped.returncode == 0, stopped.stderr


def served_by(cluster: Cluster, marker: str) -> Counter[str]:
    """Which replica (address) answered each request whose nginx log line has `marker`."""
    answered: Counter[str] = Counter()
    for line in (cluster.state_dir / "nginx-access.log").read_text().splitlines():
        if marker in line:
            attempts = line.split("upstream=[", 1)[1].split("]", 1)[0]
            answered[attempts.split(",")[-1].strip()] += 1
    return answered


def test_a_quota_holds_across_three_replicas(cluster: Cluster) -> None:
    cluster.effects.reset()
    headers = cluster.auth("worker", "quota-agent")
    marker = f"quota-{uuid.uuid4().hex[:6]}"

    def call(n: int) -> httpx.Response:
        with httpx.Client(base_url=cluster.url, headers=headers, timeout=10) as client:
            return cluster.keep(client.get("/tools/docs.search", params={"q": f"{marker}-{n}"}))

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(call, range(3 * QUOTA)))
    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {200: QUOTA, 429: 2 * QUOTA}, statuses
    assert cluster.effects.calls["docs.search"] == QUOTA  # the tool saw at most N
    for refused in (answer for answer in answers if answer.status_code == 429):
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["ratelimit-policy"] == f'"quota-search";q={QUOTA};w=60'
        assert refused.json()["type"] == "https://agent-gateway.dev/problems/rate-limited"
    assert len(served_by(cluster, marker)) == 3, "every replica took part"
    # Another agent is not affected by this one's quota.
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        assert client.get("/tools/docs.search", headers=cluster.auth("worker", "other")).status_code == 200


def test_a_revocation_applies_on_every_replica_within_a_second(cluster: Cluster) -> None:
    token = cluster.token("worker", "revoked-agent")
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    headers = {"Authorization": f"Bearer {token}"}
    clients = [
        httpx.Client(base_url=cluster.replica_url(r), headers=headers, timeout=5) for r in cluster.replicas
    ]
    try:
        assert [c.get("/tools/docs.search").status_code for c in clients] == [200, 200, 200]
        config = json.loads((cluster.state_dir / "state.json").read_text())["config"]
        revoked = subprocess.run(
            [sys.executable, "-m", "gateway", "revoke", "--jti", jti, "--reason", "test", "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert revoked.returncode == 0, revoked.stderr
        stored = time.monotonic()  # the CLI has committed the revocation
        refused_after: dict[int, float] = {}
        while len(refused_after) < len(clients) and time.monotonic() - stored < 3:
            for index, client in enumerate(clients):
                if (
                    index not in refused_after
                    and cluster.keep(client.get("/tools/docs.search")).status_code == 401
                ):
                    refused_after[index] = time.monotonic() - stored
            time.sleep(0.02)
        assert len(refused_after) == 3, refused_after
        assert max(refused_after.values()) < 1.0, refused_after
    finally:
        for client in clients:
            client.close()


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(cluster: Cluster) -> list[dict[Any, float]]:
    scraped = []
    for replica in cluster.replicas:
        response = httpx.get(cluster.replica_url(replica) + "/metrics", timeout=5)
        assert response.status_code == 200
        cluster.bodies.append(response.text)
        scraped.append(metric_values(response.text))
    return scraped


def total(scraped: list[dict[Any, float]], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return sum(values.get(key, 0.0) for values in scraped)


def test_metrics_parse_and_match_the_calls_made(cluster: Cluster) -> None:
    before = scrape(cluster)
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        for n in range(12):
            assert (
                client.get("/tools/docs.search", params={"q": n}, headers=cluster.auth()).status_code == 200
            )
        for _ in range(3):
            assert cluster.keep(client.get("/tools/docs.search")).status_code == 401
        limited = cluster.auth("worker", "quota-agent")  # its quota is used up
        for _ in range(2):
            assert cluster.keep(client.get("/tools/docs.search", headers=limited)).status_code == 429
    after = scrape(cluster)
    requests = "agent_gateway_requests_total"
    for labels, made in (
        ({"decision": "allow", "status": "200"}, 12),
        ({"decision": "none", "status": "401"}, 3),
        ({"decision": "none", "status": "429"}, 2),
    ):
        delta = total(after, requests, tool="docs.search", **labels) - total(
            before, requests, tool="docs.search", **labels
        )
        assert delta == made, (labels, delta)
    limited_delta = total(after, "agent_gateway_rate_limited_total", tool="docs.search") - total(
        before, "agent_gateway_rate_limited_total", tool="docs.search"
    )
    assert limited_delta == 2
    for values in after:
        assert values[("agent_gateway_policy_reload_success", ())] == 1
        assert values[("agent_gateway_rate_limit_storage_up", ())] == 1
        assert any(
            name == "agent_gateway_policy_version_info" and value == 1 for (name, _), value in values.items()
        )


def verify_assertion(cluster: Cluster, token: str, tool: str) -> dict[str, Any]:
    jwks = httpx.get(cluster.url + "/.well-known/jwks.json", timeout=5).json()
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [key for key in jwks["keys"] if key["kid"] == kid]
    claims = jwt.decode(token, key_from_jwk(jwk), algorithms=["EdDSA"], audience=tool, issuer="agent-gateway")
    assert claims["exp"] - claims["iat"] <= 60
    return claims


def test_the_tool_sees_the_gateway_credential_and_assertion_never_the_callers_token(cluster: Cluster) -> None:
    cluster.effects.reset()
    token = cluster.token("worker", "cred-agent")
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        answer = client.get(
            "/tools/docs.search", params={"q": "cred"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200
        seen = cluster.effects.headers[-1]
        assert seen["authorization"] == f"Bearer {SEARCH_SECRET}"
        assert token not in json.dumps(cluster.effects.headers)
        claims = verify_assertion(cluster, seen["gateway-assertion"], "docs.search")
        assert (claims["sub"], claims["role"]) == ("cred-agent", "worker")
        assert claims["args_digest"] == arguments_digest({"q": "cred"})

        agents, task = Agents(cluster.keys_dir), new_task()
        proposal = client.post(
            "/intents",
            json={"task_id": task, "tool": "email.notify", "arguments": {"to": "ops"}},
            headers=agents.headers("planner", task),
        )
        assert proposal.status_code == 201, proposal.text
        intent_id = proposal.json()["intent_id"]
        verified = client.post(
            f"/intents/{intent_id}/verify",
            json={"verdict": "accept", "reason": "ok"},
            headers=agents.headers("verifier", task),
        )
        assert verified.status_code == 200, verified.text
        committed = client.post(
            f"/intents/{intent_id}/commit", headers=agents.headers("committer", task, key="c")
        )
        assert committed.status_code == 200, committed.text
    seen = cluster.effects.headers[-1]
    assert seen["x-api-key"] == NOTIFY_SECRET and "authorization" not in seen
    claims = verify_assertion(cluster, seen["gateway-assertion"], "email.notify")
    assert claims["intent_id"] == intent_id and claims["role"] == "committer"


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def executing_intents(database: str) -> int:
    connection = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}")
    try:
        return int(await connection.fetchval("SELECT count(*) FROM intents WHERE status = 'executing'"))
    finally:
        await connection.close()


def test_sigterm_under_load_loses_no_read_call_and_leaves_nothing_executing(cluster: Cluster) -> None:
    victim = cluster.replicas[0]
    stop = threading.Event()
    reads: Counter[int] = Counter()
    commits: Counter[int] = Counter()
    lock = threading.Lock()

    def read_load(worker: int) -> None:
        with httpx.Client(
            base_url=cluster.url, headers=cluster.auth("worker", f"load-{worker}"), timeout=20
        ) as c:
            while not stop.is_set():
                status = cluster.keep(c.get("/tools/docs.search", params={"q": "load"})).status_code
                with lock:
                    reads[status] += 1

    def commit_load(worker: int) -> None:
        agents = Agents(cluster.keys_dir)
        with httpx.Client(base_url=cluster.url, timeout=30) as c:
            n = 0
            while not stop.is_set():
                task, n = new_task(), n + 1
                body = {"task_id": task, "tool": "email.notify", "arguments": {"delay": 0.3, "n": n}}
                proposal = c.post("/intents", json=body, headers=agents.headers("planner", task))
                if proposal.status_code != 201:
                    continue
                intent_id = proposal.json()["intent_id"]
                verdict = {"verdict": "accept", "reason": "ok"}
                c.post(f"/intents/{intent_id}/verify", json=verdict, headers=agents.headers("verifier", task))
                answer = c.post(
                    f"/intents/{intent_id}/commit", headers=agents.headers("committer", task, key="k")
                )
                with lock:
                    commits[answer.status_code] += 1

    threads = [threading.Thread(target=read_load, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=commit_load, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        os.kill(victim["pid"], signal.SIGTERM)
        signalled = time.monotonic()
        ready = httpx.get(cluster.replica_url(victim) + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["checks"]["draining"] is True
        assert time.monotonic() - signalled < 1.0
        while process_alive(victim["pid"]) and time.monotonic() - signalled < 20:
            time.sleep(0.1)
        cluster.stopped.add(victim["pid"])
        time.sleep(1.0)  # load keeps flowing to the two replicas left
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not process_alive(victim["pid"]), "the replica did not stop"
    assert sum(reads.values()) > 50 and set(reads) == {200}, reads  # no accepted read call was lost
    assert commits[200] > 0, commits
    assert asyncio.run(executing_intents(cluster.database)) == 0


def test_no_secret_appears_in_logs_decision_log_ledger_errors_or_metrics(cluster: Cluster) -> None:
    logs = [path.read_text(errors="replace") for path in cluster.state_dir.glob("*.log")]
    assert any("replica" in path.name for path in cluster.state_dir.glob("*.log"))
    decisions = cluster.decision_log.read_text()
    assert decisions.count("\n") > 50

    async def dump() -> str:
        connection = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{cluster.database}")
        try:
            rows = []
            for table in ("ledger", "intents", "idempotency_keys", "approvals", "revocations"):
                rows += [dict(row) for row in await connection.fetch(f"SELECT * FROM {table}")]  # noqa: S608
            return json.dumps(rows, default=str)
        finally:
            await connection.close()

    database = asyncio.run(dump())
    assert "committed" in database
    places = {"logs": "\n".join(logs), "decision log": decisions, "database": database}
    places["error bodies and metrics"] = "\n".join(cluster.bodies)
    assert places["error bodies and metrics"]
    for where, content in places.items():
        for secret in (SEARCH_SECRET, NOTIFY_SECRET):
            assert secret not in content, f"a credential appears in the {where}"
