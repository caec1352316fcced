"""Operator commands and shutdown: `revoke`, `check-config`, the drain on SIGTERM, and a stop
that waits for commits in flight."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from click.testing import CliRunner, Result

from gateway.cli import main
from gateway.storage import Database, upgrade_database
from gateway.storage.models import Intent
from tests.conftest import REPO, role_token
from tests.processes import GatewayProcess
from tests.protocol import Agents, commit_config, new_task, propose_and_verify


def write_config(path: Path, database: str, keys_dir: Path, upstream_url: str, **gateway: Any) -> Path:
    extra = "".join(f"{key} = {value}\n" for key, value in gateway.items())
    path.write_text(
        f'[gateway]\ndatabase = "{database}"\nkeys_dir = "{keys_dir}"\ndecision_log = ""\n{extra}'
        "[gateway.timeouts]\nconnect = 1.0\nread = 10.0\n"
        f'[policy]\ndir = "{REPO / "policies"}"\nreload = false\n'
        f'[[tools]]\nname = "docs.search"\nupstream = "{upstream_url}/search"\n'
        f'[[tools]]\nname = "docs.slow"\nupstream = "{upstream_url}/slow"\n'
    )
    return path


@contextlib.asynccontextmanager
async def running(config: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    from gateway.app import create_app

    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, app


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_revoke_from_the_command_line_applies_within_a_second(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> None:
    from gateway.config import load_config

    config_file = write_config(tmp_path / "gateway.toml", database_url, keys_dir, upstream[0])
    token, other = role_token(keys_dir, "worker", "worker-a"), role_token(keys_dir, "worker", "worker-b")
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    async with running(load_config(config_file)) as (client, _):

        async def status(bearer: str) -> int:
            response = await client.get("/tools/docs.search", headers={"Authorization": f"Bearer {bearer}"})
            return response.status_code

        assert await status(token) == 200
        for flag, value, victim in (("--jti", jti, token), ("--sub", "worker-b", other)):
            result = await cli("revoke", flag, value, "--reason", "leaked", "--config", str(config_file))
            assert result.exit_code == 0, result.output
            assert result.output.strip() == f"revoked {flag[2:]} {value}"
            revoked_at = time.monotonic()
            while await status(victim) != 401:
                assert time.monotonic() - revoked_at < 1.0, "still accepted a second after the revocation"
                await asyncio.sleep(0.05)
        assert await status(role_token(keys_dir, "worker", "worker-c")) == 200


@pytest.mark.parametrize(
    "args",
    [["revoke"], ["revoke", "--jti", "a", "--sub", "b"], ["revoke", "--sub", " "]],
)
def test_revoke_needs_exactly_one_target(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [*args, "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2
    assert "--jti" in result.output or "--sub must not be empty" in result.output


def test_check_config_compiles_the_policies(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "gateway.rego").write_text("package gateway\n\ndecision := {\n")  # does not compile
    config = tmp_path / "gateway.toml"
    config.write_text(f'[policy]\ndir = "{policies}"\n')
    result = CliRunner().invoke(main, ["check-config", str(config)])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: configuration error: policy: ")
    (policies / "gateway.rego").write_text('package gateway\n\ndecision := {"allow": false}\n')
    result = CliRunner().invoke(main, ["check-config", str(config)])
    assert result.exit_code == 0, result.output
    assert "compiles" in result.output


def test_sigterm_drains_then_refuses_new_connections_and_finishes_in_flight_calls(
    tmp_path: Path, upstream: tuple[str, Any], keys_dir: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    config = write_config(
        tmp_path / "gateway.toml", database, keys_dir, upstream[0], drain_seconds=1.5, shutdown_timeout=10
    )
    gateway = GatewayProcess(config).start()
    headers = {"Authorization": f"Bearer {role_token(keys_dir, 'worker')}"}
    try:
        gateway.wait_ready()
        slow: dict[str, httpx.Response] = {}

        def call_slow() -> None:
            with httpx.Client(base_url=gateway.url, headers=headers, timeout=20) as client:
                slow["response"] = client.get("/tools/docs.slow", params={"seconds": "2.5"})

        sender = threading.Thread(target=call_slow)
        sender.start()
        time.sleep(0.5)  # the slow call is in flight
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with httpx.Client(base_url=gateway.url, timeout=5) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["draining"] is True
            assert time.monotonic() - signalled < 0.5
            # Still draining: new connections are served while the balancer catches up.
            assert client.get("/tools/docs.search", headers=headers).status_code == 200
        deadline = signalled + 5
        while True:  # after the drain: connection refused
            try:
                httpx.get(gateway.url + "/healthz", timeout=1)
            except (httpx.ConnectError, httpx.ReadError):  # refused, or reset as the listener closed
                break
            assert time.monotonic() < deadline, "still accepting connections after the drain"
            time.sleep(0.1)
        assert time.monotonic() - signalled >= 1.4
        sender.join(timeout=15)
        assert slow["response"].status_code == 200, slow["response"].text
        assert gateway.process.wait(timeout=15) == 0
    finally:
        gateway.stop()


async def test_stop_waits_for_a_commit_in_flight(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    config = commit_config(tmp_path, database_url, upstream[0], keys_dir)
    agents, task = Agents(keys_dir), new_task()
    async with running(config) as (client, app):
        intent_id = await propose_and_verify(client, agents, task, "email.notify", {"delay": 1.0})
        commit = asyncio.create_task(
            client.post(f"/intents/{intent_id}/commit", headers=agents.headers("committer", task, key="k"))
        )
        while not effects.calls["email.notify"]:  # noqa: ASYNC110 - another thread's state
            await asyncio.sleep(0.02)
        commit.cancel()  # as uvicorn does to requests still running when its grace period ends
        with contextlib.suppress(asyncio.CancelledError):
            await commit
        assert app.state.gateway.executions  # the tool call goes on without its request
    # The lifespan has ended: Gateway.stop() returned.
    await upgrade_database(database_url)
    db = Database(database_url)
    try:
        async with db.sessions() as session:
            intent = await session.get(Intent, intent_id)
            assert intent is not None and intent.status == "committed"
    finally:
        await db.close()
    assert len(effects.effects) == 1
