"""The embedded engine's decision memo: hits only where provably the same decision."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.policy import DecisionLog
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.memo import DecisionMemo, Scan, blank_comments_and_strings, scan_module, scan_modules
from gateway.policy.rego import read_sources
from tests.conftest import SHIPPED

ENVELOPE = {"iss": "planner-1", "sub": "agent-1", "task_id": "t-1", "goal_revision": 1, "schema_version": "1"}


def commit_input(amount: Any = 10, **changes: Any) -> dict[str, Any]:
    """Shaped like gateway/intents.py::decide builds it for a commit."""
    value: dict[str, Any] = {
        "action": "commit",
        "principal": {"sub": "agent-9", "role": "committer", "iss": "agent-gateway-dev"},
        "tool": {"name": "email.send", "effect": "write", "risk": "medium"},
        "arguments": {"to": "a@example.com", "amount": amount},
        "envelope": ENVELOPE,
        "intent": {"intent_id": "i-1", "task_id": "t-1", "depends_on": [], "memory_writes": []},
        "approval": None,
        "memory": {"goals/t-1": {"revision": 1}},
        "request": {"method": "POST", "path": "/intents/i-1/commit", "headers": {"traceparent": "00-a"}},
        "time": "2025-01-01T00:00:00+00:00",
        "rate_limit": {"limit": 100, "remaining": 99},
    }
    value.update(changes)
    return value


def write_policy(folder: Path, rego: str, data: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gateway.rego").write_text(rego, encoding="utf-8")
    if data is not None:
        (folder / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


@pytest.fixture
async def engine(shipped_copy: Path, tmp_path: Path) -> AsyncIterator[EmbeddedEngine]:
    log = DecisionLog(tmp_path / "decisions.jsonl", instance_id="gw-test")
    engine = EmbeddedEngine(shipped_copy, decision_log=log, reload=False)
    await engine.start()
    yield engine
    await engine.stop()
    log.close()


async def started(folder: Path, **options: Any) -> EmbeddedEngine:
    engine = EmbeddedEngine(folder, reload=False, **options)
    await engine.start()
    assert engine.last_reload["ok"] is True, engine.last_reload
    return engine


def log_lines(engine: EmbeddedEngine, tmp_path: Path) -> list[dict[str, Any]]:
    assert engine.decision_log is not None
    engine.decision_log.flush()
    return [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]


# --- (a) fields the policy does not read do not matter ------------------------------


async def test_unread_fields_hit_the_memo(engine: EmbeddedEngine, tmp_path: Path) -> None:
    assert engine.memo.enabled and engine.last_reload["memo"] == "on"
    assert ("time",) not in engine.memo.scan.paths and ("request",) not in engine.memo.scan.paths
    first_input = commit_input()
    second_input = commit_input(
        time="2025-06-30T12:00:00+00:00",
        request={"method": "POST", "path": "/intents/i-2/commit", "headers": {}},
        rate_limit=None,
        approval={"approver": "someone"},
        principal={"sub": "agent-other", "role": "committer", "iss": "elsewhere"},
        arguments={"to": "b@example.com", "amount": 10},
    )
    first = await engine.decide(first_input)
    second = await engine.decide(second_input, labels={"trace_id": "t"})
    assert (engine.memo.hits, engine.memo.misses) == (1, 1)
    assert first.allow and not first.require_approval
    assert (second.allow, second.reasons, second.require_approval, second.approvals_required) == (
        first.allow,
        first.reasons,
        first.require_approval,
        first.approvals_required,
    )
    assert second.raw == first.raw and second.raw is not first.raw
    assert second.decision_id != first.decision_id and second.policy_version == engine.version
    # Each decision has its own log line with its own full input; the hit is labelled.
    lines = log_lines(engine, tmp_path)
    assert [line["decision_id"] for line in lines] == [first.decision_id, second.decision_id]
    assert lines[0]["metrics"]["timer_rego_query_eval_ns"] > 0 and "memo" not in lines[0]["labels"]
    assert lines[1]["metrics"]["timer_rego_query_eval_ns"] == 0
    assert lines[1]["labels"]["memo"] == "hit" and lines[1]["labels"]["trace_id"] == "t"
    assert lines[1]["input"]["time"] == second_input["time"]
    assert lines[1]["input"]["principal"]["sub"] == "agent-other"
    assert lines[1]["result"] == lines[0]["result"]


async def test_memo_size_zero_always_evaluates(shipped_copy: Path) -> None:
    engine = await started(shipped_copy, memo_size=0)
    try:
        for _ in range(3):
            assert (await engine.decide(commit_input())).allow
        assert not engine.memo.enabled and engine.memo.hits == 0
        assert engine.last_reload["memo"] == "off: the memo size is 0"
    finally:
        await engine.stop()


# --- (b) fields the policy reads do matter -----------------------------------------------


async def test_read_fields_change_the_decision(engine: EmbeddedEngine) -> None:
    small = await engine.decide(commit_input(10))
    large = await engine.decide(commit_input(5000))
    assert small.allow and not small.require_approval and small.reasons == []
    assert large.allow and large.require_approval and large.approvals_required == 1
    assert large.reasons == ["amount 5000 exceeds the approval limit of 1000"]
    assert (engine.memo.hits, engine.memo.misses) == (0, 2)
    # Served again from the memo, each keeps its own answer.
    assert (await engine.decide(commit_input(5000))).require_approval
    assert not (await engine.decide(commit_input(10))).require_approval
    assert engine.memo.hits == 2


def variants() -> list[dict[str, Any]]:
    tools = [
        {"name": "email.send", "effect": "write", "risk": "medium"},
        {"name": "payments.transfer", "effect": "irreversible", "risk": "high"},
        {"name": "docs.search", "effect": "read", "risk": "low"},
    ]
    found: list[dict[str, Any]] = []
    for action in ("commit", "call", "propose", "list_tools"):
        for role in ("committer", "planner", "worker"):
            for tool in tools:
                for amount in (10, 1000, 1001, "lots", None):
                    for envelope in (ENVELOPE, None):
                        principal = {"sub": "a", "role": role, "iss": "x"}
                        found.append(
                            commit_input(
                                amount, action=action, principal=principal, tool=tool, envelope=envelope
                            )
                        )
    found.append(commit_input(arguments=None))
    found.append(commit_input(arguments=[1, 2]))
    found.append(commit_input(tool=None, action="list_tools"))
    return found


async def test_memoized_decisions_equal_evaluated_ones(shipped_copy: Path) -> None:
    """Differential: every input, in random order and twice, against an engine without memo."""
    memoized = await started(shipped_copy)
    plain = await started(shipped_copy, memo_size=0)
    try:
        inputs = variants() * 2
        random.Random(7).shuffle(inputs)
        for value in inputs:
            got, want = await memoized.decide(value), await plain.decide(value)
            assert (got.allow, got.reasons, got.require_approval, got.approvals_required) == (
                want.allow,
                want.reasons,
                want.require_approval,
                want.approvals_required,
            ), value
        assert memoized.memo.hits >= len(inputs) // 2
    finally:
        await memoized.stop()
        await plain.stop()


NULL_POLICY = """package gateway
import rego.v1
default present := false
present if input.a == null
decision := {"allow": present, "reasons": []}
"""


async def test_absent_and_null_are_different_keys(tmp_path: Path) -> None:
    engine = await started(write_policy(tmp_path, NULL_POLICY))
    try:
        assert (await engine.decide({"a": None})).allow is True
        assert (await engine.decide({})).allow is False
        assert (await engine.decide({"a": {"b": None}})).allow is False
        assert (await engine.decide({"b": 1})).allow is False
        assert engine.memo.hits == 1  # {} and {"b": 1} both lack input.a
    finally:
        await engine.stop()


async def test_inputs_that_are_not_plain_json_are_evaluated(tmp_path: Path) -> None:
    engine = await started(write_policy(tmp_path, NULL_POLICY))
    try:
        for _ in range(2):
            assert (await engine.decide({"a": None, "t": (1, 2)})).allow is True
            assert (await engine.decide({"a": None, "f": float("nan")})).allow is True
        assert engine.memo.hits == 0 and engine.memo.bypassed == 4
    finally:
        await engine.stop()


async def test_a_hit_never_hides_an_input_regopy_would_reject(tmp_path: Path) -> None:
    engine = await started(write_policy(tmp_path, NULL_POLICY))
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    try:
        assert (await engine.decide({"a": None})).allow is True  # kept in the memo
        # Unread fields that regopy cannot convert: a lone surrogate, deep nesting.
        rejected = await engine.decide({"a": None, "s": "\ud800"})
        assert rejected.allow is False and "input rejected" in " ".join(rejected.reasons)
        assert (await engine.decide({"a": None, "deep": deep})).allow is True
        assert engine.memo.hits == 0 and engine.memo.bypassed == 2
    finally:
        await engine.stop()


async def test_errors_are_never_memoized(tmp_path: Path) -> None:
    conflict = (
        'package gateway\nimport rego.v1\ndecision := {"allow": true}\ndecision := {"allow": false} if true\n'
    )
    engine = await started(write_policy(tmp_path, conflict))
    try:
        for _ in range(3):
            decision = await engine.decide({"x": 1})
            assert not decision.allow and "policy evaluation failed" in decision.reasons[0]
        assert engine.memo.enabled and engine.memo.hits == 0
    finally:
        await engine.stop()


def test_memo_is_a_bounded_lru() -> None:
    memo = DecisionMemo("v1", Scan((("n",),)), size=2)
    keys = [memo.key("v1", {"n": n}) for n in range(3)]
    assert all(key is not None for key in keys)
    for n, key in enumerate(keys[:2]):
        assert key is not None
        memo.put(key, {"result": {"allow": True, "n": n}})
    assert keys[0] is not None and memo.get(keys[0]) == {"result": {"allow": True, "n": 0}}  # 0 is newest
    assert keys[2] is not None
    memo.put(keys[2], {"result": {"allow": True, "n": 2}})
    assert keys[1] is not None and memo.get(keys[1]) is None  # the least recently used went
    assert memo.stats()["entries"] == 2
    got = memo.get(keys[0])
    assert got is not None
    got["result"]["allow"] = False  # a caller's copy, not the kept result
    assert memo.get(keys[0]) == {"result": {"allow": True, "n": 0}}
    assert memo.key("v2", {"n": 0}) != keys[0]  # the version is part of the key


# --- (c) policies that cannot be memoized ------------------------------------------------

CLOCK_POLICY = """package gateway
import rego.v1
decision := {"allow": input.a == 1, "reasons": [sprintf("%d", [time.now_ns()])]}
"""

BARE_INPUT_POLICY = """package gateway
import rego.v1
doc := input
decision := {"allow": object.get(doc, "secret", 0) == 1, "reasons": []}
"""


async def test_a_clock_reading_policy_is_never_memoized(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "decisions.jsonl")
    engine = await started(write_policy(tmp_path / "p", CLOCK_POLICY), decision_log=log)
    try:
        assert not engine.memo.enabled and "time.now_ns" in str(engine.memo.reason)
        assert engine.last_reload["memo"].startswith("off: gateway.rego: uses 'time.now_ns'")
        reasons = [(await engine.decide({"a": 1})).reasons[0] for _ in range(3)]
        assert len(set(reasons)) == 3  # evaluated every time: the clock moved
        assert engine.memo.hits == 0
        assert all(line["metrics"]["timer_rego_query_eval_ns"] > 0 for line in log_lines(engine, tmp_path))
    finally:
        await engine.stop()
        log.close()


async def test_a_policy_reading_bare_input_is_never_memoized(tmp_path: Path) -> None:
    engine = await started(write_policy(tmp_path, BARE_INPUT_POLICY))
    try:
        assert not engine.memo.enabled and "`input` other than" in str(engine.memo.reason)
        assert (await engine.decide({"secret": 1})).allow is True
        assert (await engine.decide({"secret": 0})).allow is False
        assert (await engine.decide({"secret": 1})).allow is True
        assert engine.memo.hits == 0
    finally:
        await engine.stop()


# --- (d) a reload never serves the old policy's results -------------------------------


async def test_editing_data_json_invalidates_the_memo(engine: EmbeddedEngine, shipped_copy: Path) -> None:
    before = engine.version
    assert (await engine.decide(commit_input(5000))).require_approval
    assert (await engine.decide(commit_input(5000))).require_approval and engine.memo.hits == 1
    data = json.loads((shipped_copy / "data.json").read_text())
    data["approval"]["amount_limit"] = 10_000
    (shipped_copy / "data.json").write_text(json.dumps(data))
    assert await engine.reload() is True and engine.version != before
    after = await engine.decide(commit_input(5000))
    assert after.allow and not after.require_approval and after.policy_version == engine.version
    assert (engine.memo.hits, engine.memo.misses) == (0, 1)


async def test_editing_a_rego_module_invalidates_the_memo(engine: EmbeddedEngine, shipped_copy: Path) -> None:
    before = engine.version
    assert not (await engine.decide(commit_input(1000))).require_approval
    assert not (await engine.decide(commit_input(1000))).require_approval and engine.memo.hits == 1
    module = shipped_copy / "gateway.rego"
    text = module.read_text()
    assert text.count("amount > approval_limit") == 1
    module.write_text(text.replace("amount > approval_limit", "amount >= approval_limit"))
    assert await engine.reload() is True and engine.version != before
    assert (await engine.decide(commit_input(1000))).require_approval
    assert engine.memo.hits == 0


def test_the_version_covers_every_served_file(shipped_copy: Path) -> None:
    versions = {read_sources(shipped_copy).version}
    for name, edit in [("data.json", " \n"), ("gateway.rego", "\n# x\n"), ("mcp.rego", "\n")]:
        with (shipped_copy / name).open("a") as file:
            file.write(edit)
        versions.add(read_sources(shipped_copy).version)
    assert len(versions) == 4


# --- (e) the scanner --------------------------------------------------------------------


def paths(text: str) -> set[tuple[str, ...]]:
    found, reason = scan_module(text)
    assert reason is None, reason
    return found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# input is everything; input[x]\nx := input.a", {("a",)}),
        ('msg := "input.x and input and input[k]"\ny := input.b', {("b",)}),
        ('msg := "say \\"input\\" # not a comment"\ny := input.b', {("b",)}),
        ("msg := `raw input[k]\n input.q`\ny := input.b", {("b",)}),
        ("y := input.a[b].c", {("a",)}),
        ("y := input.memory[goal_address].revision", {("memory",)}),
        ("ok if is_object(input.tool)", {("tool",)}),
        (
            "v := input.arguments.amount\nw := input.principal.role",
            {("arguments", "amount"), ("principal", "role")},
        ),
        ("y := x.input\nz := input_x\nw := input.time", {("time",)}),
        ('y := object.get(input.a, "k", 1)\nz := strings.any_prefix_match(input.b, [])', {("a",), ("b",)}),
        ("import data.lib\ny := lib.f(input.a)\nz := data.lib.g(input.b)", {("a",), ("b",)}),
        ("import rego.v1\ny := 1", set()),
    ],
)
def test_scanner_finds_the_paths_read(text: str, expected: set[tuple[str, ...]]) -> None:
    assert paths(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "some k; input[k]",
        "x := input",
        "y := count(input)",
        'y := object.get(input, "a", 0)',
        "p if { q with input as {} }",
        "x := input\n.a",
        "import input",
        "y := time.now_ns()",
        "y := time.parse_rfc3339_ns(input.t)",
        "y := http.send({})",
        'y := rand.intn("k", 10)',
        'y := uuid.rfc4122("k")',
        "y := opa.runtime()",
        "y := net.lookup_ip_addr(input.h)",
        "y := io.jwt.decode_verify(input.t, {})",
        "y := crypto.x509.parse_and_verify_certificates(input.c)",
        'p if { trace("x") }',
        "p if { print(input.a) }",
        "y := custom.fn(input.a)",
        'y := $"amount {input.arguments.amount}"',
    ],
)
def test_scanner_turns_the_memo_off(text: str) -> None:
    found, reason = scan_module(text)
    assert reason is not None and found == set()


def test_scanner_blanks_comments_and_strings() -> None:
    code = blank_comments_and_strings('a := "in#put" # input\nb := `x\ny` # c\nc := "\\"" # d')
    assert code == 'a := "" \nb := "" \nc := "" '


def test_one_module_turns_the_whole_policy_off() -> None:
    scan = scan_modules({"a.rego": "x := input.a.b\ny := input.a", "b.rego": "z := input.c.d"})
    assert scan.enabled and scan.paths == (("a",), ("c", "d"))
    scan = scan_modules({"a.rego": "x := input.a", "b.rego": "z := time.now_ns()"})
    assert not scan.enabled and scan.reason is not None and scan.reason.startswith("b.rego:")


def test_shipped_policy_is_keyed_by_what_it_reads() -> None:
    scan = scan_modules(read_sources(SHIPPED).modules)
    assert scan.enabled
    assert set(scan.paths) == {
        ("action",),
        ("principal", "role"),
        ("tool",),
        ("arguments", "amount"),
        ("arguments", "task_id"),
        ("envelope",),
        ("intent", "depends_on"),
        ("intent", "task_id"),
        ("memory",),
    }


def test_keys_distinguish_absent_null_and_types() -> None:
    memo = DecisionMemo("v", Scan((("a",), ("b", "c"))))
    keys = [
        memo.key("v", value)
        for value in (
            {},
            {"a": None},
            {"a": 1},
            {"a": 1.0},
            {"a": "1"},
            {"a": True},
            {"b": {"c": None}},
            {"b": 1},
        )
    ]
    assert len(set(keys)) == len(keys) - 1  # only {} and {"b": 1} (no b.c either way) coincide
    assert keys[0] == keys[-1]
    same = memo.key("v", {"a": {"y": 1, "x": [1, {"q": 2, "p": 3}]}, "z": 9})
    assert same == memo.key("v", {"z": 0, "a": {"x": [1, {"p": 3, "q": 2}], "y": 1}})
    assert memo.key("v", {"a": {1: 2}}) is None and memo.key("v", {"a": {1, 2}}) is None
