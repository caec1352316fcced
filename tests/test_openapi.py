"""`/openapi.json` stays true: it documents exactly the routes served, and a bounded
schemathesis run against a live gateway finds no 5xx, only problem documents as
errors, and no request without a valid token reaching a tool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from gateway.demo.upstream import create_upstream
from gateway.openapi import document, served_operations
from tests.conftest import REPO, gateway_config, role_token
from tests.processes import GatewayProcess
from tests.servers import run_server

PROBLEM = "application/problem+json"
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/.well-known/jwks.json"}
schema = schemathesis.openapi.from_dict(document())
EXAMPLES = settings(
    max_examples=10,
    deadline=None,
    database=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
)


def test_the_document_names_exactly_the_routes_served(tmp_path: Path, keys_dir: Path) -> None:
    from gateway.app import create_app

    db = f"sqlite+aiosqlite:///{tmp_path}/g.db"
    app = create_app(gateway_config(tmp_path, db, "http://127.0.0.1:9", keys_dir=keys_dir))
    served = served_operations(list(app.routes))
    documented = {(path, method) for path, item in document()["paths"].items() for method in item}
    assert served - documented == set(), "routes served but not documented in gateway/openapi.py"
    shown = document(served)
    assert {(path, method) for path, item in shown["paths"].items() for method in item} == served
    assert shown["openapi"].startswith("3.1")
    assert ("/tools/{tool}/{rest}", "post") in served and ("/metrics", "get") in served


class Live:
    def __init__(self, url: str, effects: Any, keys_dir: Path) -> None:
        self.url, self.effects, self.keys_dir = url, effects, keys_dir
        self.session = requests.Session()
        self.session.trust_env = False  # loopback, whatever proxy the environment names
        self.planner = {"Authorization": f"Bearer {role_token(keys_dir, 'planner', ttl=3600)}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A gateway process in front of a demo upstream of its own (so its effect log is ours alone)."""
    from gateway.keys import generate_dev_keys

    tmp = tmp_path_factory.mktemp("openapi")
    keys_dir = tmp / "keys"
    generate_dev_keys(keys_dir)
    upstream = create_upstream()
    with run_server(upstream) as upstream_url:
        tools = [
            ("docs.search", "/search", "read", ""),
            ("docs.echo", "/echo", "read", ""),
            ("email.send", "/effects/email.send", "write", "email.send.json"),
            ("payments.transfer", "/effects/payments.transfer", "irreversible", "payments.transfer.json"),
        ]
        text = (
            f'[gateway]\ndatabase = "sqlite+aiosqlite:///{tmp}/g.db"\nkeys_dir = "{keys_dir}"\n'
            'decision_log = ""\ndrain_seconds = 0\n[gateway.timeouts]\nconnect = 1.0\nread = 5.0\n'
            f'[policy]\ndir = "{REPO / "policies"}"\nreload = false\n'
        )
        for name, path, effect, schema_file in tools:
            text += f'[[tools]]\nname = "{name}"\nupstream = "{upstream_url}{path}"\neffect = "{effect}"\n'
            if schema_file:
                text += f'input_schema = "{REPO / "schemas" / schema_file}"\n'
        config = tmp / "gateway.toml"
        config.write_text(text)
        process = GatewayProcess(config).start()
        try:
            process.wait_ready()
            yield Live(process.url, upstream.state.effects, keys_dir)
        finally:
            process.stop()


def check(response: Any, path: str) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code < 400:
        return
    content_type = (response.headers.get("content-type") or [""])[0]
    body = response.json()
    if path.startswith("/mcp/") and content_type.startswith("application/json"):
        body = body["error"]["data"]  # MCP answers JSON-RPC errors that carry the problem document
    else:
        assert content_type.startswith(PROBLEM), (
            f"{response.status_code} {content_type}: {response.text[:500]}"
        )
    assert body["type"].startswith("https://agent-gateway.dev/problems/")
    assert body["status"] == response.status_code and body["title"]


@schema.exclude(path=sorted(PUBLIC)).exclude(path_regex="^/ui").parametrize()
@EXAMPLES
def test_without_a_valid_token_nothing_reaches_a_tool(case: Any, live: Live) -> None:
    response = case.call(base_url=live.url, session=live.session, timeout=10)
    check(response, case.path)
    assert response.status_code not in (200, 201, 202), response.text[:300]
    assert not live.effects.headers and not live.effects.effects and not live.effects.calls


@schema.include(path_regex=r"^/(tools|intents|tasks|ledger|trace|approvals|memory)").parametrize()
@EXAMPLES
def test_with_a_valid_token_no_5xx_and_every_error_a_problem(case: Any, live: Live) -> None:
    response = case.call(base_url=live.url, session=live.session, headers=live.planner, timeout=10)
    check(response, case.path)


def test_public_operations_answer_without_a_token(live: Live) -> None:
    for path in sorted(PUBLIC):
        response = live.session.get(live.url + path, timeout=10)
        assert response.status_code == 200, (path, response.text[:300])
    assert not live.effects.calls
