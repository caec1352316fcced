"""Commit-protocol benchmark (issue 4): commits per second through the whole protocol.

    python bench/bench_commits.py                   # SQLite and PostgreSQL, 1 and 3 gateway processes
    python bench/bench_commits.py --db postgresql --processes 3 --intents 2000
    python bench/bench_commits.py --quick           # fewer intents per cell
    python bench/bench_commits.py --db postgresql --processes 3 --repeat 5   # min / median / max

Per cell (database x gateway processes), all on 127.0.0.1, everything fresh:

    protocol   N intents, each proposed, verified and committed (3 requests, 2 role
               tokens + envelopes, policy 3 times, ~5 ledger appends), C at a time
    commit     N more intents proposed and verified first; then only their commits, C at a time
    latency    200 commits one after another, against 200 direct POSTs to the same tool:
               the difference of the medians is what the commit protocol adds

The gateways are `python -m gateway serve` processes sharing one database (a fresh
SQLite file, or a fresh PostgreSQL database on 127.0.0.1:5432); the tool upstream is the
demo upstream (`gateway.demo.upstream`) in its own uvicorn process; the load generator
is this process, spread round-robin over the gateways: `bench/leanhttp.py`, a minimal
HTTP/1.1 keep-alive client (requests written as bytes, answers parsed by httptools, on
uvloop when installed), since aiohttp's client cost about 0.4 ms of CPU per request here,
CPU that the 2 cores share with what is measured. Afterwards the upstream must have seen
exactly one call per intent and `agent-gateway ledger verify` must pass.
The exit status is 0 whatever the figures: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.leanhttp import Client  # noqa: E402
from tests.conftest import create_pg_database, drop_pg_database  # noqa: E402
from tests.processes import GatewayProcess, environment, ledger_verify, write_config  # noqa: E402
from tests.protocol import Agents  # noqa: E402
from tests.servers import free_port  # noqa: E402

try:  # the load generator's own event loop: uvloop if installed (it is with uvicorn[standard])
    import uvloop

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:
    loop_factory = None


@contextlib.contextmanager
def upstream_process() -> Iterator[tuple[str, int]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "gateway.demo.upstream:create_upstream",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            # Longer than the gateway pool keeps idle connections (aiohttp: 15 s), so a pooled
            # connection is never closed under a commit (that outcome would be `unknown`).
            "--timeout-keep-alive",
            "75",
        ],
        env=environment(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import urllib.request

                urllib.request.urlopen(url + "/_effects", timeout=1).read()  # noqa: S310 - loopback
                break
            time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


async def timed(concurrency: int, jobs: list[Callable[[], Awaitable[Any]]]) -> tuple[float, list[float]]:
    queue = list(reversed(jobs))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            job = queue.pop()
            started = time.perf_counter()
            await job()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


JSON = {"Content-Type": "application/json"}


class Driver:
    def __init__(self, client: Client, urls: list[str], agents: Agents, task: str) -> None:
        self.client, self.urls, self.agents, self.task = client, urls, agents, task
        self.headers = {role: agents.headers(role, task) for role in ("planner", "verifier", "committer")}
        self.turn = 0

    def url(self) -> str:
        self.turn += 1
        return self.urls[self.turn % len(self.urls)]

    async def post(self, path: str, role: str, body: Any = None, key: str | None = None) -> dict[str, Any]:
        headers = self.headers[role]
        if key:
            headers = {**headers, "Idempotency-Key": f'"{key}"'}
        data = None
        if body is not None:
            headers, data = {**headers, **JSON}, json.dumps(body).encode()
        status, raw = await self.client.request("POST", self.url() + path, headers, data)
        if status not in (200, 201):
            raise RuntimeError(f"{path}: {status} {raw[:1000]!r}")
        return dict(json.loads(raw))

    async def propose_verify(self, number: int) -> str:
        proposal = {"task_id": self.task, "tool": "email.notify", "arguments": {"n": number}}
        iid = (await self.post("/intents", "planner", proposal))["intent_id"]
        await self.post(f"/intents/{iid}/verify", "verifier", {"verdict": "accept", "reason": "bench"})
        return str(iid)

    async def commit(self, iid: str) -> None:
        result = await self.post(f"/intents/{iid}/commit", "committer", key=iid)
        if result["status"] != "committed":
            raise RuntimeError(f"commit of {iid}: {result}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (all threads), from /proc: robust to other load."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a PostgreSQL backend that ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


@contextlib.contextmanager
def profiled(pids: list[int], folder: Path | None) -> Iterator[None]:
    """py-spy (collapsed stacks, one file per gateway) around the commit phase, if asked."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
            + ["--output", str(folder / f"commit-{pid}.txt"), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    time.sleep(1)
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(30)


def cpu_split(upstream_pid: int) -> dict[str, float]:
    """CPU seconds so far of the other parties: this load generator, the upstream, PostgreSQL
    (every `postgres` process: the server is the machine's), and the whole machine (/proc/stat)."""
    postgres = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _comm(entry) == "postgres"
    ]
    busy = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in busy[:7])
    return {
        "loadgen": time.process_time(),
        "upstream": cpu_seconds([upstream_pid]),
        **{f"postgres {pid}": cpu_seconds([pid]) for pid in postgres},
        "machine": (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"),
    }


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds between two `cpu_split`s; PostgreSQL backends that ended meanwhile are lost."""
    spent = {name: after[name] - before.get(name, 0.0) for name in after if not name.startswith("postgres ")}
    spent["postgres"] = sum(
        value - before.get(name, 0.0) for name, value in after.items() if name.startswith("postgres ")
    )
    return spent


def _comm(entry: Path) -> str:
    try:
        return (entry / "comm").read_text().strip()
    except OSError:
        return ""


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


async def run_cell(
    db: str,
    processes: int,
    intents: int,
    concurrency: int,
    folder: Path,
    profile: Path | None = None,
    db_pool: int | None = None,
    statement_pool: int | None = None,
) -> dict[str, Any]:
    pg_name = None
    if db == "postgresql":
        pg_name = await create_pg_database()
        database_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{pg_name}"
    else:
        database_url = f"sqlite+aiosqlite:///{folder}/gateway.db"
    from gateway.keys import generate_dev_keys

    keys = folder / "keys"
    generate_dev_keys(keys)
    try:
        with upstream_process() as (upstream, upstream_pid):
            config = write_config(
                folder / "gateway.toml",
                database_url=database_url,
                upstream_url=upstream,
                keys_dir=keys,
                decision_log=True,
                db_pool=db_pool,
                statement_pool=statement_pool,
            )
            gateways = [GatewayProcess(config).start() for _ in range(processes)]
            try:
                for gateway in gateways:
                    gateway.wait_ready(60)
                return await measure(
                    db,
                    processes,
                    intents,
                    concurrency,
                    gateways,
                    (upstream, upstream_pid),
                    keys,
                    config,
                    profile,
                )
            finally:
                for gateway in gateways:
                    gateway.stop()
    finally:
        if pg_name:
            await drop_pg_database(pg_name)


async def measure(
    db: str,
    processes: int,
    intents: int,
    concurrency: int,
    gateways: list[GatewayProcess],
    upstream_at: tuple[str, int],
    keys: Path,
    config: Path,
    profile: Path | None = None,
) -> dict[str, Any]:
    upstream, upstream_pid = upstream_at
    urls = [gateway.url for gateway in gateways]
    pids = [gateway.process.pid for gateway in gateways if gateway.process is not None]
    # Idle connections below uvicorn's 5 s keep-alive: never reuse one the gateway is closing.
    async with Client(limit_per_host=concurrency, idle_timeout=3, timeout=120) as client:
        driver = Driver(client, urls, Agents(keys), f"bench-{uuid.uuid4().hex[:8]}")
        await driver.commit(await driver.propose_verify(-1))  # warm up every path once

        async def whole(number: int) -> None:
            await driver.commit(await driver.propose_verify(number))

        cpu = cpu_seconds(pids)
        protocol_s, protocol_lat = await timed(concurrency, [lambda n=n: whole(n) for n in range(intents)])
        protocol_cpu = cpu_seconds(pids) - cpu
        ready: list[str] = []

        async def prepare(number: int) -> None:
            ready.append(await driver.propose_verify(number))

        await timed(concurrency, [lambda n=n: prepare(intents + n) for n in range(intents)])
        cpu, others = cpu_seconds(pids), cpu_split(upstream_pid)
        with profiled(pids, profile):
            commit_s, commit_lat = await timed(concurrency, [lambda i=i: driver.commit(i) for i in ready])
        commit_cpu = cpu_seconds(pids) - cpu
        others = cpu_spent(others, cpu_split(upstream_pid))

        direct_lat: list[float] = []
        serial_lat: list[float] = []
        for number in range(200):
            started = time.perf_counter()
            status, _ = await client.request(
                "POST", f"{upstream}/effects/email.direct", JSON, json.dumps({"n": number}).encode()
            )
            direct_lat.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"direct call: {status}")
            iid = await driver.propose_verify(10 * intents + number)
            started = time.perf_counter()
            await driver.commit(iid)
            serial_lat.append(time.perf_counter() - started)

        status, raw = await client.request("GET", f"{upstream}/_effects")
        if status != 200:
            raise RuntimeError(f"/_effects: {status} {raw!r}")
        calls = json.loads(raw)["calls"]
    expected = 2 * intents + 200 + 1
    verified = ledger_verify(config)
    return {
        "db": db,
        "processes": processes,
        "intents": intents,
        "concurrency": concurrency,
        "protocol_per_s": intents / protocol_s,
        "protocol_p50_ms": 1000 * statistics.median(protocol_lat),
        "protocol_cpu_ms": 1000 * protocol_cpu / intents,
        "commits_per_s": intents / commit_s,
        "commit_cpu_ms": 1000 * commit_cpu / intents,
        "commit_p50_ms": 1000 * statistics.median(commit_lat),
        "commit_p99_ms": 1000 * quantile(commit_lat, 0.99),
        "serial_commit_p50_ms": 1000 * statistics.median(serial_lat),
        "direct_p50_ms": 1000 * statistics.median(direct_lat),
        "added_p50_ms": 1000 * (statistics.median(serial_lat) - statistics.median(direct_lat)),
        **{f"commit_cpu_ms_{name}": 1000 * value / intents for name, value in others.items()},
        "upstream_calls_ok": calls.get("email.notify") == expected,
        "ledger_verify_ok": verified.returncode == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql"], action="append")
    parser.add_argument("--processes", type=int, action="append")
    parser.add_argument("--intents", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="300 intents per cell")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--db-pool", type=int, help="each gateway's db_pool_size and db_max_overflow (default: the gateway's)"
    )
    parser.add_argument(
        "--statement-pool",
        type=int,
        help="each gateway's db_statement_pool_size (PostgreSQL; default: the gateway's)",
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy each gateway during the commit phase (pip install py-spy)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each cell this many times (the machine's speed drifts)"
    )
    args = parser.parse_args()
    intents = 300 if args.quick else args.intents
    results = []
    cells = [(db, n) for db in args.db or ["sqlite", "postgresql"] for n in args.processes or [1, 3]]
    for db, processes in cells * max(1, args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-commits-") as folder:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                result = runner.run(
                    run_cell(
                        db,
                        processes,
                        intents,
                        args.concurrency,
                        Path(folder),
                        args.profile,
                        args.db_pool,
                        args.statement_pool,
                    )
                )
        results.append(result)
        print(
            json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}),
            flush=True,
        )
    print()
    print(f"load average at the end: {os.getloadavg()}")
    print(
        "| database | gateways | protocol intents/s (gateway CPU ms each) | commits/s (gateway CPU ms each) "
        "| commit p50 / p99 ms | serial commit p50 ms | direct call p50 ms | added p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['db']} | {r['processes']} | {r['protocol_per_s']:.0f} ({r['protocol_cpu_ms']:.1f}) "
            f"| {r['commits_per_s']:.0f} ({r['commit_cpu_ms']:.1f}) "
            f"| {r['commit_p50_ms']:.1f} / {r['commit_p99_ms']:.1f} | {r['serial_commit_p50_ms']:.1f} "
            f"| {r['direct_p50_ms']:.1f} | {r['added_p50_ms']:.1f} |"
        )
    print()
    print("CPU ms per commit in the commit phase, by process (machine: all CPU time of the machine)")
    print("| database | gateways | gateways | load generator | upstream | PostgreSQL | machine |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['db']} | {r['processes']} | {r['commit_cpu_ms']:.2f} | {r['commit_cpu_ms_loadgen']:.2f} "
            f"| {r['commit_cpu_ms_upstream']:.2f} | {r['commit_cpu_ms_postgres']:.2f} "
            f"| {r['commit_cpu_ms_machine']:.2f} |"
        )
    if args.repeat > 1:
        print()
        print("commits/s over the repeated runs of each cell")
        print("| database | gateways | runs | min | median | max |")
        print("|---|---|---|---|---|---|")
        for db, processes in cells:
            rates = [r["commits_per_s"] for r in results if (r["db"], r["processes"]) == (db, processes)]
            print(
                f"| {db} | {processes} | {len(rates)} | {min(rates):.0f} | {statistics.median(rates):.0f} "
                f"| {max(rates):.0f} |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
