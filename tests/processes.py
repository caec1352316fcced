"""Real gateway processes (`python -m gateway serve`) on loopback, for multi-process tests and benches."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.servers import free_port

REPO = Path(__file__).resolve().parent.parent


def write_config(
    path: Path,
    *,
    database_url: str,
    upstream_url: str,
    keys_dir: Path,
    read_timeout: float = 10.0,
    decision_log: bool = False,
    db_pool: int | None = None,
    statement_pool: int | None = None,
) -> Path:
    """A gateway.toml with the schemaless demo tools on `upstream_url`."""
    log = f'"{path.parent / "decisions.jsonl"}"' if decision_log else '""'  # "" turns the log off
    tools = "".join(
        f'\n[[tools]]\nname = "{name}"\nupstream = "{upstream_url}/effects/{name}"\neffect = "write"\n'
        for name in ("email.notify", "email.reserve", "email.release")
    )
    path.write_text(
        f'[gateway]\ndatabase = "{database_url}"\nkeys_dir = "{keys_dir}"\ndecision_log = {log}\n'
        + (f"db_pool_size = {db_pool}\ndb_max_overflow = {db_pool}\n" if db_pool else "")
        + (f"db_statement_pool_size = {statement_pool}\n" if statement_pool else "")
        + f"[gateway.timeouts]\nconnect = 2.0\nread = {read_timeout}\n"
        f'[policy]\ndir = "{REPO / "policies"}"\nreload = false\n{tools}',
        encoding="utf-8",
    )
    return path


def environment() -> dict[str, str]:
    # The checkout first on the path: the editable install may map `gateway` as a namespace.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


class GatewayProcess:
    def __init__(self, config: Path, port: int | None = None) -> None:
        self.config = config
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = config.parent / f"gateway-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        env = environment()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(self.config),
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                cwd=self.config.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gateway on {self.url} not ready:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def gateways(config: Path, count: int) -> Iterator[list[GatewayProcess]]:
    started = [GatewayProcess(config).start() for _ in range(count)]
    try:
        for process in started:
            process.wait_ready()
        yield started
    finally:
        for process in started:
            process.stop()


def ledger_verify(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "ledger", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=config.parent,
    )
