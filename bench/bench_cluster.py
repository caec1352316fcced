"""Scale-out benchmark (issue 10): three replicas behind nginx against one replica alone,
and what a rate limit adds to a call.

    python bench/bench_cluster.py              # 5 s read cells, 300 commits per cell
    python bench/bench_cluster.py --quick      # 2 s read cells, 100 commits per cell

Cells, all on 127.0.0.1:

    reads     GET /tools/docs.search with wrk (32 connections): through nginx to the
              three replicas, then straight to replica 1
    commits   N intents proposed and verified first, then only their commits, C at a
              time (aiohttp, this process): through nginx, then to replica 1 alone
    limiter   RateLimiter.count() in this process, timed with perf_counter: the p50 a
              matching limit adds to a call, in memory and through Redis, for the
              fixed and the moving window; then, in the cluster, the gateway's own
              agent_gateway_stage_seconds{stage="rate_limit"} at 32 connections, and at
              one connection on replica 1 a limited tool against the same tool without one

The cluster is `deploy/local/cluster up --replicas 3` on a fresh PostgreSQL
database, with `[gateway] redis_url` set and a limit (a very large rate, so that
nothing is refused) on docs.search: every read call in the read cells pays the
Redis round trips (`--strategy` picks the window; fixed by default). The tool
upstream is the demo upstream in its own uvicorn process. The exit status is 0
whatever the figures: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bench.bench_commits import Driver, cpu_seconds, timed, upstream_process  # noqa: E402
from bench.bench_read import WRK_SCRIPT, run_wrk  # noqa: E402
from tests.conftest import drop_pg_database, role_token  # noqa: E402
from tests.protocol import Agents  # noqa: E402
from tests.test_production_cluster import free_port_block  # noqa: E402

CLUSTER = REPO / "deploy" / "local" / "cluster"


def cluster(*args: str, state: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(CLUSTER), *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"cluster {args[0]} failed: {done.stdout}\n{done.stderr}")


def write_config(folder: Path, database: str, upstream: str, strategy: str) -> Path:
    path = folder / "gateway.toml"
    path.write_text(
        f"""
[gateway]
database = "postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
keys_dir = "{folder / "keys"}"
decision_log = "{folder / "decisions.jsonl"}"
redis_url = "redis://127.0.0.1:6379/0"
drain_seconds = 0
[policy]
dir = "{REPO / "policies"}"
reload = false
[rate_limits]
strategy = "{strategy}"
key_prefix = "agw-bench-{uuid.uuid4().hex[:8]}"
[[limits]]
name = "bench"
match = {{tool = "docs.search"}}
rate = "100000000/hour"
[[tools]]
name = "docs.search"
upstream = "{upstream}/search"
[[tools]]
name = "docs.free"
upstream = "{upstream}/search"
[[tools]]
name = "email.notify"
upstream = "{upstream}/effects/email.notify"
effect = "write"
"""
    )
    return path


def read_cell(
    url: str,
    token: str,
    seconds: float,
    pids: list[int],
    script: Path,
    *,
    conns: int = 32,
    tool: str = "docs.search",
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    run_wrk(f"{url}/tools/{tool}?q=bench", 8, 1, headers, script)  # warm-up
    cpu = cpu_seconds(pids)
    result = run_wrk(f"{url}/tools/{tool}?q=bench", conns, seconds, headers, script)
    result["cpu_ms"] = 1000 * (cpu_seconds(pids) - cpu) / max(1, result["requests"])
    return result


async def commit_cell(
    url: str, keys: Path, intents: int, concurrency: int, pids: list[int]
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        driver = Driver(session, [url], Agents(keys), f"bench-{uuid.uuid4().hex[:8]}")
        ready: list[str] = []

        async def prepare(number: int) -> None:
            ready.append(await driver.propose_verify(number))

        await timed(concurrency, [lambda n=n: prepare(n) for n in range(intents)])
        cpu = cpu_seconds(pids)
        seconds, latencies = await timed(concurrency, [lambda i=i: driver.commit(i) for i in ready])
        return {
            "commits_per_s": intents / seconds,
            "p50_ms": 1000 * statistics.median(latencies),
            "cpu_ms": 1000 * (cpu_seconds(pids) - cpu) / intents,
        }


async def limiter_cell(storage: str, strategy: str, calls: int) -> dict[str, Any]:
    from gateway.config import parse_config
    from gateway.ratelimits import RateLimiter

    config = parse_config(
        {
            "limits": [{"match": {"tool": "docs.*"}, "rate": "100000000/hour"}],
            "rate_limits": {
                "storage": storage,
                "strategy": strategy,
                "key_prefix": f"agw-micro-{uuid.uuid4().hex}",
            },
        }
    )
    limiter = RateLimiter(config)
    await limiter.start()
    timings = []
    for n in range(calls + 200):
        started = time.perf_counter()
        await limiter.count(f"agent-{n % 50}", "worker", "docs.search")
        if n >= 200:  # after a warm-up
            timings.append(time.perf_counter() - started)
    unmatched = []
    for _ in range(calls):
        started = time.perf_counter()
        await limiter.count("agent", "worker", "email.send")
        unmatched.append(time.perf_counter() - started)
    await limiter.stop()
    timings.sort()
    return {
        "storage": storage,
        "strategy": strategy,
        "p50_ms": 1000 * timings[len(timings) // 2],
        "p99_ms": 1000 * timings[int(len(timings) * 0.99)],
        "unmatched_p50_ms": 1000 * statistics.median(unmatched),
    }


def stage_buckets(urls: list[str], stage: str) -> dict[float, float]:
    """The replicas' cumulative histogram buckets of one stage, summed."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for url in urls:
        text = subprocess.run(
            ["curl", "-s", f"{url}/metrics"], capture_output=True, text=True, check=False
        ).stdout
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "agent_gateway_stage_seconds_bucket" and sample.labels["stage"] == stage:
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def bucket_p50(buckets: dict[float, float]) -> float | None:
    """The median from cumulative buckets, interpolated inside its bucket."""
    if not buckets or buckets[float("inf")] == 0:
        return None
    half, previous_bound, previous_count = buckets[float("inf")] / 2, 0.0, 0.0
    for bound in sorted(buckets):
        if buckets[bound] >= half:
            if bound == float("inf"):
                return previous_bound
            share = (half - previous_count) / max(buckets[bound] - previous_count, 1e-9)
            return previous_bound + share * (bound - previous_bound)
        previous_bound, previous_count = bound, buckets[bound]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s read cells, 100 commits")
    parser.add_argument("--concurrency", type=int, default=16, help="commits in flight")
    parser.add_argument(
        "--strategy", default="fixed-window", choices=["fixed-window", "moving-window"], help="in the cluster"
    )
    args = parser.parse_args()
    seconds, intents = (2.0, 100) if args.quick else (5.0, 300)
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "strategy": args.strategy}

    for storage in ("memory", "redis://127.0.0.1:6379/0"):
        for strategy in ("moving-window", "fixed-window"):
            cell = asyncio.run(limiter_cell(storage, strategy, 3000))
            results.setdefault("limiter", []).append(cell)

    with tempfile.TemporaryDirectory(prefix="agw-bench-cluster-") as raw:
        folder = Path(raw)
        database = f"agw_bench_{uuid.uuid4().hex[:10]}"
        script = folder / "report.lua"
        script.write_text(WRK_SCRIPT)
        state = folder / "state"
        with upstream_process() as upstream:
            config = write_config(folder, database, upstream, args.strategy)
            port = free_port_block(4)
            cluster("up", "--replicas", "3", "--config", str(config), "--port", str(port), state=state)
            try:
                replicas = json.loads((state / "state.json").read_text())["replicas"]
                pids = [replica["pid"] for replica in replicas]
                balancer = f"http://127.0.0.1:{port}"
                alone = f"http://127.0.0.1:{replicas[0]['port']}"
                token = role_token(folder / "keys", "worker", ttl=3600)
                results["reads"] = {
                    "nginx + 3 replicas": read_cell(balancer, token, seconds, pids, script),
                    "1 replica": read_cell(alone, token, seconds, pids[:1], script),
                }
                urls = [f"http://127.0.0.1:{replica['port']}" for replica in replicas]
                p50 = bucket_p50(stage_buckets(urls, "rate_limit"))
                results["rate_limit_stage_p50_ms"] = None if p50 is None else 1000 * p50
                # One connection on one replica: a limited tool against the same tool without a limit.
                before = stage_buckets(urls[:1], "rate_limit")
                limited = read_cell(alone, token, seconds, pids[:1], script, conns=1)
                after = stage_buckets(urls[:1], "rate_limit")
                free = read_cell(alone, token, seconds, pids[:1], script, conns=1, tool="docs.free")
                p50 = bucket_p50({bound: after[bound] - before.get(bound, 0.0) for bound in after})
                results["one_connection"] = {
                    "limited_p50_ms": limited["p50_ms"],
                    "free_p50_ms": free["p50_ms"],
                    "rate_limit_stage_p50_ms": None if p50 is None else 1000 * p50,
                }
                results["commits"] = {
                    "nginx + 3 replicas": asyncio.run(
                        commit_cell(balancer, folder / "keys", intents, args.concurrency, pids)
                    ),
                    "1 replica": asyncio.run(
                        commit_cell(alone, folder / "keys", intents, args.concurrency, pids[:1])
                    ),
                }
            finally:
                cluster("down", state=state)
                asyncio.run(drop_pg_database(database))
    results["load_after"] = os.getloadavg()[0]
    report(results)


def report(results: dict[str, Any]) -> None:
    print(f"load average {results['load_before']:.1f} -> {results['load_after']:.1f}")
    print("\nreads, wrk 32 connections:")
    print(f"{'target':<20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11} {'errors':>7}")
    for name, cell in results["reads"].items():
        print(
            f"{name:<20} {cell['rps']:>8.0f} {cell['p50_ms']:>8.2f} {cell['p99_ms']:>8.2f} "
            f"{cell['cpu_ms']:>11.2f} {cell['errors']:>7}"
        )
    print("\ncommits (prepared intents, 16 in flight):")
    print(f"{'target':<20} {'commits/s':>10} {'p50 ms':>8} {'CPU ms/commit':>14}")
    for name, cell in results["commits"].items():
        print(f"{name:<20} {cell['commits_per_s']:>10.1f} {cell['p50_ms']:>8.1f} {cell['cpu_ms']:>14.2f}")
    print("\nrate limiter, RateLimiter.count() for one matching limit (3000 calls):")
    print(f"{'storage':<26} {'strategy':<14} {'p50 ms':>8} {'p99 ms':>8} {'no match p50 ms':>16}")
    for cell in results["limiter"]:
        print(
            f"{cell['storage']:<26} {cell['strategy']:<14} {cell['p50_ms']:>8.3f} {cell['p99_ms']:>8.3f} "
            f"{cell['unmatched_p50_ms']:>16.4f}"
        )
    stage = results.get("rate_limit_stage_p50_ms")
    if stage is not None:
        print(f"\nrate_limit stage p50 at 32 connections (Redis, {results['strategy']}): {stage:.3f} ms")
    one = results["one_connection"]
    print(
        f"one connection, replica 1: docs.search (limited) p50 {one['limited_p50_ms']:.2f} ms, "
        f"docs.free (no limit) p50 {one['free_p50_ms']:.2f} ms, "
        f"rate_limit stage p50 {one['rate_limit_stage_p50_ms'] or 0:.3f} ms"
    )
    print("\nBENCHJSON " + json.dumps(results))


if __name__ == "__main__":
    main()
