"""Direct tool calls through the whole pipeline (contract §3), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from gateway.app import create_app
from tests.conftest import gateway_config, role_token
from tests.servers import run_server

PROBLEM = "application/problem+json"


def auth(keys_dir: Path, role: str = "worker", sub: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {role_token(keys_dir, role, sub)}"}


def assert_problem(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["type"] == f"https://agent-gateway.dev/problems/{name}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    return body


async def test_allowed_read_call_is_forwarded(app_client: Any, keys_dir: Path, effects: Any) -> None:
    client, _ = app_client
    response = await client.get("/tools/docs.search", params={"q": "refunds"}, headers=auth(keys_dir))
    assert response.status_code == 200, response.text
    assert response.json() == {"query": "refunds", "results": ["result for refunds"]}
    assert response.headers["gateway-decision-id"]
    assert effects.calls["docs.search"] == 1


async def test_role_without_the_tool_is_denied_before_the_upstream(
    app_client: Any, keys_dir: Path, effects: Any
) -> None:
    client, _ = app_client
    response = await client.get("/tools/docs.search", headers=auth(keys_dir, role="intruder"))
    body = assert_problem(response, 403, "policy-denied")
    assert body["decision_id"]
    assert body["reasons"]
    assert effects.calls["docs.search"] == 0


async def test_effectful_tool_cannot_be_called_directly(
    app_client: Any, keys_dir: Path, effects: Any
) -> None:
    client, _ = app_client
    response = await client.post(
        "/tools/payments.transfer",
        json={"from_account": "a", "to_account": "b", "amount": 5, "currency": "EUR"},
        headers=auth(keys_dir, role="committer"),
    )
    assert_problem(response, 403, "commit-required")
    assert effects.effects == []


async def test_unknown_tool_and_route_and_method(app_client: Any, keys_dir: Path) -> None:
    client, _ = app_client
    assert_problem(await client.get("/tools/no.such.tool", headers=auth(keys_dir)), 404, "not-found")
    assert_problem(await client.get("/nowhere"), 404, "not-found")
    assert_problem(await client.delete("/healthz"), 405, "method-not-allowed")


async def test_no_token_no_upstream_call(app_client: Any, effects: Any) -> None:
    client, _ = app_client
    assert_problem(await client.get("/tools/docs.search"), 401, "token-invalid")
    assert_problem(await client.get("/tools/no.such.tool"), 401, "token-invalid")
    assert effects.calls["docs.search"] == 0


async def test_oversized_body_is_refused_with_413(app_client: Any, keys_dir: Path, effects: Any) -> None:
    client, _ = app_client
    big = b"x" * 70_000  # the test config's limit is 65,536 bytes
    response = await client.post(
        "/tools/docs.echo", content=big, headers={**auth(keys_dir), "content-type": "text/plain"}
    )
    assert_problem(response, 413, "payload-too-large")

    async def chunked() -> Any:
        for _ in range(20):
            yield b"y" * 5_000

    assert effects.headers == []
    # A streamed body is cut off at the limit: the upstream may see the start, never the whole.
    response = await client.post("/tools/docs.echo", content=chunked(), headers=auth(keys_dir))
    assert_problem(response, 413, "payload-too-large")


async def test_refused_upstream_is_502_and_silent_upstream_is_504(app_client: Any, keys_dir: Path) -> None:
    client, _ = app_client
    body = assert_problem(
        await client.get("/tools/docs.down", headers=auth(keys_dir)), 502, "upstream-unavailable"
    )
    assert "127.0.0.1:9" not in body["detail"]
    response = await client.get("/tools/docs.slow", params={"seconds": "5"}, headers=auth(keys_dir))
    assert_problem(response, 504, "upstream-unavailable")


async def test_headers_stripped_and_trace_propagated(app_client: Any, keys_dir: Path, effects: Any) -> None:
    client, _ = app_client
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {
        **auth(keys_dir),
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
        "Connection": "close, x-hop",
        "X-Hop": "secret-hop",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Cookie": "session=abc",
        "X-Request-Note": "kept",
    }
    response = await client.post("/tools/docs.echo/a/b", params={"x": "1"}, json={"k": "v"}, headers=headers)
    assert response.status_code == 200, response.text
    seen = response.json()
    upstream_headers = {name.lower(): value for name, value in seen["headers"].items()}
    for name in ("authorization", "x-hop", "proxy-authorization", "cookie"):
        assert name not in upstream_headers, name
    assert upstream_headers["x-request-note"] == "kept"
    version, seen_trace, parent, flags = upstream_headers["traceparent"].split("-")
    assert seen_trace == trace_id and parent != "00f067aa0ba902b7" and flags == "01"
    assert seen["path"] == "/echo/a/b" and seen["query"] == "x=1"


async def test_path_traversal_cannot_leave_the_configured_upstream(app_client: Any, keys_dir: Path) -> None:
    client, _ = app_client
    response = await client.get("/tools/docs.echo/..%2F_effects", headers=auth(keys_dir))
    if response.status_code == 200:
        assert response.json()["path"].startswith("/echo/")
    else:
        assert_problem(response, 400, "bad-request")


async def test_streamed_response_arrives_incrementally(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path
) -> None:
    # httpx's ASGITransport buffers whole bodies, so this one runs on a real uvicorn.
    app = create_app(gateway_config(tmp_path, database_url, upstream[0], keys_dir=keys_dir))
    arrivals: list[float] = []
    loop = asyncio.get_running_loop()
    params = {"chunks": "4", "pause": "0.3"}
    with run_server(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            async with client.stream(
                "GET", "/tools/docs.stream", params=params, headers=auth(keys_dir)
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    if chunk:
                        arrivals.append(loop.time())
    assert len(arrivals) >= 3, "the body arrived in one piece: it was buffered"
    assert arrivals[-1] - arrivals[0] > 0.5


async def test_decision_log_line_per_call_with_secrets_masked(
    app_client: Any, keys_dir: Path, tmp_path: Path
) -> None:
    client, app = app_client
    response = await client.get(
        "/tools/docs.search", params={"q": "x", "api_key": "hunter2"}, headers=auth(keys_dir)
    )
    decision_id = response.headers["gateway-decision-id"]
    gateway = app.state.gateway
    gateway.decision_log.flush()
    lines = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    entry = next(line for line in lines if line["decision_id"] == decision_id)
    assert entry["path"] == "gateway/decision"
    assert entry["result"]["allow"] is True
    assert {"input", "timestamp", "labels", "metrics"} <= set(entry)
    text = json.dumps(entry)
    assert "hunter2" not in text
    assert "Bearer" not in text


async def test_request_body_streams_to_the_upstream(app_client: Any, keys_dir: Path) -> None:
    client, _ = app_client

    async def chunked() -> Any:
        for _ in range(10):
            yield b"z" * 4_000

    response = await client.put(
        "/tools/docs.echo/upload",
        content=chunked(),
        headers={**auth(keys_dir), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["body_bytes"] == 40_000
