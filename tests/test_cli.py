"""The command line: real subprocesses, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AGENT_GATEWAY_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_keys_init_then_token(tmp_path: Path) -> None:
    out = run("keys", "init", cwd=tmp_path, check=True).stdout
    assert "issuer.key.pem" in out
    assert (tmp_path / "keys" / "agents" / "planner.key.pem").exists()
    assert "already exist" in run("keys", "init", cwd=tmp_path, check=True).stdout
    token = run("token", "--role", "planner", "--sub", "planner-7", "--ttl", "60", cwd=tmp_path, check=True)
    header = jwt.get_unverified_header(token.stdout.strip())
    claims = jwt.decode(token.stdout.strip(), options={"verify_signature": False})
    assert header["typ"] == "role+jwt" and header["alg"] == "EdDSA"
    assert claims["role"] == "planner" and claims["sub"] == "planner-7"
    assert claims["exp"] - claims["iat"] == 60


def test_token_without_keys_is_a_one_line_error(tmp_path: Path) -> None:
    result = run("token", "--role", "worker", "--sub", "w", cwd=tmp_path)
    assert result.returncode != 0
    assert "keys init" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_config_is_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text('[gateway]\naudiense = "typo"\n')
    for command in (["serve", "--port", "1"], ["check-config", "gateway.toml"]):
        result = run(*command, cwd=tmp_path)
        assert result.returncode != 0
        assert "unknown key 'gateway.audiense'" in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_check_config_accepts_the_shipped_file() -> None:
    result = run("check-config", str(REPO / "gateway.toml"), cwd=REPO, check=True)
    assert result.stdout.startswith("ok:")


def test_policy_test_passes_on_the_shipped_policies() -> None:
    result = run("policy", "test", "--dir", str(REPO / "policies"), cwd=REPO, check=True)
    assert "PASS:" in result.stdout
    assert "FAIL" not in result.stdout


def test_policy_test_fails_on_a_failing_rule(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    for name in ("gateway.rego", "data.json"):
        (policies / name).write_text((REPO / "policies" / name).read_text())
    (policies / "extra_test.rego").write_text(
        "package gateway_test\nimport rego.v1\n\n"
        "test_always_fails if {\n  1 == 2\n}\n\n"
        "test_ok if {\n  1 == 1\n}\n"
    )
    result = run("policy", "test", "--dir", str(policies), cwd=tmp_path)
    assert result.returncode == 1
    assert "FAIL: " in result.stdout and "test_always_fails" in result.stdout
    assert "PASS: " in result.stdout and "test_ok" in result.stdout


@pytest.mark.parametrize(("role", "allowed"), [("worker", True), ("intruder", False)])
def test_policy_eval_prints_the_decision(tmp_path: Path, role: str, allowed: bool) -> None:
    input_file = tmp_path / "input.json"
    input_file.write_text(
        json.dumps(
            {
                "action": "call",
                "principal": {"sub": "w1", "role": role, "iss": "agent-gateway-dev"},
                "tool": {"name": "docs.search", "effect": "read", "risk": "low"},
                "arguments": {"q": "x"},
                "envelope": None,
            }
        )
    )
    result = run("policy", "eval", "--input", str(input_file), "--dir", str(REPO / "policies"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["allow"] is allowed


def test_policy_eval_bad_input_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "input.json").write_text("{not json")
    result = run("policy", "eval", "--input", "input.json", "--dir", str(REPO / "policies"), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
