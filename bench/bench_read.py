"""Read-path benchmark (issue 2): what the gateway costs on a direct read call.

    python bench/bench_read.py                 # 5 s per cell, 1 and 32 connections
    python bench/bench_read.py --quick         # 2 s per cell
    python bench/bench_read.py --repeat 3      # median of 3 runs per cell
    python bench/bench_read.py --floor         # also the gateway's /healthz (uvicorn + Starlette alone)
    python bench/bench_read.py --profile out/  # then py-spy the gateway at 32 connections

Three servers, one process each, driven over HTTP/1.1 keep-alive on 127.0.0.1:

    direct       the tool upstream itself            GET /search?q=gateway
    passthrough  aiohttp server + aiohttp client     GET /search?q=gateway -> upstream
    gateway      `python -m gateway serve` (uvicorn) GET /tools/docs.search?q=gateway
                 role JWT verified, policy on the embedded regopy engine, forwarded
                 with the gateway's aiohttp session, decision log written

at 1 and 32 concurrent connections. The load generator is `wrk` (one thread, its
own process) when installed, else an aiohttp client in its own process (slower:
it may become the bottleneck of the direct cell, and says so).

Targets (issue 2): at 32 connections the gateway keeps >= 50 % of the
pass-through's requests per second; at 1 connection it adds <= 1 ms at p50 over
the direct call. The exit status is 0 whatever the outcome: this is a
measurement, not a test. Besides req/s, p50 and p99, each cell reports the CPU
the measured server process (all its threads) spent per request, a figure that
other load on the machine disturbs much less than throughput.

Everything runs from a fresh temporary folder: dev keys, a worker role JWT
(1 h), a SQLite database, the decision log, and a configuration whose
`docs.search` points at the bench upstream; the policy is the repository's
policies/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HOST = "127.0.0.1"
QUERY = "q=gateway"
MARK = "BENCHJSON "

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"mean_us":%.1f,"max_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# --------------------------------------------------------------------------- results


@dataclass
class Cell:
    target: str
    conns: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float  # CPU of the measured server process (all threads) per request
    requests: int
    errors: int
    runs: list[dict[str, Any]] = field(default_factory=list)


def median_cell(target: str, conns: int, runs: list[dict[str, Any]]) -> Cell:
    return Cell(
        target=target,
        conns=conns,
        rps=statistics.median(run["rps"] for run in runs),
        p50_ms=statistics.median(run["p50_ms"] for run in runs),
        p99_ms=statistics.median(run["p99_ms"] for run in runs),
        cpu_ms=statistics.median(run["cpu_ms"] for run in runs),
        requests=sum(run["requests"] for run in runs),
        errors=sum(run["errors"] for run in runs),
        runs=runs,
    )


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_env(extra_path: str | None) -> dict[str, str]:
    """The environment of every child: no proxy variables, no inherited gateway config."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in {"http_proxy", "https_proxy", "all_proxy"}}
    env.pop("AGENT_GATEWAY_CONFIG", None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH", "")) if p)
    return env


class Server:
    """One server process, its log in the work folder, stopped with SIGTERM."""

    def __init__(
        self, name: str, argv: list[str], port: int, ready_path: str, workdir: Path, env: dict[str, str]
    ):
        self.name, self.argv, self.port, self.ready_path, self.env = name, argv, port, ready_path, env
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.base + self.ready_path, timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.name} not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and all its threads so far (Linux /proc)."""
        assert self.proc is not None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# --------------------------------------------------------------------------- setup


def prepare(workdir: Path, upstream_base: str) -> str:
    """Dev keys and the configuration in `workdir`; returns a worker role JWT (1 h)."""
    sys.path.insert(0, str(REPO))
    from gateway.identity import DEV_ISSUER, mint_role_token
    from gateway.keys import generate_dev_keys, load_private_key

    keys = workdir / "keys"
    generate_dev_keys(keys)
    token = mint_role_token(
        load_private_key(keys / "issuer.key.pem"),
        iss=DEV_ISSUER,
        sub="bench-worker",
        role="worker",
        audience="agent-gateway",
        ttl=3600,
    )
    config = f"""\
[gateway]
audience = "agent-gateway"
database = "sqlite+aiosqlite:///{workdir / "gateway.db"}"
keys_dir = "{keys}"
var_dir = "{workdir / "var"}"
decision_log = "{workdir / "decisions.jsonl"}"
signing_key = "{keys / "gateway.key.pem"}"

[policy]
engine = "embedded"
dir = "{REPO / "policies"}"

[[tools]]
name = "docs.search"
upstream = "{upstream_base}/search"
effect = "read"
risk = "low"
"""
    (workdir / "gateway.toml").write_text(config, encoding="utf-8")
    return token


def smoke(
    url: str, headers: dict[str, str], *, expect_json: bool = True, expect_header: str | None = None
) -> None:
    """One request before measuring: a bench of 401s or 404s would measure nothing."""
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        raw = response.read()
        if response.status != 200 or (expect_json and "results" not in json.loads(raw)):
            raise SystemExit(f"smoke check failed for {url}: {response.status} {raw[:200]!r}")
        if expect_header and not response.headers.get(expect_header):
            raise SystemExit(f"smoke check failed for {url}: no {expect_header} header")


# --------------------------------------------------------------------------- load generators


def run_wrk(url: str, conns: int, seconds: float, headers: dict[str, str], script: Path) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            raw = json.loads(line[len(MARK) :])
            return {
                "rps": raw["requests"] / (raw["duration_us"] / 1e6),
                "p50_ms": raw["p50_us"] / 1000,
                "p90_ms": raw["p90_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000,
                "mean_ms": raw["mean_us"] / 1000,
                "max_ms": raw["max_us"] / 1000,
                "requests": raw["requests"],
                "errors": sum(raw["errors"].values()),
            }
    raise SystemExit(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")


def run_aiohttp_loadgen(
    url: str, conns: int, seconds: float, headers: dict[str, str], env: dict[str, str]
) -> dict[str, Any]:
    argv = [
        sys.executable,
        __file__,
        "_loadgen",
        "--url",
        url,
        "--conns",
        str(conns),
        "--duration",
        str(seconds),
    ]
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, env=env, check=False)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK) :]))
    raise SystemExit(f"load generator failed ({out.returncode}): {out.stdout}\n{out.stderr}")


async def _loadgen(url: str, conns: int, seconds: float, headers: dict[str, str]) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns), headers=headers) as session:

        async def worker() -> None:
            nonlocal errors
            while (started := time.perf_counter()) < stop_at:
                try:
                    async with session.get(url) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
        "requests": len(latencies),
        "errors": errors,
    }


def loadgen_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--conns", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args(argv)
    headers = dict(header.split(": ", 1) for header in args.header)
    print(MARK + json.dumps(asyncio.run(_loadgen(args.url, args.conns, args.duration, headers))))


# --------------------------------------------------------------------------- profiling


def summarize_profile(raw_file: Path, top: int = 30, thread: str | None = None) -> str:
    """Top frames by inclusive and self share of py-spy's samples (collapsed stacks)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw_file.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if thread is not None and thread not in frames[0]:
            continue
        count = int(count_text)
        total += count
        for frame in set(frames[1:] if frames[0].startswith("thread (") else frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return "no samples\n"

    def table(counter: Counter[str]) -> str:
        return "".join(f"  {100 * n / total:5.1f} %  {frame}\n" for frame, n in counter.most_common(top))

    scope = f"thread {thread}" if thread else "all threads"
    return (
        f"{total} samples ({scope}, idle excluded)\n\ninclusive (frame anywhere on the stack):\n"
        + table(inclusive)
        + "\nself (frame at the top of the stack):\n"
        + table(own)
    )


def profile_gateway(pid: int, load: Callable[[float], dict[str, Any]], seconds: float, outdir: Path) -> None:
    """py-spy the gateway under load (a separate run: its figures are not the table's)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return
    outdir.mkdir(parents=True, exist_ok=True)
    raw_file = outdir / "gateway-32conns.txt"  # collapsed stacks, for flamegraph.pl or speedscope
    duration = max(2, round(seconds))
    spy_proc = subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(duration),
            "-r",
            "200",
            "--threads",
            "--nonblocking",
            "-f",
            "raw",
            "-o",
            str(raw_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    result = load(duration + 1)
    spy_proc.wait(timeout=duration + 60)
    if not raw_file.exists():
        print("py-spy wrote nothing (ptrace not permitted?)", file=sys.stderr)
        return
    summary = summarize_profile(raw_file) + "\n" + summarize_profile(raw_file, thread="MainThread")
    (outdir / "gateway-32conns-summary.txt").write_text(summary, encoding="utf-8")
    print(f"\nprofile of the gateway at 32 connections ({result['rps']:.0f} req/s under py-spy) -> {outdir}")
    print(summary)


# --------------------------------------------------------------------------- main


def environment(extra_path: str | None, loadgen: str) -> dict[str, Any]:
    probe = (
        "import importlib.util as u, aiohttp, uvicorn, starlette;"
        "print(u.find_spec('uvloop') is not None, u.find_spec('httptools') is not None,"
        " aiohttp.__version__, uvicorn.__version__, starlette.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=clean_env(extra_path), check=True
    ).stdout.split()
    generator = "aiohttp client (own process)"
    if loadgen == "wrk":
        version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        generator = (version.stdout or version.stderr).splitlines()[0].split(" Copyright")[0].strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "uvloop": out[0] == "True",
        "httptools": out[1] == "True",
        "aiohttp": out[2],
        "uvicorn": out[3],
        "starlette": out[4],
        "loadgen": generator,
        "loadavg_start": round(os.getloadavg()[0], 2),
    }


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gateway read-path benchmark (issue 2).")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell (default 5)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each cell (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="2 s per cell")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell, medians reported (default 1)")
    parser.add_argument("--conns", default="1,32", help="comma-separated connection counts (default 1,32)")
    parser.add_argument("--floor", action="store_true", help="also measure the gateway's /healthz")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument(
        "--python-path",
        help="prepended to the servers' PYTHONPATH, e.g. a folder holding uvloop and httptools "
        "(pip install --target DIR uvloop httptools) to measure uvicorn[standard] without installing it",
    )
    parser.add_argument(
        "--profile", type=Path, help="afterwards, py-spy the gateway at 32 conns into this folder"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (server logs, decision log)"
    )
    args = parser.parse_args()
    if args.quick:
        args.duration = 2.0
    return args


def main() -> None:
    args = parse_args()
    conns_list = [int(c) for c in args.conns.split(",")]
    loadgen = args.loadgen if args.loadgen != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")
    if loadgen == "aiohttp":
        print("note: no wrk; the aiohttp load generator may itself be the bottleneck", file=sys.stderr)
    # SIGTERM ends the run like Ctrl-C: the finally below stops every server it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    env = clean_env(args.python_path)
    info = environment(args.python_path, loadgen)
    workdir = Path(tempfile.mkdtemp(prefix="agw-bench-"))
    script = workdir / "report.lua"
    script.write_text(WRK_SCRIPT, encoding="utf-8")
    python = sys.executable

    up_port, pt_port, gw_port = free_port(), free_port(), free_port()
    upstream = Server(
        "upstream",
        [python, str(BENCH / "upstream.py"), "--port", str(up_port)],
        up_port,
        "/healthz",
        workdir,
        env,
    )
    token = prepare(workdir, upstream.base)
    passthrough = Server(
        "passthrough",
        [python, str(BENCH / "passthrough.py"), "--port", str(pt_port), "--upstream", upstream.base],
        pt_port,
        "/healthz",
        workdir,
        env,
    )
    gateway = Server(
        "gateway",
        [
            python,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(workdir / "gateway.toml"),
            "--host",
            HOST,
            "--port",
            str(gw_port),
            "--log-level",
            "warning",
        ],
        gw_port,
        "/readyz",
        workdir,
        env,
    )
    servers = [upstream, passthrough, gateway]
    auth = {"Authorization": f"Bearer {token}"}
    # target -> (URL, headers, the process whose CPU is charged to it)
    targets: dict[str, tuple[str, dict[str, str], Server]] = {
        "direct": (f"{upstream.base}/search?{QUERY}", {}, upstream),
        "passthrough": (f"{passthrough.base}/search?{QUERY}", {}, passthrough),
        "gateway": (f"{gateway.base}/tools/docs.search?{QUERY}", auth, gateway),
    }
    if args.floor:
        targets["gateway /healthz"] = (f"{gateway.base}/healthz", {}, gateway)

    def load(target: str, conns: int, seconds: float) -> dict[str, Any]:
        url, headers, server = targets[target]
        before = server.cpu_seconds()
        if loadgen == "wrk":
            result = run_wrk(url, conns, seconds, headers, script)
        else:
            result = run_aiohttp_loadgen(url, conns, seconds, headers, env)
        result["cpu_ms"] = 1000 * (server.cpu_seconds() - before) / max(1, result["requests"])
        return result

    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        smoke(targets["direct"][0], {})
        smoke(targets["passthrough"][0], {})
        smoke(targets["gateway"][0], auth, expect_header="Gateway-Decision-Id")
        print(
            f"bench: {info['cpus']} CPUs, Python {info['python']}, uvicorn {info['uvicorn']} "
            f"(uvloop {yes_no(info['uvloop'])}, httptools {yes_no(info['httptools'])}), "
            f"aiohttp {info['aiohttp']}, starlette {info['starlette']}, load generator {info['loadgen']}"
        )
        print(
            f"       {args.duration:g} s per cell after {args.warmup:g} s warm-up, "
            f"{args.repeat} run(s) per cell, load average {info['loadavg_start']:.2f} at start\n"
        )
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for _ in range(args.repeat):
            for conns in conns_list:
                for target in targets:
                    if args.warmup > 0:
                        load(target, conns, args.warmup)
                    result = load(target, conns, args.duration)
                    runs.setdefault((target, conns), []).append(result)
                    print(
                        f"  {target:<17} {conns:>3} conns {result['rps']:>8.0f} req/s"
                        f"  p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms"
                        f"  cpu {result['cpu_ms']:5.2f} ms/req  errors {result['errors']}"
                    )
        info["loadavg_end"] = round(os.getloadavg()[0], 2)
        cells = [
            median_cell(target, conns, runs[(target, conns)]) for conns in conns_list for target in targets
        ]
        report(cells, info)
        if args.profile:
            profile_gateway(
                gateway.proc.pid, lambda s: load("gateway", max(conns_list), s), args.duration, args.profile
            )  # type: ignore[union-attr]
        gateway.stop()
        decisions = workdir / "decisions.jsonl"
        if decisions.exists():
            with decisions.open(encoding="utf-8") as file:
                print(f"decision log: {sum(1 for _ in file)} lines written")
        if args.json:
            args.json.write_text(
                json.dumps({"environment": info, "cells": [asdict(c) for c in cells]}, indent=2)
            )
    finally:
        for server in reversed(servers):
            server.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(cells: list[Cell], info: dict[str, Any]) -> None:
    by = {(c.target, c.conns): c for c in cells}
    print("\n| target | conns | req/s | p50 ms | p99 ms | server CPU ms/req | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        print(
            f"| {c.target} | {c.conns} | {c.rps:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} "
            f"| {c.cpu_ms:.2f} | {c.errors} |"
        )
    print(f"\nload average {info['loadavg_start']:.2f} at start, {info['loadavg_end']:.2f} at end")
    if ("gateway", 32) in by and ("passthrough", 32) in by:
        ratio = by[("gateway", 32)].rps / by[("passthrough", 32)].rps
        verdict = "met" if ratio >= 0.5 else "MISSED"
        print(f"gateway / passthrough req/s at 32 conns: {ratio:7.1%}   (target >= 50 %: {verdict})")
    if ("gateway", 1) in by and ("direct", 1) in by:
        added = by[("gateway", 1)].p50_ms - by[("direct", 1)].p50_ms
        verdict = "met" if added <= 1.0 else "MISSED"
        print(f"gateway p50 - direct p50 at 1 conn:      {added:+7.2f} ms (target <= 1 ms: {verdict})")
    if ("passthrough", 1) in by and ("direct", 1) in by:
        added = by[("passthrough", 1)].p50_ms - by[("direct", 1)].p50_ms
        print(f"passthrough p50 - direct p50 at 1 conn:  {added:+7.2f} ms (for comparison)")
    if any(c.errors for c in cells):
        print("WARNING: some requests failed (non-2xx, timeouts or socket errors): see the errors column")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        loadgen_main(sys.argv[2:])
    else:
        main()
