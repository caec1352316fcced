"""What the eval runs against when no URL is given: a fresh gateway and tool upstream in-process.

Both are real uvicorn servers on loopback ports, each in its own thread, so the
eval's HTTP calls cross real sockets; the gateway runs on a temporary SQLite
database with the shipped policies and dev keys generated into a temporary folder.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from gateway.config import parse_config

POLICIES = Path(__file__).resolve().parent.parent.parent / "policies"
# Dev agent keys beyond the defaults: `committer` signs its own handoff in the escalation suite.
AGENTS = ("planner", "worker", "verifier", "committer", "approver")


def tools(upstream_url: str) -> list[dict[str, Any]]:
    """The eval's tools, all on the counting upstream; names match the shipped policy's roles."""
    return [
        {"name": "email.notify", "upstream": f"{upstream_url}/effects/email.notify", "effect": "write"},
        {
            "name": "email.reserve",
            "upstream": f"{upstream_url}/effects/email.reserve",
            "effect": "write",
            "compensation": "email.release",
        },
        {"name": "email.release", "upstream": f"{upstream_url}/effects/email.release", "effect": "write"},
        {
            "name": "payments.transfer",
            "upstream": f"{upstream_url}/effects/payments.transfer",
            "effect": "irreversible",
            "risk": "high",
        },
    ]


def config_toml(*, database: str, upstream_url: str, keys_dir: Path, decision_log: Path | None = None) -> str:
    """A gateway.toml for running `agent-gateway serve` replicas the eval can drive (`--url`)."""
    lines = [
        "[gateway]",
        f'database = "{database}"',
        f'keys_dir = "{keys_dir}"',
        f'decision_log = "{decision_log or ""}"',
        "[gateway.timeouts]",
        "connect = 2.0",
        "read = 10.0",
        "[policy]",
        f'dir = "{POLICIES}"',
        "reload = false",
    ]
    for tool in tools(upstream_url):
        lines.append("[[tools]]")
        lines += [f'{name} = "{value}"' for name, value in tool.items()]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve `app` on a free loopback port in a thread until the block ends."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True, name=f"eval-server-{port}")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("an eval server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@dataclass
class Target:
    urls: list[str]
    upstream_url: str
    keys_dir: Path
    decision_log: Path | None


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    from gateway.demo.upstream import create_upstream

    with serve(create_upstream()) as url:
        yield url


@contextlib.contextmanager
def in_process() -> Iterator[Target]:
    """A fresh gateway on SQLite plus its tool upstream; everything removed afterwards."""
    from gateway.app import create_app
    from gateway.keys import generate_dev_keys

    with tempfile.TemporaryDirectory(prefix="agw-eval-") as folder, upstream() as upstream_url:
        root = Path(folder)
        keys = root / "keys"
        generate_dev_keys(keys, AGENTS)
        decision_log = root / "decisions.jsonl"
        config = parse_config(
            {
                "gateway": {
                    "database": f"sqlite+aiosqlite:///{root / 'gateway.db'}",
                    "keys_dir": str(keys),
                    "var_dir": str(root / "var"),
                    "signing_key": str(keys / "gateway.key.pem"),
                    "decision_log": str(decision_log),
                    "timeouts": {"connect": 2.0, "read": 10.0},
                },
                "policy": {"dir": str(POLICIES)},
                "tools": tools(upstream_url),
            },
            base_dir=root,
        )
        with serve(create_app(config)) as url:
            yield Target([url], upstream_url, keys, decision_log)
