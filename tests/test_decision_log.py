"""The decision log's lines: exactly what `json.dumps` of the masked entry gives, whatever the
input holds, written in order, never dropped, one write per batch, and rotation followed."""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from gateway.policy import DecisionLog
from gateway.policy import decision_log as module
from gateway.policy.decision import decision_from_result
from gateway.policy.decision_log import MASK, mask_secrets

RESULT = {"result": {"allow": True, "reasons": [], "require_approval": False, "approvals_required": 0}}


def reference_mask(value: Any, path: str, masked: list[str]) -> Any:
    """The masking walk as first written: a full copy, key by key."""
    if isinstance(value, dict):
        copy: dict[Any, Any] = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key)
            part = name.replace("~", "~0").replace("/", "~1")
            if module._is_secret(name):
                copy[key] = MASK
                masked.append(f"{path}/{part}")
            elif isinstance(item, dict | list):
                copy[key] = reference_mask(item, f"{path}/{part}", masked)
            else:
                copy[key] = item
        return copy
    if isinstance(value, list):
        return [reference_mask(item, f"{path}/{index}", masked) for index, item in enumerate(value)]
    return value


def reference_line(log: DecisionLog, line: str, raw: dict[str, Any], input: Any, labels: Any) -> str:
    """What the line must be: `json.dumps` of the entry built the first way, same id and time."""
    written = json.loads(line)
    masked: list[str] = []
    entry: dict[str, Any] = {
        "decision_id": written["decision_id"],
        "path": "gateway/decision",
        "input": reference_mask(input, "/input", masked),
        "timestamp": written["timestamp"],
        "labels": {**log.labels, **(labels or {})},
        "metrics": {"timer_rego_query_eval_ns": 7},
        "bundles": {"policies": {"revision": "v1"}},
    }
    if "result" in raw:
        entry["result"] = raw["result"]
    if "error" in raw:
        entry["error"] = {"message": str(raw["error"])}
    if masked:
        entry["masked"] = masked
    return json.dumps(entry, separators=(",", ":"), default=str)


class Mapping(dict):  # type: ignore[type-arg]
    pass


class Items(list):  # type: ignore[type-arg]
    pass


INPUTS: list[Any] = [
    {"action": "call", "arguments": {"q": "x"}},
    {"password": "p", "nested": {"a/b": {"api_key": "k", "x~y": [{"token": 1}]}}},
    {"headers": {"Authorization": "Bearer t", "Cookie": "c", "accept": "*/*"}},
    {"text": "café ☕ \u2028 \x7f \x00 \ud800", "ключ": {"secret": "s"}},
    {"floats": [0.0, -0.0, 1e-5, 2.5e-7, 1e-4, 0.1, 1e16, 1e300, float("nan"), float("inf"), -float("inf")]},
    {"ints": [2**70, -(2**64), True, False, None]},
    {1: "one", None: {"password": "p"}, 2.5e-7: 2, False: 3, 1.5: {"a": 1}},
    {"tuple": (1, {"token": "t"}), "set": {"a"}, "bytes": b"x", "when": datetime.date(2026, 1, 2)},
    {"sub": Mapping(a=1, secret="s"), "list": Items([1, {"password": "p"}]), "od": OrderedDict(b=1)},
    {"empty": {}, "none": None, "list": [], "deep": [[[{"credential": "c"}]]]},
    [{"password": "p"}, "x"],
    "just a string",
]


@pytest.mark.parametrize("index", range(len(INPUTS)))
@pytest.mark.parametrize(
    "raw",
    [RESULT, {}, {"error": "boom ☠"}, {"result": {"allow": False, "reasons": ["é", 1e-6], "x": (1,)}}],
    ids=["result", "undefined", "error", "odd-result"],
)
def test_lines_are_what_json_dumps_gives(tmp_path: Path, index: int, raw: dict[str, Any]) -> None:
    log = DecisionLog(tmp_path / "log.jsonl", instance_id="gw", linger=0)
    input = INPUTS[index]
    labels = [None, {"trace_id": "t"}, {"id": "override", "n": 1e-5}][index % 3]
    before = repr(input)
    for _ in range(3):  # the second and later times, key names are known
        log.record(decision_from_result(raw, policy_version="v1"), input, labels=labels, eval_ns=7)
    log.close()
    lines = (tmp_path / "log.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4
    for line in lines[:3]:
        assert line.decode("utf-8") == reference_line(log, line.decode("utf-8"), raw, input, labels)
    assert repr(input) == before  # the caller's input is not modified


def test_masking_shares_what_has_no_secret_and_copies_what_has() -> None:
    input = {
        "plain": {"a": [1, 2], "b": {"c": "d"}},
        "mixed": {"keep": {"x": 1}, "inner": [{"note": "n"}, {"db_password": "p"}]},
    }
    for _ in range(2):
        masked: list[str] = []
        logged = mask_secrets(input, "/input", masked)
        assert masked == ["/input/mixed/inner/1/db_password"]
        assert logged["plain"] is input["plain"]
        assert logged["mixed"] is not input["mixed"] and logged["mixed"]["keep"] is input["mixed"]["keep"]
        assert logged["mixed"]["inner"][0] is input["mixed"]["inner"][0]
        assert logged["mixed"]["inner"][1] == {"db_password": MASK}
        assert input["mixed"]["inner"][1] == {"db_password": "p"}
    assert mask_secrets(input["plain"], "", []) is input["plain"]


def test_lines_are_queued_in_order_and_never_dropped(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "log.jsonl", max_queue=3, linger=0.001)
    decision = decision_from_result(RESULT, policy_version="v1")

    def produce(worker: int) -> None:
        for n in range(200):
            log.record(decision, {"worker": worker, "n": n})

    threads = [threading.Thread(target=produce, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.flush()
    seen = [json.loads(line)["input"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(seen) == 800
    for worker in range(4):
        assert [item["n"] for item in seen if item["worker"] == worker] == list(range(200))
    log.close()


def test_a_batch_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        writes.append(data)
        return real_write(fd, data)

    monkeypatch.setattr(module.os, "write", write)
    log = DecisionLog(tmp_path / "log.jsonl", linger=0.5)
    decision = decision_from_result(RESULT, policy_version="v1")
    for n in range(100):
        log.record(decision, {"n": n})
    log.flush()
    assert len(writes) == 1 and writes[0].count(b"\n") == 100 and writes[0].endswith(b"\n")
    log.close()


def test_a_rotated_or_removed_file_is_followed_and_close_drains(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = DecisionLog(path, linger=0)
    decision = decision_from_result(RESULT, policy_version="v1")
    log.record(decision, {"n": 1})
    log.flush()
    path.rename(tmp_path / "log.jsonl.1")
    log.record(decision, {"n": 2})
    log.flush()
    path.unlink()
    log.record(decision, {"n": 3})
    log.close()
    assert [
        json.loads(line)["input"]["n"] for line in (tmp_path / "log.jsonl.1").read_text().splitlines()
    ] == [1]
    assert [json.loads(line)["input"]["n"] for line in path.read_text().splitlines()] == [3]
    log.record(decision, {"n": 4})  # a closed log starts a writer again
    log.close()
    assert [json.loads(line)["input"]["n"] for line in path.read_text().splitlines()] == [3, 4]


def test_the_fast_serializer_is_in_use() -> None:
    # pydantic-core is installed with pydantic: its `to_json` passed the import-time check.
    assert module._TO_JSON is not None
