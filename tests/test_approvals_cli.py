"""`agent-gateway approvals list|show|approve|deny` over HTTP against a gateway on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from gateway.cli import main
from gateway.envelopes import mint_envelope
from gateway.keys import load_private_key
from tests.conftest import gateway_config, role_token
from tests.servers import run_server

TRANSFER = {"from_account": "acc-1", "to_account": "supplier-4711", "amount": 2500, "currency": "EUR"}


@pytest.fixture
def live(tmp_path: Path, keys_dir: Path, upstream: tuple[str, Any]) -> Iterator[str]:
    from gateway.app import create_app

    config = gateway_config(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path}/gateway.db", upstream[0], keys_dir=keys_dir
    )
    with run_server(create_app(config)) as url:
        yield url


def pending_transfer(url: str, keys_dir: Path) -> str:
    task = f"task-{uuid.uuid4().hex[:10]}"

    def headers(role: str, key: str | None = None) -> dict[str, str]:
        planner_key = load_private_key(keys_dir / "agents" / "planner.key.pem")
        envelope = mint_envelope(
            planner_key, iss="planner", sub=f"{role}-1", task_id=task, audience="agent-gateway"
        )
        found = {"Authorization": f"Bearer {role_token(keys_dir, role)}", "Agent-Handoff": envelope}
        return found | ({"Idempotency-Key": key} if key else {})

    with httpx.Client(base_url=url) as http:
        proposal = {"task_id": task, "tool": "payments.transfer", "arguments": TRANSFER}
        intent_id = http.post("/intents", json=proposal, headers=headers("planner")).json()["intent_id"]
        verdict = {"verdict": "accept", "reason": "ok"}
        assert http.post(f"/intents/{intent_id}/verify", json=verdict, headers=headers("verifier")).is_success
        committed = http.post(f"/intents/{intent_id}/commit", headers=headers("committer", key=task))
        assert committed.status_code == 202, committed.text
        return str(committed.json()["approval_id"])


def approvals(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["approvals", *args], env=env)


def test_list_show_approve_and_one_line_errors(live: str, keys_dir: Path, effects: Any) -> None:
    approval_id = pending_transfer(live, keys_dir)
    dev = ("--url", live, "--keys-dir", str(keys_dir), "--as")

    listed = approvals("list", *dev, "alice")
    assert listed.exit_code == 0, listed.output
    assert (
        approval_id in listed.stdout
        and "payments.transfer" in listed.stdout
        and "0/1 approvals" in listed.stdout
    )
    shown = approvals("show", approval_id, *dev, "alice")
    assert shown.exit_code == 0, shown.output
    for expected in ("supplier-4711", "high risk", "planner-1 (planner)", "committer-1 (committer)"):
        assert expected in shown.stdout
    assert approvals("list", "--json", *dev, "alice").stdout.lstrip().startswith("[")

    refused = approvals("approve", approval_id, *dev, "committer-1")
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1
    assert "403 self-approval" in refused.stderr
    assert effects.calls["payments.transfer"] == 0

    # A token from the environment works like --token.
    token = role_token(keys_dir, "approver", "alice")
    approved = approvals(
        "approve", approval_id, "--url", live, "-r", "invoice ok", env={"AGENT_GATEWAY_TOKEN": token}
    )
    assert approved.exit_code == 0, approved.output
    assert "approved; intent" in approved.stdout and "is committed" in approved.stdout
    assert effects.calls["payments.transfer"] == 1

    again = approvals("deny", approval_id, *dev, "bob", "-r", "too late")
    assert again.exit_code == 1 and again.stderr.count("\n") == 1
    assert "409 approval-closed" in again.stderr
    assert approvals("list", "--status", "approved", *dev, "bob").stdout.count(approval_id) == 1
    assert "no pending approvals" in approvals("list", *dev, "bob").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--url", "http://127.0.0.1:9", "--token", "x.y.z"], "cannot reach the gateway"),
        (["list", "--url", "http://127.0.0.1:9"], "no approver token"),
        (["deny", "ap_1", "--token", "t"], "Missing option '--reason'"),
        (["list", "--token", "t", "--as", "alice"], "give --token or --as, not both"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENT_GATEWAY_TOKEN", raising=False)
    result = approvals(*args)
    assert result.exit_code in (1, 2) and message in result.stderr, result.output
    assert "Traceback" not in result.output


def test_a_non_approver_token_is_refused(live: str, keys_dir: Path) -> None:
    result = approvals("list", "--url", live, "--token", role_token(keys_dir, "committer"))
    assert result.exit_code == 1 and "403 forbidden" in result.stderr and result.stderr.count("\n") == 1
