"""`agent-gateway policy test` and `policy eval`, on the embedded engine.

Like `opa test`: every top-level rule named `test_*` in the folder's modules
(`*_test.rego` included) is evaluated; `true` passes, anything else fails, an
evaluation error is an error. The files are compiled in a throwaway process
first, exactly as the gateway does before serving them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.policy import rego
from gateway.policy.decision import DECISION_PATH, PolicyError, decision_from_result

_TEST_RULE = re.compile(r"^(test_\w*)\b(?!\s*\()", re.MULTILINE)  # rules, not functions

Outcome = Literal["PASS", "FAIL", "ERROR"]


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest test class

    name: str
    outcome: Outcome
    message: str = ""
    duration_ms: float = 0.0


def find_tests(sources: rego.PolicySources) -> list[str]:
    """Entrypoints (`pkg/path/test_rule`) of every test rule, in file order."""
    entrypoints: list[str] = []
    for name, package in sources.packages().items():
        for rule in _TEST_RULE.findall(sources.modules[name]):
            entrypoint = f"{package.replace('.', '/')}/{rule}"
            if entrypoint not in entrypoints:
                entrypoints.append(entrypoint)
    return entrypoints


def _outcome(raw: dict[str, Any]) -> tuple[Outcome, str]:
    if "error" in raw:
        return "ERROR", str(raw["error"])
    if "result" not in raw:
        return "FAIL", "undefined"
    if raw["result"] is True:
        return "PASS", ""
    return "FAIL", f"result {json.dumps(raw['result'])}"


def run_policy_tests(directory: Path, *, timeout: float = 60.0) -> list[TestResult]:
    try:
        sources = rego.read_sources(directory, include_tests=True)
        entrypoints = find_tests(sources)
        if not entrypoints:
            return []
        policy = rego.compile_policy(sources, entrypoints, timeout=timeout)
    except PolicyError as error:
        return [TestResult("(compile)", "ERROR", str(error))]
    results: list[TestResult] = []
    interpreter = rego.runtime_interpreter()  # no input is set, as under `opa test`
    for entrypoint in entrypoints:
        started = time.perf_counter()
        raw = rego.query(interpreter, policy, entrypoint)
        outcome, message = _outcome(raw)
        name = "data." + entrypoint.replace("/", ".")
        results.append(TestResult(name, outcome, message, (time.perf_counter() - started) * 1000))
    return results


def evaluate_file(directory: Path, input_path: Path, *, timeout: float = 60.0) -> dict[str, Any]:
    """Evaluate `data.gateway.decision` for the JSON input in `input_path`.

    Returns the decision as the gateway reads it (`allow`, `reasons`, ...,
    `policy_version`), the raw Rego result under `raw`, and the eval time.
    Raises OSError or ValueError for the input file, PolicyError for the policy.
    """
    input_json = json.dumps(json.loads(input_path.read_text(encoding="utf-8")))
    sources = rego.read_sources(directory)
    policy = rego.compile_policy(sources, [DECISION_PATH], timeout=timeout)
    raw, eval_ns = rego.evaluate(policy, input_json, DECISION_PATH)
    decision = decision_from_result(raw, policy_version=policy.version)
    summary = {key: value for key, value in asdict(decision).items() if key != "decision_id"}
    return {**summary, "metrics": {"timer_rego_query_eval_ns": eval_ns}}
