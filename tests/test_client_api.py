"""The agent client: its public API is pinned, problems become typed exceptions, requests follow §4–7."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import gateway.client
from gateway.client import (
    AsyncGatewayClient,
    CommitResult,
    Credentials,
    GatewayClient,
    GatewayProblem,
    problem_from_response,
)
from tests.conftest import gateway_config
from tests.servers import run_server

EXPORTED = [
    "AsyncGatewayClient",
    "BadRequest",
    "CommitInProgress",
    "CommitRequired",
    "CommitResult",
    "Credentials",
    "DeadlinePassed",
    "EnvelopeInvalid",
    "EnvelopeSelfIssued",
    "EnvelopeSignatureInvalid",
    "EnvelopeSubjectMismatch",
    "Forbidden",
    "GatewayClient",
    "GatewayProblem",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "InputInvalid",
    "NotFound",
    "PayloadTooLarge",
    "PolicyDenied",
    "PolicyUnavailable",
    "PreconditionFailed",
    "PreconditionRequired",
    "RateLimited",
    "RevisionNotReached",
    "StaleDependency",
    "StaleGoal",
    "TokenInvalid",
    "UpstreamUnavailable",
    "problem_from_response",
]
METHODS = [
    "approval", "approvals", "call_tool", "commit", "compensate", "decide_approval", "get_intent",
    "handoff", "ledger", "memory_get", "propose", "trace", "verify",
]  # fmt: skip
PROBLEM_NAMES = {
    "bad-request": "BadRequest",
    "commit-in-progress": "CommitInProgress",
    "commit-required": "CommitRequired",
    "deadline-passed": "DeadlinePassed",
    "envelope-invalid": "EnvelopeInvalid",
    "envelope-self-issued": "EnvelopeSelfIssued",
    "envelope-signature-invalid": "EnvelopeSignatureInvalid",
    "envelope-subject-mismatch": "EnvelopeSubjectMismatch",
    "forbidden": "Forbidden",
    "idempotency-key-missing": "IdempotencyKeyMissing",
    "idempotency-key-reused": "IdempotencyKeyReused",
    "input-invalid": "InputInvalid",
    "not-found": "NotFound",
    "payload-too-large": "PayloadTooLarge",
    "policy-denied": "PolicyDenied",
    "policy-unavailable": "PolicyUnavailable",
    "precondition-failed": "PreconditionFailed",
    "precondition-required": "PreconditionRequired",
    "rate-limited": "RateLimited",
    "revision-not-reached": "RevisionNotReached",
    "stale-dependency": "StaleDependency",
    "stale-goal": "StaleGoal",
    "token-invalid": "TokenInvalid",
    "upstream-unavailable": "UpstreamUnavailable",
}
BASE = "https://agent-gateway.dev/problems/"


def test_exported_members() -> None:
    assert gateway.client.__all__ == EXPORTED
    for name in EXPORTED:
        assert hasattr(gateway.client, name), name
    for cls in (GatewayClient, AsyncGatewayClient):
        public = sorted(
            name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))
        )
        extra = {"close"} if cls is GatewayClient else {"aclose"}
        assert public == sorted([*METHODS, *extra]), cls.__name__


def problem(name: str, status: int = 409, **extra: Any) -> httpx.Response:
    body = {"type": BASE + name, "title": name, "status": status, "detail": f"{name} happened", **extra}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


@pytest.mark.parametrize(("name", "class_name"), sorted(PROBLEM_NAMES.items()))
def test_each_problem_name_has_its_exception(name: str, class_name: str) -> None:
    error = problem_from_response(problem(name, intent_id="in_1", decision_id="d1"))
    assert type(error) is getattr(gateway.client, class_name)
    assert isinstance(error, GatewayProblem)
    assert (error.status, error.type, error.problem, error.detail) == (
        409,
        BASE + name,
        name,
        f"{name} happened",
    )
    assert (error.intent_id, error.decision_id) == ("in_1", "d1")


def test_policy_problems_are_forbidden() -> None:
    for name in ("policy-denied", "commit-required", "envelope-subject-mismatch", "envelope-self-issued"):
        assert isinstance(problem_from_response(problem(name, 403)), gateway.client.Forbidden)


def test_unknown_problems_and_bare_errors_are_the_base_class() -> None:
    for response in (
        problem("brand-new-problem"),
        httpx.Response(409, json={"type": "https://elsewhere.example/p/stale-goal", "title": "x"}),
        httpx.Response(500, text="<html>boom</html>"),
    ):
        error = problem_from_response(response)
        assert type(error) is GatewayProblem
        assert error is not None and error.status == response.status_code
    assert problem_from_response(httpx.Response(200, json={})) is None


class Recorder:
    """A MockTransport handler answering from a table and remembering each request."""

    def __init__(self, answers: dict[tuple[str, str], httpx.Response]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.raw_path.decode().partition("?")[0]
        return self.answers.get((request.method, path), httpx.Response(404))


def test_requests_follow_the_contract(keys_dir: Path) -> None:
    recorder = Recorder(
        {
            ("POST", "/intents"): httpx.Response(201, json={"intent_id": "in_1", "status": "proposed"}),
            ("POST", "/intents/in_1/verify"): httpx.Response(200, json={"status": "verified"}),
            ("POST", "/intents/in_1/commit"): httpx.Response(
                202,
                json={"status": "pending_approval", "approval_id": "ap_1", "intent_id": "in_1"},
                headers={"Location": "/approvals/ap_1", "Gateway-Decision-Id": "d-9"},
            ),
            ("GET", "/approvals"): httpx.Response(200, json={"approvals": [{"approval_id": "ap_1"}]}),
            ("GET", "/memory/scratch/notes/a%2Fb"): httpx.Response(200, json={"value": 1, "revision": 2}),
            ("POST", "/tools/docs.search/sub/path"): httpx.Response(500, json={"tool": "failed"}),
        }
    )
    credentials = Credentials.from_dev_keys(keys_dir, sub="planner", role="planner")
    with GatewayClient(
        "http://gw.test", token=credentials, transport=httpx.MockTransport(recorder)
    ) as client:
        envelope = client.handoff("verifier", "t-1", goal_revision=0)
        assert client.propose(
            "t-1", "email.send", {"to": "x"}, depends_on=[{"namespace": "n"}], envelope=envelope
        )
        client.verify("in_1", "accept", "looks right")
        result = client.commit("in_1", idempotency_key='my "key"')
        assert client.approvals() == [{"approval_id": "ap_1"}]
        assert client.memory_get("scratch/notes", "a/b", min_revision=2)["revision"] == 2
        assert client.call_tool("docs.search", json={"q": 1}, path="/sub/path").status_code == 500
    assert result == CommitResult(
        status_code=202,
        body={"status": "pending_approval", "approval_id": "ap_1", "intent_id": "in_1"},
        intent_id="in_1",
        idempotency_key='my "key"',
        approval_id="ap_1",
        location="/approvals/ap_1",
        decision_id="d-9",
    )
    assert result.pending
    propose, verify, commit, approvals, memory, _tool = recorder.requests
    assert json.loads(propose.content) == {
        "task_id": "t-1", "tool": "email.send", "arguments": {"to": "x"}, "depends_on": [{"namespace": "n"}],
    }  # fmt: skip
    assert propose.headers["agent-handoff"] == envelope and "agent-handoff" not in verify.headers
    assert propose.headers["authorization"].startswith("Bearer ey")
    assert json.loads(verify.content) == {"verdict": "accept", "reason": "looks right"}
    assert commit.headers["idempotency-key"] == '"my \\"key\\""'
    assert approvals.url.params["status"] == "pending"
    assert memory.url.params["min_revision"] == "2"


def test_generated_idempotency_keys_and_a_carried_envelope() -> None:
    recorder = Recorder({("POST", "/intents/in_1/commit"): httpx.Response(200, json={"status": "committed"})})
    client = GatewayClient(
        "http://gw.test", token="tok", envelope="env", transport=httpx.MockTransport(recorder)
    )
    first, second = client.commit("in_1"), client.commit("in_1")
    assert not first.pending and first.body == {"status": "committed"}
    assert first.idempotency_key != second.idempotency_key
    assert recorder.requests[0].headers["idempotency-key"] == f'"{first.idempotency_key}"'
    assert recorder.requests[0].headers["agent-handoff"] == "env"
    assert recorder.requests[0].headers["authorization"] == "Bearer tok"
    with pytest.raises(ValueError):
        client.commit("in_1", idempotency_key="k" * 256)
    with pytest.raises(ValueError):
        client.handoff("worker", "t")  # a bare token has no agent key


def test_gateway_problems_raise_from_every_route() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return problem("stale-dependency", 409, intent_id="in_7")

    client = GatewayClient("http://gw.test", token="tok", transport=httpx.MockTransport(handler))
    with pytest.raises(gateway.client.StaleDependency) as caught:
        client.commit("in_7")
    assert caught.value.intent_id == "in_7"
    with pytest.raises(gateway.client.StaleDependency):
        client.call_tool("docs.search")


# --- against the real app --------------------------------------------------------------------


async def test_async_client_against_the_app(app_client: Any, keys_dir: Path, effects: Any) -> None:
    _, app = app_client
    planner = Credentials.from_dev_keys(keys_dir, sub="planner", role="planner")
    worker = Credentials.from_dev_keys(keys_dir, sub="worker", role="worker")
    transport = httpx.ASGITransport(app=app)
    async with AsyncGatewayClient("http://gw.test", token=worker, transport=transport) as client:
        client.envelope = planner.handoff("worker", "t-1")
        response = await client.call_tool("docs.search", params={"q": "a"}, method="GET")
        assert response.json()["query"] == "a"
        with pytest.raises(gateway.client.EnvelopeSubjectMismatch):
            await client.call_tool("docs.search", method="GET", envelope=planner.handoff("verifier", "t-1"))
        with pytest.raises(gateway.client.EnvelopeSelfIssued):
            await client.call_tool("docs.search", method="GET", envelope=worker.handoff("worker", "t-1"))
        with pytest.raises(gateway.client.InputInvalid) as caught:
            await client.call_tool("payments.transfer", json={"amount": "1"})
        assert "/amount" in [entry["path"] for entry in caught.value.body["errors"]]
        with pytest.raises(gateway.client.CommitRequired):
            await client.call_tool("email.send", json={"to": "a@example.com", "subject": "s", "body": "b"})
    assert effects.calls["docs.search"] == 1 and effects.effects == []


async def test_sync_client_against_a_served_app(
    tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    from gateway.app import create_app

    app = create_app(gateway_config(tmp_path, database_url, upstream[0], keys_dir=keys_dir))
    worker = Credentials.from_dev_keys(keys_dir, sub="worker", role="worker")
    with run_server(app) as url, GatewayClient(url, token=worker) as client:
        envelope = Credentials.from_dev_keys(keys_dir, sub="planner", role="planner").handoff("worker", "t")
        assert (
            client.call_tool("docs.search", params={"q": "b"}, method="GET", envelope=envelope).status_code
            == 200
        )
        with pytest.raises(gateway.client.EnvelopeSignatureInvalid):
            client.call_tool("docs.search", method="GET", envelope=envelope[:-4] + "AAAA")
        with pytest.raises(gateway.client.TokenInvalid):
            GatewayClient(url, token="not-a-jwt").call_tool("docs.search", method="GET")
    assert effects.calls["docs.search"] == 1
