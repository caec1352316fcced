"""The `opa` engine against a stand-in OPA server.

No OPA binary can be installed in this environment, so `opa_stand_in` below
stands in for one: a small Starlette app on 127.0.0.1 (random port) that
speaks the part of OPA's documented REST API the engine uses —
`POST /v1/data/{path}` answering `{"result": ...}`, or `{}` when the document
is undefined, with `provenance` and `metrics` when asked, a 500 with OPA's
error body when evaluation fails, and `GET /health`. It evaluates the real
policies with regopy, so its answers are real Rego answers, not canned ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.config import ConfigError
from gateway.policy import DecisionLog
from gateway.policy.opa import OpaEngine
from gateway.policy.rego import compile_policy, evaluate, read_sources
from gateway.problems import PolicyUnavailable
from tests.servers import free_port, run_server

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
ENVELOPE = {"iss": "planner-1", "sub": "agent-1", "task_id": "t-1", "schema_version": "1"}


def opa_stand_in(policy_dir: Path) -> Starlette:
    sources = read_sources(policy_dir)
    policy = compile_policy(sources, ["gateway/decision"], timeout=30)

    async def data(request: Request) -> JSONResponse:
        body = await request.json()
        started = time.perf_counter_ns()
        raw, _ = evaluate(policy, json.dumps(body.get("input")), request.path_params["path"])
        if "error" in raw:
            return JSONResponse({"code": "internal_error", "message": raw["error"]}, status_code=500)
        answer: dict[str, Any] = dict(raw)
        if request.query_params.get("metrics") == "true":
            answer["metrics"] = {"timer_rego_query_eval_ns": time.perf_counter_ns() - started}
        if request.query_params.get("provenance") == "true":
            answer["provenance"] = {
                "version": "stand-in",
                "bundles": {"policies": {"revision": sources.version}},
            }
        return JSONResponse(answer)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({})

    return Starlette(routes=[Route("/v1/data/{path:path}", data, methods=["POST"]), Route("/health", health)])


@pytest.fixture(scope="module")
def opa_url() -> Iterator[str]:
    with run_server(opa_stand_in(SHIPPED)) as url:
        yield url


@pytest.fixture
async def engine(opa_url: str, tmp_path: Path) -> AsyncIterator[OpaEngine]:
    log = DecisionLog(tmp_path / "decisions.jsonl", instance_id="gw-opa")
    engine = OpaEngine(opa_url, decision_log=log, health_interval=0.05)
    await engine.start()
    yield engine
    await engine.stop()
    log.close()


def call_input(action: str, role: str, tool: dict[str, Any], **extra: Any) -> dict[str, Any]:
    principal = {"sub": "agent-1", "role": role, "iss": "agent-gateway-dev"}
    return {"action": action, "principal": principal, "tool": tool, "envelope": None, **extra}


DOCS = {"name": "docs.search", "effect": "read", "risk": "low"}
TRANSFER = {"name": "payments.transfer", "effect": "irreversible", "risk": "high"}


async def test_allow_and_deny_come_from_the_server(engine: OpaEngine, tmp_path: Path) -> None:
    assert engine.last_reload["ok"] is True
    allowed = await engine.decide(call_input("call", "worker", DOCS), labels={"trace_id": "t"})
    assert allowed.allow and allowed.reasons == []
    revision = read_sources(SHIPPED).version
    assert allowed.policy_version == engine.version == f"opa:policies@{revision}"

    commit = await engine.decide(call_input("commit", "committer", TRANSFER, envelope=ENVELOPE))
    assert commit.allow and commit.require_approval and commit.approvals_required == 1

    denied = await engine.decide(call_input("commit", "worker", TRANSFER))
    assert not denied.allow and "handoff envelope required" in denied.reasons

    assert engine.decision_log is not None
    engine.decision_log.flush()
    entries = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert [entry["decision_id"] for entry in entries] == [d.decision_id for d in (allowed, commit, denied)]
    assert entries[0]["labels"] == {**entries[0]["labels"], "id": "gw-opa", "trace_id": "t"}
    assert entries[0]["metrics"]["timer_rego_query_eval_ns"] > 0


async def test_undefined_decision_is_a_deny(tmp_path: Path) -> None:
    (tmp_path / "gateway.rego").write_text(
        "package gateway\nimport rego.v1\n"
        'decision := {"allow": true, "reasons": []} if input.action == "call"\n'
    )
    with run_server(opa_stand_in(tmp_path)) as url:
        engine = OpaEngine(url)
        await engine.start()
        try:
            assert (await engine.decide({"action": "call"})).allow is True
            decision = await engine.decide({"action": "commit"})
        finally:
            await engine.stop()
    assert decision.allow is False
    assert decision.raw == {}
    assert "undefined" in decision.reasons[0]


async def test_evaluation_error_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "gateway.rego").write_text(
        'package gateway\nimport rego.v1\ndecision := {"allow": true}\ndecision := {"allow": false} if true\n'
    )
    with run_server(opa_stand_in(tmp_path)) as url:
        engine = OpaEngine(url, retries=0)
        await engine.start()
        try:
            with pytest.raises(PolicyUnavailable, match="500"):
                await engine.decide({"action": "call"})
        finally:
            await engine.stop()


async def test_server_down_is_unavailable() -> None:
    engine = OpaEngine(f"http://127.0.0.1:{free_port()}", retries=0, timeout=1.0)
    await engine.start()
    try:
        assert engine.version == ""
        assert engine.last_reload["ok"] is False and "unreachable" in engine.last_reload["error"]
        with pytest.raises(PolicyUnavailable) as caught:
            await engine.decide(call_input("call", "worker", DOCS))
    finally:
        await engine.stop()
    assert caught.value.status == 503


async def test_server_going_away_is_unavailable() -> None:
    with run_server(opa_stand_in(SHIPPED)) as url:
        engine = OpaEngine(url, retries=0, timeout=1.0)
        await engine.start()
        assert (await engine.decide(call_input("call", "worker", DOCS))).allow
    try:
        with pytest.raises(PolicyUnavailable):
            await engine.decide(call_input("call", "worker", DOCS))
        assert engine.version == ""
    finally:
        await engine.stop()


async def test_not_started_is_unavailable(opa_url: str) -> None:
    with pytest.raises(PolicyUnavailable, match="not started"):
        await OpaEngine(opa_url).decide({})


@pytest.mark.parametrize("url", ["ftp://opa:8181", "http://", "http://opa:8181/prefix"])
def test_bad_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigError, match="policy.opa_url"):
        OpaEngine(url)
