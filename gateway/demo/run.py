"""`agent-gateway demo`: the demo tool upstream and the gateway on loopback, then the story.

Configuration: `--config` (or AGENT_GATEWAY_CONFIG), else `gateway.toml` in the current
folder, else the packaged defaults: the source checkout's `gateway.toml`, with its
policies and schemas, but the database, keys and decision log under the current
folder. Tool upstreams at the demo address (127.0.0.1:9001) follow `--upstream-port`.
The demo mints dev tokens, so it needs the dev issuer (no `[[issuers]]`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import click
import httpx
import uvicorn

import gateway
from gateway.config import CONFIG_ENV, DEFAULT_CONFIG, Config, ConfigError, load_config, parse_config
from gateway.demo.story import ORCHESTRATOR, Outcome, Story
from gateway.keys import DEV_AGENTS, generate_dev_keys

DEMO_UPSTREAM = "http://127.0.0.1:9001"
APPROVER = "alice"  # the local human the demo signs in to the approvals page
HOST = "127.0.0.1"


def packaged_defaults(cwd: Path) -> Config:
    source = Path(gateway.__file__).resolve().parent.parent / DEFAULT_CONFIG
    if not source.is_file():
        raise ConfigError(
            f"no {DEFAULT_CONFIG} here and no packaged defaults next to the installed package; "
            "run the demo from a checkout of agent-gateway or pass --config"
        )
    data = tomllib.loads(source.read_text(encoding="utf-8"))
    section = data.setdefault("gateway", {})
    section["database"] = f"sqlite+aiosqlite:///{cwd / 'var' / 'gateway.db'}"
    section["keys_dir"] = str(cwd / "keys")
    section["decision_log"] = str(cwd / "var" / "decisions.jsonl")
    return parse_config(data, source.parent)


def demo_config(config_path: str | None, upstream_url: str) -> Config:
    explicit = config_path or os.environ.get(CONFIG_ENV)
    local = Path(DEFAULT_CONFIG)
    config = load_config(explicit or local) if explicit or local.exists() else packaged_defaults(Path.cwd())
    if config.issuers:
        raise ConfigError("the demo mints dev tokens; use a configuration without [[issuers]]")
    data = config.model_dump(exclude_defaults=True, exclude={"base_dir"})
    for tool in data.get("tools", []):
        if tool["upstream"].startswith(DEMO_UPSTREAM + "/"):
            tool["upstream"] = upstream_url + tool["upstream"][len(DEMO_UPSTREAM) :]
    return parse_config(data, config.base_dir)


def ensure_free(port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            raise click.ClickException(f"port {port} on {HOST} is in use; choose another") from None


@contextlib.contextmanager
def serving(app: Any, port: int, name: str) -> Iterator[uvicorn.Server]:
    """uvicorn in a thread (it installs no signal handlers there); stopped when the block ends."""
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise click.ClickException(f"the {name} did not start on {HOST}:{port}")
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _footer(outcome: Outcome, gateway_url: str, port: int, token: str) -> None:
    echo = click.echo
    echo("")
    if not outcome.ok:
        failed = sum(1 for _, ok in outcome.steps if not ok)
        echo(click.style(f"{failed} step(s) did not go as expected.", fg="red", bold=True))
        return
    echo(click.style("Every step went as expected.", fg="green", bold=True))
    if outcome.approval_id is None:
        return
    url_flag = "" if port == 8080 else f" --url {gateway_url}"
    echo("")
    echo(click.style("The transfer waits for a human. Decide it:", bold=True))
    echo(f"  page    {gateway_url}/ui/approvals")
    echo(f"  token   {token}")
    echo(f"          (an approver token for {APPROVER!r}: paste it on the sign-in page; valid 1 h)")
    command = f"agent-gateway approvals {{}} {outcome.approval_id} --as {APPROVER}{url_flag} --reason"
    echo(f"  or run  {command.format('approve')} 'looks right'")
    echo(f"  or run  {command.format('deny')} 'not this one'")


def run_demo(config_path: str | None, port: int, upstream_port: int, exit_after_story: bool) -> bool:
    from gateway.app import create_app
    from gateway.demo.upstream import create_upstream
    from gateway.identity import DEV_ISSUER, mint_role_token
    from gateway.keys import load_private_key

    upstream_url, gateway_url = f"http://{HOST}:{upstream_port}", f"http://{HOST}:{port}"
    config = demo_config(config_path, upstream_url)
    keys_dir = config.path(config.gateway.keys_dir)
    generate_dev_keys(keys_dir, (*DEV_AGENTS, ORCHESTRATOR))
    for number in (upstream_port, port):
        ensure_free(number)
    _stop_on_sigterm()
    click.echo(
        f"demo tool upstream on {upstream_url}, gateway on {gateway_url} (database {config.database_url})"
    )
    with (
        serving(create_upstream(), upstream_port, "demo upstream"),
        serving(create_app(config), port, "gateway"),
    ):
        ready = httpx.get(f"{gateway_url}/readyz", timeout=10.0)
        if ready.status_code != 200:
            raise click.ClickException(f"the gateway is not ready: {ready.text}")
        click.echo("")
        outcome = Story(
            gateway_url, upstream_url, keys_dir, audience=config.gateway.audience, echo=click.echo
        ).run()
        token = mint_role_token(
            load_private_key(keys_dir / "issuer.key.pem"),
            iss=DEV_ISSUER,
            sub=APPROVER,
            role="approver",
            audience=config.gateway.audience,
            ttl=3600,
        )
        _footer(outcome, gateway_url, port, token)
        if exit_after_story or not outcome.ok:
            return outcome.ok
        click.echo("")
        click.echo(click.style("The gateway keeps running; Ctrl-C stops it.", fg="bright_black"))
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
        click.echo("stopping")
    return True
