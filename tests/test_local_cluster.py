"""`deploy/local/cluster`: three gateway replicas behind nginx, on loopback, as an operator runs them.

One cluster serves the whole module (it takes a few seconds to start), on a fresh
PostgreSQL database that the script itself creates. The tests run in file order
and kill replicas as they go: the spread is measured with three alive, the
in-flight POST kills one, the passive health check kills another, and the last
test brings the cluster down and checks that nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import REPO, drop_pg_database, role_token
from tests.servers import free_port, free_port_block

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CLUSTER = REPO / "deploy" / "local" / "cluster"
PROBLEM = "application/problem+json"


class HoldUpstream:
    """A tool upstream that holds every request until released, and records who sent it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, int]] = []  # (method, the gateway's client port)
        self.released = threading.Event()

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
        self.released.clear()

    def app(self) -> Starlette:
        async def hold(request: Request) -> Response:
            assert request.client is not None
            with self.lock:
                self.calls.append((request.method, request.client.port))
            # Released by the test thread (at most 15 s later).
            await asyncio.to_thread(self.released.wait, 15)
            return JSONResponse({"held": True})

        return Starlette(routes=[Route("/hold", hold, methods=["GET", "POST"])])


@contextlib.contextmanager
def serve_as_is(app: Starlette) -> Iterator[str]:
    """Like tests.servers.run_server, but the app sees the real peer address.

    uvicorn's proxy-header support would replace it with the X-Forwarded-For that
    nginx adds and the gateway passes on (and the port with 0).
    """
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("hold upstream did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class Cluster:
    url: str
    state_dir: Path
    keys_dir: Path
    hold: HoldUpstream
    replicas: list[dict[str, Any]]  # index, port, pid, log
    nginx_pid: int
    max_fails: int
    fail_timeout: int
    killed: set[int] = field(default_factory=set)

    def alive_replicas(self) -> list[dict[str, Any]]:
        return [replica for replica in self.replicas if replica["pid"] not in self.killed]

    def kill(self, replica: dict[str, Any]) -> None:
        os.kill(replica["pid"], signal.SIGKILL)
        self.killed.add(replica["pid"])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {role_token(self.keys_dir, 'worker')}"}


def run_cluster(*args: str, state_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLUSTER), *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def nothing_listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def owner_of_local_port(port: int, pids: list[int]) -> int:
    """Which of `pids` holds the TCP socket whose local port is `port` (read from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no replica holds local port {port}")


def write_config(path: Path, *, database: str, keys_dir: Path, demo_url: str, hold_url: str) -> None:
    # json.dumps gives TOML-compatible basic strings for these paths and URLs.
    tools = [
        ("docs.search", f"{demo_url}/search"),
        ("docs.hold", f"{hold_url}/hold"),
    ]
    text = (
        "[gateway]\n"
        f"database = {json.dumps(database)}\n"
        f"keys_dir = {json.dumps(str(keys_dir))}\n"
        'decision_log = ""\n'
        "max_body_bytes = 65536\n"
        "[gateway.timeouts]\nconnect = 1.0\nread = 20.0\n"
        f"[policy]\ndir = {json.dumps(str(REPO / 'policies'))}\nreload = false\n"
    )
    for name, upstream in tools:
        text += f'\n[[tools]]\nname = "{name}"\nupstream = {json.dumps(upstream)}\neffect = "read"\n'
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, upstream: tuple[str, Any]) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    state_dir, keys_dir = tmp / "state", tmp / "keys"
    # Not created here: `cluster up` must create a missing database itself.
    database = f"agw_cluster_{os.urandom(6).hex()}"
    hold = HoldUpstream()
    with serve_as_is(hold.app()) as hold_url:
        config = tmp / "gateway.toml"
        write_config(
            config,
            database=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}",
            keys_dir=keys_dir,
            demo_url=upstream[0],
            hold_url=hold_url,
        )
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
                keys_dir=keys_dir,
                hold=hold,
                replicas=state["replicas"],
                nginx_pid=state["nginx"]["pid"],
                max_fails=state["max_fails"],
                fail_timeout=state["fail_timeout"],
            )
        finally:
            hold.released.set()
            stopped = run_cluster("down", state_dir=state_dir)
            asyncio.run(drop_pg_database(database))
            assert stopped.returncode == 0, stopped.stderr


def access_log(cluster: Cluster, marker: str) -> list[list[str]]:
    """For each logged request whose line has `marker`: the replica addresses nginx tried, in order."""
    tried = []
    for line in (cluster.state_dir / "nginx-access.log").read_text().splitlines():
        if marker in line:
            match = re.search(r"upstream=\[([^\]]*)\]", line)
            assert match, line
            tried.append([address.strip() for address in re.split(r"[,:]\s", match.group(1))])
    return tried


def test_calls_are_spread_over_every_replica(cluster: Cluster) -> None:
    status = run_cluster("status", state_dir=cluster.state_dir)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("ready") >= 4  # three replicas and nginx

    with httpx.Client(base_url=cluster.url, headers=cluster.headers(), timeout=10) as client:
        for n in range(30):
            response = client.get("/tools/docs.search", params={"q": f"spread-{n}"})
            assert response.status_code == 200, response.text
            assert response.json()["query"] == f"spread-{n}"
            assert response.headers["gateway-decision-id"]

    # Each replica's own access log (uvicorn's) shows the calls it served.
    served = {
        replica["index"]: Path(replica["log"]).read_text().count("GET /tools/docs.search?q=spread-")
        for replica in cluster.replicas
    }
    assert sum(served.values()) == 30
    assert all(count >= 5 for count in served.values()), served
    # And nginx saw every one of them answered by a single replica, all three in use.
    tried = access_log(cluster, "q=spread-")
    assert len(tried) == 30
    assert all(len(attempts) == 1 for attempts in tried)
    assert len({attempts[0] for attempts in tried}) == 3


def test_a_post_in_flight_is_not_resent_when_its_replica_dies(cluster: Cluster) -> None:
    alive = cluster.alive_replicas()
    assert len(alive) >= 2, "another live replica must exist for a re-send to be possible"
    cluster.hold.reset()
    result: dict[str, httpx.Response] = {}

    def post() -> None:
        with httpx.Client(base_url=cluster.url, headers=cluster.headers(), timeout=20) as client:
            result["response"] = client.post("/tools/docs.hold", json={"step": "commit-like"})

    sender = threading.Thread(target=post)
    sender.start()
    deadline = time.monotonic() + 10
    while not cluster.hold.calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cluster.hold.calls, "the POST never reached the upstream"

    # The replica holding the call is the one whose socket has the upstream's client port.
    holder_pid = owner_of_local_port(cluster.hold.calls[0][1], [r["pid"] for r in alive])
    cluster.kill(next(r for r in alive if r["pid"] == holder_pid))
    sender.join(timeout=15)
    assert not sender.is_alive()

    response = result["response"]
    assert response.status_code == 502
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["type"] == "https://agent-gateway.dev/problems/gateway-unavailable"
    time.sleep(1.0)  # room for a re-send through another replica to reach the upstream, if one came
    assert [method for method, _ in cluster.hold.calls] == ["POST"]
    cluster.hold.released.set()


def test_a_killed_replica_stops_receiving_traffic(cluster: Cluster) -> None:
    alive = cluster.alive_replicas()
    assert len(alive) >= 2
    victim = alive[0]
    victim_address = f"127.0.0.1:{victim['port']}"
    started = time.monotonic()
    with httpx.Client(base_url=cluster.url, headers=cluster.headers(), timeout=10) as client:
        for n in range(30):
            if n == 10:
                cluster.kill(victim)
            response = client.get("/tools/docs.search", params={"q": f"health-{n}"})
            # GETs that could not reach the dead replica were passed to a live one.
            assert response.status_code == 200, (n, response.text)
    elapsed = time.monotonic() - started
    assert elapsed < cluster.fail_timeout, "too slow to tell a probe from a failure"

    tried = access_log(cluster, "q=health-")
    assert len(tried) == 30
    before, after = tried[:10], tried[10:]
    assert any(victim_address in attempts for attempts in before)
    # Passive health: at most max_fails attempts on the dead replica, then none.
    assert sum(attempts.count(victim_address) for attempts in after) <= cluster.max_fails
    assert all(victim_address not in attempts for attempts in after[-10:])
    answered_by = Counter(attempts[-1] for attempts in after)
    assert victim_address not in answered_by


def test_down_stops_everything(cluster: Cluster) -> None:
    stopped = run_cluster("down", state_dir=cluster.state_dir)
    assert stopped.returncode == 0, stopped.stderr
    for pid in [replica["pid"] for replica in cluster.replicas] + [cluster.nginx_pid]:
        assert not process_alive(pid), pid
    for port in [replica["port"] for replica in cluster.replicas] + [int(cluster.url.rsplit(":", 1)[1])]:
        assert nothing_listens(port), port
    assert not (cluster.state_dir / "state.json").exists()
    assert not list(cluster.state_dir.glob("*.pid"))
    status = run_cluster("status", state_dir=cluster.state_dir)
    assert status.returncode == 3
