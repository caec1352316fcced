"""Shared fixtures: real databases (SQLite and the local PostgreSQL), dev keys, the app."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.config import Config, parse_config
from gateway.storage import Database, upgrade_database
from tests.servers import run_server

PG_ADMIN_DSN = os.environ.get("AGW_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AGENT_GATEWAY_CONFIG", raising=False)


# Migrating a database costs seconds; each test gets a copy of one migrated
# template instead (PostgreSQL: CREATE DATABASE … TEMPLATE; SQLite: a file copy).
_templates: dict[str, str] = {}


async def create_pg_database(*, migrated: bool = False) -> str:
    name = f"agw_test_{uuid.uuid4().hex[:12]}"
    template = await _pg_template() if migrated else None
    connection = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        suffix = f' TEMPLATE "{template}"' if template else ""
        await connection.execute(f'CREATE DATABASE "{name}"{suffix}')
    finally:
        await connection.close()
    return name


async def drop_pg_database(name: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def _pg_template() -> str:
    if "postgresql" not in _templates:
        name = await create_pg_database()
        await upgrade_database(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}")
        _templates["postgresql"] = name
    return _templates["postgresql"]


async def _sqlite_template(directory: Path) -> Path:
    if "sqlite" not in _templates:
        path = directory / "template.db"
        await upgrade_database(f"sqlite+aiosqlite:///{path}")
        _templates["sqlite"] = str(path)
    return Path(_templates["sqlite"])


@pytest.fixture(scope="session", autouse=True)
def _drop_templates() -> Iterator[None]:
    yield
    if "postgresql" in _templates:
        asyncio.run(drop_pg_database(_templates.pop("postgresql")))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A fresh, migrated database URL: every test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        template = await _sqlite_template(tmp_path_factory.getbasetemp())
        shutil.copyfile(template, tmp_path / "gateway.db")
        yield f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
        return
    name = await create_pg_database(migrated=True)
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await drop_pg_database(name)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url)
    yield db
    await db.close()


@pytest.fixture
def keys_dir(tmp_path: Path) -> Iterator[Path]:
    from gateway.keys import generate_dev_keys

    path = tmp_path / "keys"
    generate_dev_keys(path)
    yield path


@pytest.fixture(scope="session")
def upstream() -> Iterator[tuple[str, Any]]:
    """The demo tool upstream on a real loopback port: (base URL, its EffectLog)."""
    from gateway.demo.upstream import create_upstream

    app = create_upstream()
    with run_server(app) as url:
        yield url, app.state.effects


@pytest.fixture
def effects(upstream: tuple[str, Any]) -> Any:
    """The upstream's effect log, emptied for this test."""
    upstream[1].reset()
    return upstream[1]


REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "policies"


@pytest.fixture
def shipped_copy(tmp_path: Path) -> Path:
    """A copy of the repository's policies/, free to edit."""
    folder = tmp_path / "policies"
    shutil.copytree(SHIPPED, folder)
    return folder


def gateway_config(
    tmp_path: Path, database_url: str, upstream_url: str, *, keys_dir: Path, **overrides: Any
) -> Config:
    """A configuration like the shipped one, with the demo tools on the test upstream."""
    data: dict[str, Any] = {
        "gateway": {
            "database": database_url,
            "keys_dir": str(keys_dir),
            "decision_log": str(tmp_path / "decisions.jsonl"),
            "max_body_bytes": 65_536,
            "timeouts": {"connect": 1.0, "read": 2.0},
        },
        "policy": {"dir": str(REPO / "policies"), "reload_interval": 0.2},
        "tools": [
            {"name": "docs.search", "upstream": f"{upstream_url}/search", "effect": "read"},
            {"name": "docs.echo", "upstream": f"{upstream_url}/echo", "effect": "read"},
            {"name": "docs.stream", "upstream": f"{upstream_url}/stream", "effect": "read"},
            {"name": "docs.slow", "upstream": f"{upstream_url}/slow", "effect": "read"},
            {"name": "docs.down", "upstream": "http://127.0.0.1:9/nothing", "effect": "read"},
            {
                "name": "email.send",
                "upstream": f"{upstream_url}/effects/email.send",
                "effect": "write",
                "risk": "medium",
                "input_schema": str(REPO / "schemas" / "email.send.json"),
            },
            {
                "name": "payments.transfer",
                "upstream": f"{upstream_url}/effects/payments.transfer",
                "effect": "irreversible",
                "risk": "high",
                "input_schema": str(REPO / "schemas" / "payments.transfer.json"),
                "compensation": "payments.refund",
            },
            {
                "name": "payments.refund",
                "upstream": f"{upstream_url}/effects/payments.refund",
                "effect": "write",
                "risk": "medium",
            },
        ],
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return parse_config(data, base_dir=tmp_path)


@pytest.fixture
async def app_client(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> AsyncIterator[Any]:
    """(httpx client on the real ASGI app with its lifespan running, the app)."""
    import httpx

    from gateway.app import create_app

    app = create_app(gateway_config(tmp_path, database_url, upstream[0], keys_dir=keys_dir))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, app


def role_token(keys_dir: Path, role: str, sub: str | None = None, **kwargs: Any) -> str:
    from gateway.identity import DEV_ISSUER, mint_role_token
    from gateway.keys import load_private_key

    return mint_role_token(
        load_private_key(keys_dir / "issuer.key.pem"),
        iss=DEV_ISSUER,
        sub=sub or f"{role}-1",
        role=role,
        audience="agent-gateway",
        **kwargs,
    )
