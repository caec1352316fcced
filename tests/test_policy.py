"""The embedded policy engine, the shipped policies, the decision log and `policy test`."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.policy import Decision, DecisionLog, PolicyError, build_engine, rego
from gateway.policy.decision import DECISION_PATH, decision_from_result
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.opa import OpaEngine
from gateway.policy.rego import check_in_subprocess, read_sources
from gateway.policy.testing import evaluate_file, run_policy_tests
from gateway.problems import PolicyUnavailable
from tests.conftest import SHIPPED

ENV = {"iss": "planner-1", "sub": "agent-1", "task_id": "t-1", "schema_version": "1"}
TOOLS = {
    "docs.search": {"name": "docs.search", "effect": "read", "risk": "low"},
    "email.send": {"name": "email.send", "effect": "write", "risk": "medium"},
    "payments.transfer": {"name": "payments.transfer", "effect": "irreversible", "risk": "high"},
}


def inp(action: str, role: str, tool: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "action": action,
        "principal": {"sub": "agent-1", "role": role, "iss": "agent-gateway-dev"},
        "tool": TOOLS[tool] if tool else None,
        "arguments": None,
        "envelope": None,
        "intent": None,
        "approval": None,
        "request": {"method": "POST", "path": "/x", "headers": {}},
        "time": "2025-01-01T00:00:00+00:00",
        **extra,
    }


def write_policy(folder: Path, rego: str, data: dict[str, Any] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gateway.rego").write_text(rego, encoding="utf-8")
    if data is not None:
        (folder / "data.json").write_text(json.dumps(data), encoding="utf-8")


CONFLICT_POLICY = """package gateway
import rego.v1
decision := {"allow": true}
decision := {"allow": false} if true
"""

ECHO_POLICY = """package gateway
import rego.v1
decision := {"allow": input.n % 2 == 0, "reasons": [sprintf("n=%d", [input.n])]}
"""

# 50,000 nested array literals overflow rego-cpp's parser stack: SIGSEGV.
DEEP_ARRAY = "package gateway\nimport rego.v1\ndecision := " + "[" * 50_000 + "]" * 50_000 + "\n"
# Valid Rego (OPA accepts it) that makes rego-cpp 1.5 throw out of its C++ core: SIGABRT.
WITH_WHOLE_INPUT = """package gateway
import rego.v1
decision := {"allow": false, "reasons": []}
probe if { decision.allow with input as {"action": "call"} }
"""


@pytest.fixture
async def engine(shipped_copy: Path, tmp_path: Path) -> AsyncIterator[EmbeddedEngine]:
    log = DecisionLog(tmp_path / "decisions.jsonl", instance_id="gw-test")
    engine = EmbeddedEngine(shipped_copy, decision_log=log, reload_interval=0.05)
    await engine.start()
    yield engine
    await engine.stop()
    log.close()


# --- the shipped policy through the engine ----------------------------------------


@pytest.mark.parametrize(
    ("input", "allow", "approval", "reason"),
    [
        (inp("call", "worker", "docs.search"), True, False, None),
        (inp("call", "worker", "email.send", envelope=ENV), False, False, "only read tools"),
        (inp("call", "intruder", "docs.search"), False, False, 'role "intruder" is not defined'),
        (inp("propose", "planner", "email.send"), False, False, "handoff envelope required"),
        (inp("propose", "planner", "email.send", envelope=ENV), True, False, None),
        (inp("verify", "verifier", "email.send", envelope=ENV), True, False, None),
        (inp("commit", "planner", "email.send", envelope=ENV), False, False, "only the committer"),
        (inp("commit", "committer", "email.send", envelope=ENV), True, False, None),
        (inp("commit", "committer", "payments.transfer", envelope=ENV), True, True, "high risk"),
        (
            inp("commit", "committer", "email.send", envelope=ENV, arguments={"amount": 5000}),
            True,
            True,
            "exceeds the approval limit of 1000",
        ),
        (inp("approve", "approver", "payments.transfer"), True, False, None),
        (inp("approve", "planner", "payments.transfer"), False, False, "only the approver"),
        ({}, False, False, "handoff envelope required"),
    ],
)
async def test_shipped_policy_decisions(
    engine: EmbeddedEngine, input: dict[str, Any], allow: bool, approval: bool, reason: str | None
) -> None:
    decision = await engine.decide(input)
    assert decision.allow is allow
    assert decision.require_approval is approval
    assert decision.approvals_required == (1 if approval else 0)
    assert all(isinstance(text, str) for text in decision.reasons)
    if reason:
        assert any(reason in text for text in decision.reasons), decision.reasons
    assert decision.policy_version == engine.version != ""
    assert re.fullmatch(r"[0-9a-f-]{36}", decision.decision_id)


# --- malformed results are denies ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({}, "undefined"),
        ({"result": None}, "not an object"),
        ({"result": ["allow"]}, "not an object"),
        ({"result": {"reasons": []}}, "boolean 'allow'"),
        ({"result": {"allow": "true"}}, "boolean 'allow'"),
        ({"result": {"allow": 1}}, "boolean 'allow'"),
        ({"result": {"allow": True, "reasons": "fine"}}, "'reasons'"),
        ({"result": {"allow": True, "require_approval": "yes"}}, "'require_approval'"),
        (
            {"result": {"allow": True, "require_approval": True, "approvals_required": 0}},
            "approvals_required",
        ),
        ({"result": {"allow": True, "approvals_required": True}}, "approvals_required"),
        ({"error": "conflicting rules"}, "evaluation failed: conflicting rules"),
    ],
)
def test_malformed_result_is_a_deny(raw: dict[str, Any], reason: str) -> None:
    decision = decision_from_result(raw, policy_version="v1")
    assert decision.allow is False
    assert decision.require_approval is False
    assert len(decision.reasons) == 1 and reason in decision.reasons[0]


def test_well_formed_result() -> None:
    raw = {"result": {"allow": True, "reasons": ["r"], "require_approval": True, "approvals_required": 2}}
    decision = decision_from_result(raw, policy_version="v1")
    assert (decision.allow, decision.reasons, decision.require_approval, decision.approvals_required) == (
        True,
        ["r"],
        True,
        2,
    )
    assert decision.raw == raw


@pytest.mark.parametrize(
    ("rego", "reason"),
    [
        ('package gateway\nimport rego.v1\ndecision := "yes"\n', "not an object"),
        ('package gateway\nimport rego.v1\ndecision := {"allow": true} if input.never\n', "undefined"),
        ('package gateway\nimport rego.v1\ndecision := {"allow": "sure"}\n', "boolean 'allow'"),
        (CONFLICT_POLICY, "evaluation failed"),
    ],
)
async def test_bad_policy_results_deny(tmp_path: Path, rego: str, reason: str) -> None:
    write_policy(tmp_path, rego)
    engine = EmbeddedEngine(tmp_path, reload=False)
    await engine.start()
    try:
        decision = await engine.decide({"action": "call"})
    finally:
        await engine.stop()
    assert decision.allow is False
    assert reason in decision.reasons[0]


# --- loading, refusing, reloading -------------------------------------------------------


async def test_no_policy_means_unavailable(tmp_path: Path) -> None:
    engine = EmbeddedEngine(tmp_path / "missing", reload=False)
    await engine.start()
    try:
        with pytest.raises(PolicyUnavailable) as caught:
            await engine.decide({})
    finally:
        await engine.stop()
    assert caught.value.status == 503
    assert engine.version == ""
    assert engine.last_reload["ok"] is False and "no such policy folder" in engine.last_reload["error"]


async def test_folder_without_package_gateway_is_refused(tmp_path: Path) -> None:
    write_policy(tmp_path, "package other\nimport rego.v1\ndecision := {}\n")
    engine = EmbeddedEngine(tmp_path, reload=False)
    await engine.start()
    await engine.stop()
    assert engine.version == "" and "package gateway" in engine.last_reload["error"]


async def test_syntax_error_is_refused_and_old_policy_keeps_serving(
    engine: EmbeddedEngine, shipped_copy: Path
) -> None:
    good = engine.version
    (shipped_copy / "gateway.rego").write_text("package gateway\nimport rego.v1\ndecision := {\n")
    assert await engine.reload() is False
    assert engine.version == good
    assert engine.last_reload["ok"] is False
    assert "does not compile" in engine.last_reload["error"]
    assert "unclosed" in engine.last_reload["error"]  # rego-cpp's own message, with the file position
    decision = await engine.decide(inp("call", "worker", "docs.search"))
    assert decision.allow and decision.policy_version == good
    shutil.copy(SHIPPED / "gateway.rego", shipped_copy / "gateway.rego")  # fixed again
    assert await engine.reload() is False
    assert engine.last_reload["ok"] is True and engine.version == good


@pytest.mark.parametrize(("rego", "signal_name"), [(WITH_WHOLE_INPUT, "SIGABRT"), (DEEP_ARRAY, "SIGSEGV")])
async def test_policy_that_crashes_the_compiler_is_refused(
    engine: EmbeddedEngine, shipped_copy: Path, rego: str, signal_name: str
) -> None:
    """Real crash constructs found in rego-cpp 1.5.2 (no simulation): building either
    policy in-process would take the whole gateway down. The throwaway compile
    process dies by the signal instead; the gateway refuses the policy and lives on."""
    good = engine.version
    (shipped_copy / "extra.rego").write_text(rego)
    assert await engine.reload() is False
    error = engine.last_reload["error"]
    assert "crashed" in error and signal_name in error
    assert engine.version == good
    assert (await engine.decide(inp("call", "worker", "docs.search"))).allow


def test_compile_check_times_out(tmp_path: Path) -> None:
    write_policy(tmp_path, ECHO_POLICY)
    slow = [sys.executable, "-c", "import time; time.sleep(10)"]
    with pytest.raises(PolicyError, match="longer than 0.5 s"):
        check_in_subprocess(read_sources(tmp_path), ["gateway/decision"], timeout=0.5, command=slow)


async def test_hot_reload_picks_up_a_changed_file(engine: EmbeddedEngine, shipped_copy: Path) -> None:
    before = engine.version
    email_call = inp("call", "worker", "docs.search")
    assert (await engine.decide(email_call)).allow
    data = json.loads((shipped_copy / "data.json").read_text())
    data["roles"]["worker"]["tools"] = []
    (shipped_copy / "data.json").write_text(json.dumps(data))
    for _ in range(500):  # the watcher polls every 0.05 s; allow up to 10 s
        if engine.version != before:
            break
        await asyncio.sleep(0.02)
    assert engine.version != before
    assert engine.last_reload["ok"] is True and engine.last_reload["version"] == engine.version
    decision = await engine.decide(email_call)
    assert not decision.allow and 'role "worker" may not use tool "docs.search"' in decision.reasons


async def test_test_files_do_not_affect_the_served_policy(engine: EmbeddedEngine, shipped_copy: Path) -> None:
    before = engine.version
    (shipped_copy / "broken_test.rego").write_text("package gateway_test\nthis is not rego\n")
    assert await engine.reload() is False
    assert engine.version == before and engine.last_reload["ok"] is True


async def test_concurrent_decisions_each_get_their_own_answer(tmp_path: Path) -> None:
    """One regopy interpreter shared between threads mixes up inputs; one per thread must not.

    The engine decides on the event loop's thread, but several loops (replicas in one
    process, the test servers) and the CLI evaluate from other threads at once."""
    write_policy(tmp_path, ECHO_POLICY)
    engine = EmbeddedEngine(tmp_path, reload=False)
    await engine.start()
    try:
        decisions = await asyncio.gather(*(engine.decide({"n": n}) for n in range(500)))
        policy = engine._policy
        assert policy is not None
        with ThreadPoolExecutor(max_workers=8) as pool:
            raws = list(pool.map(lambda n: rego.evaluate(policy, {"n": n}, DECISION_PATH)[0], range(2000)))
    finally:
        await engine.stop()
    for n, decision in enumerate(decisions):
        assert decision.reasons == [f"n={n}"]
        assert decision.allow is (n % 2 == 0)
    for n, raw in enumerate(raws):
        assert raw["result"]["reasons"] == [f"n={n}"], raw


async def test_stopped_engine_is_unavailable(engine: EmbeddedEngine) -> None:
    await engine.stop()
    with pytest.raises(PolicyUnavailable):
        await engine.decide({})


def test_build_engine_follows_the_configuration(tmp_path: Path) -> None:
    embedded = build_engine(parse_config({"policy": {"dir": "p"}}, tmp_path), None)
    assert isinstance(embedded, EmbeddedEngine) and embedded.directory == tmp_path / "p"
    opa = build_engine(parse_config({"policy": {"engine": "opa", "opa_url": "http://127.0.0.1:8282"}}), None)
    assert isinstance(opa, OpaEngine)


# --- decision log ------------------------------------------------------------------------


async def test_decision_log_lines_have_opas_shape_and_mask_secrets(
    engine: EmbeddedEngine, tmp_path: Path
) -> None:
    secret_input = inp(
        "call",
        "worker",
        "docs.search",
        arguments={"query": "q", "api_key": "k-1", "nested": [{"db_password": "p-1"}]},
        request={
            "method": "GET",
            "path": "/tools/docs.search",
            "headers": {
                "Authorization": "Bearer t",
                "cookie": "c",
                "idempotency-key": '"k"',
                "accept": "*/*",
            },
        },
    )
    decision = await engine.decide(secret_input, labels={"trace_id": "abc"})
    assert engine.decision_log is not None
    engine.decision_log.flush()
    lines = (tmp_path / "decisions.jsonl").read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["decision_id"] == decision.decision_id
    assert entry["path"] == "gateway/decision"
    assert entry["result"] == decision.raw["result"] and entry["result"]["allow"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", entry["timestamp"])
    assert entry["labels"]["id"] == "gw-test" and entry["labels"]["trace_id"] == "abc"
    assert "version" in entry["labels"]
    assert isinstance(entry["metrics"]["timer_rego_query_eval_ns"], int)
    assert entry["bundles"]["policies"]["revision"] == engine.version
    logged = entry["input"]
    assert logged["arguments"] == {"query": "q", "api_key": "***", "nested": [{"db_password": "***"}]}
    headers = logged["request"]["headers"]
    assert headers == {"Authorization": "***", "cookie": "***", "idempotency-key": "***", "accept": "*/*"}
    assert "/input/arguments/nested/0/db_password" in entry["masked"]
    assert "k-1" not in lines[0] and "Bearer" not in lines[0] and "p-1" not in lines[0]
    assert secret_input["arguments"]["api_key"] == "k-1"  # the caller's input is not modified


def test_decision_log_omits_result_when_undefined(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "sub" / "log.jsonl")
    decision = decision_from_result({}, policy_version="v1")
    for _ in range(50):
        log.record(decision, {"token": "x"})
    log.close()
    lines = (tmp_path / "sub" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 50
    entry = json.loads(lines[0])
    assert "result" not in entry and entry["input"] == {"token": "***"}


def test_decision_log_without_a_path_writes_nothing(tmp_path: Path) -> None:
    log = DecisionLog(None)
    entry = log.record(Decision.deny("no", policy_version="v"), {"password": "x"})
    log.close()
    assert entry["input"] == {"password": "***"} and list(tmp_path.iterdir()) == []


# --- policy test / policy eval -------------------------------------------------------------


def test_shipped_policy_tests_pass() -> None:
    results = run_policy_tests(SHIPPED)
    assert [r for r in results if r.outcome != "PASS"] == []
    assert len([r for r in results if r.name.startswith("data.gateway_test.test_")]) >= 20


def test_policy_tests_report_fail_and_error(shipped_copy: Path) -> None:
    (shipped_copy / "more_test.rego").write_text(
        "package more_test\nimport rego.v1\n"
        "test_ok if true\n"
        "test_false if false\n"
        "test_value := 3\n"
        "test_conflict := 1 if true\ntest_conflict := 2 if true\n"
    )
    results = {r.name: r for r in run_policy_tests(shipped_copy)}
    assert results["data.more_test.test_ok"].outcome == "PASS"
    assert results["data.more_test.test_false"].outcome == "FAIL"
    assert results["data.more_test.test_value"].outcome == "FAIL"
    assert results["data.more_test.test_value"].message == "result 3"
    assert results["data.more_test.test_conflict"].outcome == "ERROR"


def test_policy_tests_report_a_compile_error(shipped_copy: Path) -> None:
    (shipped_copy / "gateway.rego").write_text("package gateway\ndecision := {\n")
    [result] = run_policy_tests(shipped_copy)
    assert result.outcome == "ERROR" and "does not compile" in result.message


def test_evaluate_file(tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text(json.dumps(inp("commit", "committer", "payments.transfer", envelope=ENV)))
    out = evaluate_file(SHIPPED, path)
    assert out["allow"] is True and out["require_approval"] is True
    assert out["raw"]["result"]["reasons"] == out["reasons"] == ['tool "payments.transfer" is high risk']
    assert out["policy_version"] == read_sources(SHIPPED).version
    path.write_text("{not json")
    with pytest.raises(ValueError):
        evaluate_file(SHIPPED, path)


@pytest.mark.parametrize("amount", [2**64 + 5, 2**63, 10**30, -(2**63) - 1, 2**63 - 1])
async def test_integers_wider_than_64_bits_reach_rego_exactly(engine: EmbeddedEngine, amount: int) -> None:
    # regopy's Input wraps integers to 64 bits: 2**64 + 5 would arrive as 5 and skip approval.
    expected = amount > 1000
    for _ in range(2):  # evaluated, then possibly from the memo
        decision = await engine.decide(
            inp("commit", "committer", "email.send", envelope=ENV, arguments={"amount": amount})
        )
        assert decision.allow is True
        assert decision.require_approval is expected, decision.reasons
        if expected:
            assert decision.reasons == [f"amount {amount} exceeds the approval limit of 1000"]


async def test_a_wide_integer_does_not_change_how_text_compares(tmp_path: Path) -> None:
    # Inputs with integers wider than 64 bits reach rego-cpp as JSON text: its non-ASCII
    # strings must still be themselves there, not "\u00e9" escapes.
    write_policy(
        tmp_path / "p",
        "package gateway\nimport rego.v1\ndefault allow := true\n"
        'allow := false if input.to == "ceo@société.fr"\n'
        'decision := {"allow": allow, "reasons": []}\n',
    )
    engine = EmbeddedEngine(tmp_path / "p", reload=False, memo_size=0)
    await engine.start()
    try:
        assert (await engine.decide({"to": "ceo@société.fr"})).allow is False
        assert (await engine.decide({"to": "ceo@société.fr", "pad": 2**64})).allow is False
        assert (await engine.decide({"to": "cfo@société.fr", "pad": 2**64})).allow is True
    finally:
        await engine.stop()
