"""Scoped upstream credentials and the Gateway-Assertion: what the tool sees, and where secrets never go."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from gateway.cli import main
from gateway.config import ConfigError
from gateway.credentials import Secret, arguments_digest
from gateway.keys import key_from_jwk
from gateway.storage import Database, upgrade_database
from tests.conftest import gateway_config, role_token
from tests.protocol import Agents, commit_config, new_task, propose_and_verify

SEARCH_TOKEN = "search-secret-6f1d0c9e"  # noqa: S105
VERIFIER_TOKEN = "verifier-secret-a83b22"  # noqa: S105
NOTIFY_TOKEN = "notify-secret-5d7e41aa"  # noqa: S105
SECRETS = (SEARCH_TOKEN, VERIFIER_TOKEN, NOTIFY_TOKEN)


def with_credentials(config: Any, tmp_path: Path, **changes: dict[str, Any]) -> Any:
    """`config` with extra keys on some tools (by name)."""
    tools = [tool.model_dump(exclude_defaults=True) for tool in config.tools]
    for tool in tools:
        tool.update(changes.get(tool["name"].replace(".", "_"), {}))
    data = config.model_dump(exclude={"base_dir", "tools"}, exclude_defaults=True)
    from gateway.config import parse_config

    return parse_config({**data, "tools": tools}, base_dir=tmp_path)


@contextlib.asynccontextmanager
async def running(config: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    from gateway.app import create_app

    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, app


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("SEARCH_TOKEN", SEARCH_TOKEN)
    monkeypatch.setenv("NOTIFY_TOKEN", NOTIFY_TOKEN)
    secret_file = tmp_path / "verifier-secret"
    secret_file.write_text(VERIFIER_TOKEN + "\n")
    return secret_file


def credentialed(tmp_path: Path, upstream_url: str, keys_dir: Path, secret_file: Path) -> Any:
    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    base = commit_config(tmp_path, db, upstream_url, keys_dir)
    return with_credentials(
        base,
        tmp_path,
        docs_search={
            "assertion": True,
            "credential": {
                "value_env": "SEARCH_TOKEN",
                "prefix": "Bearer ",
                "roles": {"verifier": {"value_file": str(secret_file)}},
            },
        },
        docs_echo={"credential": {"header": "X-Api-Key", "value_env": "SEARCH_TOKEN"}},
        docs_down={"credential": {"value_env": "SEARCH_TOKEN"}},
        email_notify={"assertion": True, "credential": {"header": "X-Api-Key", "value_env": "NOTIFY_TOKEN"}},
    )


def test_secret_is_masked() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret) and "hunter2" not in f"{secret}"
    assert secret.reveal() == "hunter2"


def test_a_missing_credential_is_one_config_error_at_start(tmp_path: Path, keys_dir: Path) -> None:
    from gateway.app import create_app

    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    base = gateway_config(tmp_path, db, "http://127.0.0.1:9", keys_dir=keys_dir)
    missing_env = with_credentials(
        base, tmp_path, docs_search={"credential": {"value_env": "AGW_NOT_SET_XYZ"}}
    )
    with pytest.raises(
        ConfigError, match="tools.docs.search.credential: environment variable AGW_NOT_SET_XYZ"
    ):
        create_app(missing_env)
    missing_file = with_credentials(
        base, tmp_path, docs_search={"credential": {"value_file": "secrets/nothing-here"}}
    )
    with pytest.raises(ConfigError, match=r"cannot read .*secrets/nothing-here \(No such file"):
        create_app(missing_file)


def test_check_config_loads_credentials_and_reports_one_line(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[[tools]]\nname = "pay"\nupstream = "http://127.0.0.1:9/pay"\n'
        '[tools.credential]\nvalue_env = "AGW_NOT_SET_XYZ"\n'
        f'[policy]\ndir = "{Path(__file__).parent.parent / "policies"}"\n'
    )
    result = CliRunner().invoke(main, ["check-config", str(config)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: configuration error: tools.pay.credential: environment variable AGW_NOT_SET_XYZ is not set"
    ]
    result = CliRunner().invoke(main, ["check-config", str(config)], env={"AGW_NOT_SET_XYZ": "v"})
    assert result.exit_code == 0, result.output
    assert "1 upstream credential(s) readable" in result.output
    assert "policy " in result.output and "compiles" in result.output


async def verify_assertion(client: httpx.AsyncClient, token: str, tool: str) -> dict[str, Any]:
    jwks = (await client.get("/.well-known/jwks.json")).json()
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "gateway-assertion+jwt"
    (jwk,) = [key for key in jwks["keys"] if key["kid"] == header["kid"]]
    claims = jwt.decode(token, key_from_jwk(jwk), algorithms=["EdDSA"], audience=tool, issuer="agent-gateway")
    assert 0 < claims["exp"] - claims["iat"] <= 60
    return claims


async def test_the_tool_sees_the_gateway_credential_and_assertion_never_the_callers_token(
    tmp_path: Path, upstream: tuple[str, Any], keys_dir: Path, effects: Any, secrets_env: Path
) -> None:
    config = credentialed(tmp_path, upstream[0], keys_dir, secrets_env)
    async with running(config) as (client, _):
        token = role_token(keys_dir, "worker", "worker-7")
        response = await client.get(
            "/tools/docs.search",
            params={"q": "x"},
            headers={"Authorization": f"Bearer {token}", "Gateway-Assertion": "forged"},
        )
        assert response.status_code == 200, response.text
        seen = effects.headers[-1]
        assert seen["authorization"] == f"Bearer {SEARCH_TOKEN}"
        assert token not in json.dumps(seen)
        claims = await verify_assertion(client, seen["gateway-assertion"], "docs.search")
        assert (claims["sub"], claims["role"]) == ("worker-7", "worker")
        assert claims["args_digest"] == arguments_digest({"q": "x"})
        assert "intent_id" not in claims

        # A role override: the verifier's calls carry the value from its file.
        await client.get(
            "/tools/docs.search", headers={"Authorization": f"Bearer {role_token(keys_dir, 'verifier')}"}
        )
        assert effects.headers[-1]["authorization"] == f"Bearer {VERIFIER_TOKEN}"

        # A header the caller sends under the credential's name is replaced, not forwarded.
        echo = await client.get(
            "/tools/docs.echo", headers={"Authorization": f"Bearer {token}", "X-Api-Key": "from-the-agent"}
        )
        assert echo.json()["headers"]["x-api-key"] == SEARCH_TOKEN
        assert "authorization" not in echo.json()["headers"]


async def test_a_rotated_secret_file_is_picked_up(
    tmp_path: Path,
    upstream: tuple[str, Any],
    keys_dir: Path,
    effects: Any,
    secrets_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.credentials.RECHECK_FILES_EVERY", 0.0)
    config = credentialed(tmp_path, upstream[0], keys_dir, secrets_env)
    async with running(config) as (client, _):
        headers = {"Authorization": f"Bearer {role_token(keys_dir, 'verifier')}"}
        await client.get("/tools/docs.search", headers=headers)
        assert effects.headers[-1]["authorization"] == f"Bearer {VERIFIER_TOKEN}"
        staged = secrets_env.with_name("staged")
        staged.write_text("rotated-value-1")
        staged.replace(secrets_env)  # as a Secret volume swaps its files
        await client.get("/tools/docs.search", headers=headers)
        assert effects.headers[-1]["authorization"] == "Bearer rotated-value-1"
        secrets_env.unlink()  # noqa: ASYNC240 - gone: the last value stays in use
        await client.get("/tools/docs.search", headers=headers)
        assert effects.headers[-1]["authorization"] == "Bearer rotated-value-1"


async def test_commits_carry_the_credential_and_an_assertion_naming_the_intent(
    tmp_path: Path, upstream: tuple[str, Any], keys_dir: Path, effects: Any, secrets_env: Path
) -> None:
    config = credentialed(tmp_path, upstream[0], keys_dir, secrets_env)
    await upgrade_database(config.database_url)
    agents = Agents(keys_dir)
    async with running(config) as (client, _):
        task = new_task()
        intent_id = await propose_and_verify(client, agents, task, "email.notify", {"to": "ops"})
        committed = await client.post(
            f"/intents/{intent_id}/commit", headers=agents.headers("committer", task, key="c1")
        )
        assert committed.status_code == 200, committed.text
        seen = effects.headers[-1]
        assert seen["x-api-key"] == NOTIFY_TOKEN
        assert "authorization" not in seen
        claims = await verify_assertion(client, seen["gateway-assertion"], "email.notify")
        assert claims["intent_id"] == intent_id
        assert (claims["sub"], claims["role"]) == ("committer-1", "committer")
        assert claims["args_digest"] == arguments_digest({"to": "ops"})


async def test_no_secret_reaches_logs_decision_log_ledger_errors_or_metrics(
    tmp_path: Path,
    upstream: tuple[str, Any],
    keys_dir: Path,
    effects: Any,
    secrets_env: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = credentialed(tmp_path, upstream[0], keys_dir, secrets_env)
    await upgrade_database(config.database_url)
    agents = Agents(keys_dir)
    bodies: list[str] = []
    async with running(config) as (client, app):
        worker = {"Authorization": f"Bearer {role_token(keys_dir, 'worker')}"}
        await client.get("/tools/docs.search", params={"q": "ok"}, headers=worker)
        bodies.append(
            (await client.get("/tools/docs.search", headers={"Authorization": "Bearer x.y.z"})).text
        )
        bodies.append((await client.get("/tools/docs.down", headers=worker)).text)  # 502
        intruder = {"Authorization": f"Bearer {role_token(keys_dir, 'intruder')}"}
        bodies.append((await client.get("/tools/docs.search", headers=intruder)).text)  # 403
        task = new_task()
        for n, arguments in enumerate([{"to": "a"}, {"fail": True}]):
            intent_id = await propose_and_verify(client, agents, task, "email.notify", arguments)
            answer = await client.post(
                f"/intents/{intent_id}/commit", headers=agents.headers("committer", task, key=f"k{n}")
            )
            bodies.append(answer.text)
        assert json.loads(bodies[-1])["status"] == "failed"  # the tool answered 500
        bodies.append((await client.get("/metrics")).text)
        bodies.append((await client.get(f"/ledger?task_id={task}", headers=worker)).text)
        app.state.gateway.decision_log.flush()
    assert sum(SEARCH_TOKEN in json.dumps(h) for h in effects.headers) >= 1  # the upstream did get it

    db = Database(config.database_url)
    dumps = []
    try:
        async with db.sessions() as session:
            for table in ("ledger", "intents", "idempotency_keys", "approvals"):
                query = text(f"SELECT * FROM {table}")  # noqa: S608 - fixed table names
                rows = (await session.execute(query)).all()
                dumps.append(json.dumps([list(row) for row in rows], default=str))
    finally:
        await db.close()
    places = {
        "decision log": (tmp_path / "decisions.jsonl").read_text(),
        "log records": "\n".join(record.getMessage() + repr(record.args) for record in caplog.records),
        "error and protocol bodies": "\n".join(bodies),
        "database": "\n".join(dumps),
    }
    assert places["decision log"] and places["database"]
    for where, content in places.items():
        for secret in SECRETS:
            assert secret not in content, f"{secret} found in the {where}"
