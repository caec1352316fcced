"""Handoff envelopes (contract §2): every forgery is refused, on the verifier and through the app."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway import problems
from gateway.cli import main
from gateway.config import ConfigError, parse_config
from gateway.envelopes import (
    DeadlinePassed,
    EnvelopeInvalid,
    EnvelopeSelfIssued,
    EnvelopeSubjectMismatch,
    EnvelopeVerifier,
    StaleGoal,
    mint_envelope,
)
from gateway.identity import Principal
from gateway.keys import generate_dev_keys, kid_for, load_private_key
from tests.conftest import gateway_config, role_token

AUD = "agent-gateway"
REQUIRED = (
    "iss", "sub", "aud", "iat", "exp", "jti", "task_id", "schema_version",
    "preconditions", "expected_artifact", "parent", "goal_revision",
)  # fmt: skip
WORKER = Principal(sub="worker", role="worker", iss="agent-gateway-dev", jti="j", exp=0, claims={})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def agent_key(keys_dir: Path, agent: str) -> Any:
    return load_private_key(keys_dir / "agents" / f"{agent}.key.pem")


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": "planner", "sub": "worker", "aud": AUD, "iat": now, "exp": now + 300, "jti": "e-1",
        "task_id": "t-1", "schema_version": "1", "preconditions": ["docs indexed"],
        "expected_artifact": "summary", "parent": "t-1", "goal_revision": 0,
    }  # fmt: skip
    return {**base, **changes}


def sign(payload: dict[str, Any], key: Any, **header: Any) -> str:
    headers = {"typ": "handoff+jwt", "kid": kid_for(key.public_key()), **header}
    return jwt.encode(payload, key, algorithm="EdDSA", headers=headers)


@pytest.fixture
def verifier(keys_dir: Path, tmp_path: Path) -> EnvelopeVerifier:
    return EnvelopeVerifier(parse_config({}, base_dir=tmp_path), keys_dir)


def problem_of(error: problems.GatewayError) -> dict[str, Any]:
    return error.to_problem()


# --- the verifier alone --------------------------------------------------------------------------


async def test_absent_header_is_none_for_policy_to_judge(verifier: EnvelopeVerifier) -> None:
    assert await verifier.verify(None, WORKER) is None


async def test_valid_handoff_is_accepted(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    token = mint_envelope(
        agent_key(keys_dir, "planner"), iss="planner", sub="worker", task_id="t-9", audience=AUD,
        preconditions=["index fresh"], expected_artifact="summary", parent="in_abc",
    )  # fmt: skip
    envelope = await verifier.verify(token, WORKER)
    assert envelope is not None
    assert (envelope.iss, envelope.sub, envelope.task_id, envelope.goal_revision) == (
        "planner",
        "worker",
        "t-9",
        0,
    )
    assert envelope.claims["parent"] == "in_abc" and envelope.claims["preconditions"] == ["index fresh"]
    assert envelope.deadline - int(time.time()) in range(295, 301)
    assert envelope.kid == kid_for(agent_key(keys_dir, "planner").public_key())


async def test_parent_defaults_to_the_task(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    token = mint_envelope(
        agent_key(keys_dir, "planner"), iss="planner", sub="worker", task_id="t", audience=AUD
    )
    envelope = await verifier.verify(token, WORKER)
    assert envelope is not None and envelope.claims["parent"] == "t"


def forged(keys_dir: Path) -> dict[str, str]:
    """Each forgery that must fail authentication (401), by name."""
    planner = agent_key(keys_dir, "planner")
    stranger = ed25519.Ed25519PrivateKey.generate()
    good = sign(claims(), planner)
    head, body, signature = good.split(".")
    tampered_body = _b64(json.dumps(claims(task_id="t-other")).encode())
    none_header = _b64(
        json.dumps({"alg": "none", "typ": "handoff+jwt", "kid": kid_for(planner.public_key())}).encode()
    )
    public_pem = planner.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_header = {"alg": "HS256", "typ": "handoff+jwt", "kid": kid_for(planner.public_key())}
    hs_signing = f"{_b64(json.dumps(hs_header).encode())}.{body}".encode()
    hs_signature = _b64(hmac.new(public_pem, hs_signing, hashlib.sha256).digest())
    return {
        "unregistered key": sign(claims(), stranger),
        "unregistered key with a registered kid": sign(claims(), stranger, kid=kid_for(planner.public_key())),
        "unregistered issuer": sign(claims(iss="mallory"), stranger),
        "issuer as a path": sign(claims(iss="../issuer"), planner),
        "tampered claim": f"{head}.{tampered_body}.{signature}",
        "alg none": f"{none_header}.{body}.",
        "HS256 with the public key as secret": f"{hs_signing.decode()}.{hs_signature}",
        "role token type": sign(claims(), planner, typ="role+jwt"),
        "no kid": jwt.encode(claims(), planner, algorithm="EdDSA", headers={"typ": "handoff+jwt"}),
        "signed by another registered agent": sign(claims(), agent_key(keys_dir, "verifier"),
                                                   kid=kid_for(planner.public_key())),
        "not a JWS": "hello",
        "payload not an object": sign_raw(b"[1, 2]", planner),
        "oversized": "a" * 9000 + ".b.c",
    }  # fmt: skip


def sign_raw(payload: bytes, key: Any) -> str:
    return jwt.api_jws.encode(
        payload, key, algorithm="EdDSA", headers={"typ": "handoff+jwt", "kid": kid_for(key.public_key())}
    )


async def test_forgeries_fail_authentication(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    for name, token in forged(keys_dir).items():
        with pytest.raises(problems.EnvelopeUnauthenticated) as caught:
            await verifier.verify(token, WORKER)
        assert caught.value.status == 401, name
        assert problem_of(caught.value)["type"].endswith("/envelope-signature-invalid"), name


@pytest.mark.parametrize("field", REQUIRED)
async def test_each_missing_field_is_named(verifier: EnvelopeVerifier, keys_dir: Path, field: str) -> None:
    payload = claims()
    del payload[field]
    if field == "iss":  # without iss the signer is unknown: authentication fails first
        with pytest.raises(problems.EnvelopeUnauthenticated):
            await verifier.verify(sign(payload, agent_key(keys_dir, "planner")), WORKER)
        return
    with pytest.raises(EnvelopeInvalid) as caught:
        await verifier.verify(sign(payload, agent_key(keys_dir, "planner")), WORKER)
    body = problem_of(caught.value)
    assert body["status"] == 422 and body["type"].endswith("/envelope-invalid")
    assert body["invalid_fields"] == [field]
    assert body["errors"] == [{"field": field, "message": "is missing"}]
    assert field in body["detail"]


async def test_every_missing_field_is_named_at_once(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    payload = {"iss": "planner", "sub": "worker"}
    with pytest.raises(EnvelopeInvalid) as caught:
        await verifier.verify(sign(payload, agent_key(keys_dir, "planner")), WORKER)
    assert caught.value.extra["invalid_fields"] == [name for name in REQUIRED if name not in payload]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("goal_revision", "3"),
        ("goal_revision", True),
        ("goal_revision", -1),
        ("goal_revision", 1.0),
        ("schema_version", "2"),
        ("schema_version", 1),
        ("preconditions", "docs indexed"),
        ("preconditions", [1]),
        ("expected_artifact", ""),
        ("parent", None),
        ("task_id", 7),
        ("sub", ["worker"]),
        ("jti", ""),
        ("aud", "another-gateway"),
        ("aud", [AUD]),
        ("iat", int(time.time()) + 3600),
        ("iat", "now"),
        ("exp", str(int(time.time()) + 300)),
    ],
)
async def test_malformed_fields_are_never_coerced(
    verifier: EnvelopeVerifier, keys_dir: Path, field: str, value: Any
) -> None:
    token = sign(claims(**{field: value}), agent_key(keys_dir, "planner"))
    with pytest.raises(EnvelopeInvalid) as caught:
        await verifier.verify(token, WORKER)
    assert caught.value.extra["invalid_fields"] == [field]


async def test_deadline_not_after_issue_is_invalid(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    now = int(time.time())
    token = sign(claims(iat=now, exp=now), agent_key(keys_dir, "planner"))
    with pytest.raises(EnvelopeInvalid) as caught:
        await verifier.verify(token, WORKER)
    assert caught.value.extra["invalid_fields"] == ["exp"]


async def test_expired_deadline(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    now = int(time.time())
    token = sign(claims(iat=now - 600, exp=now - 120), agent_key(keys_dir, "planner"))
    with pytest.raises(DeadlinePassed) as caught:
        await verifier.verify(token, WORKER)
    body = problem_of(caught.value)
    assert body["status"] == 422 and body["type"].endswith("/deadline-passed")
    assert body["deadline"] == now - 120


async def test_envelope_for_another_agent(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    token = mint_envelope(
        agent_key(keys_dir, "planner"), iss="planner", sub="committer", task_id="t", audience=AUD
    )
    with pytest.raises(EnvelopeSubjectMismatch) as caught:
        await verifier.verify(token, WORKER)
    assert problem_of(caught.value)["status"] == 403


async def test_receiver_cannot_sign_its_own_envelope(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    token = mint_envelope(
        agent_key(keys_dir, "worker"), iss="worker", sub="worker", task_id="t", audience=AUD
    )
    with pytest.raises(EnvelopeSelfIssued) as caught:
        await verifier.verify(token, WORKER)
    assert problem_of(caught.value)["status"] == 403


async def test_goal_revision_against_the_goal_store(keys_dir: Path, tmp_path: Path) -> None:
    goals = {"t-goal": 3}

    async def goal_revision_of(task_id: str) -> int | None:
        return goals.get(task_id)

    verifier = EnvelopeVerifier(parse_config({}, base_dir=tmp_path), keys_dir, goal_revision_of)
    planner = agent_key(keys_dir, "planner")
    current = mint_envelope(
        planner, iss="planner", sub="worker", task_id="t-goal", audience=AUD, goal_revision=3
    )
    assert await verifier.verify(current, WORKER) is not None
    for task_id, revision, expected in (("t-goal", 2, 3), ("t-goal", 4, 3), ("no-goal", 1, 0)):
        token = mint_envelope(
            planner, iss="planner", sub="worker", task_id=task_id, audience=AUD, goal_revision=revision
        )
        with pytest.raises(StaleGoal) as caught:
            await verifier.verify(token, WORKER)
        body = problem_of(caught.value)
        assert body["status"] == 409 and body["type"].endswith("/stale-goal")
        assert body["goal_revision"] == expected
    no_goal = mint_envelope(planner, iss="planner", sub="worker", task_id="no-goal", audience=AUD)
    assert await verifier.verify(no_goal, WORKER) is not None


async def test_goal_store_can_be_plugged_in_later(verifier: EnvelopeVerifier, keys_dir: Path) -> None:
    async def at_five(task_id: str) -> int | None:
        return 5

    verifier.goal_revision_of = at_five
    token = mint_envelope(
        agent_key(keys_dir, "planner"), iss="planner", sub="worker", task_id="t", audience=AUD
    )
    with pytest.raises(StaleGoal):
        await verifier.verify(token, WORKER)


async def test_dev_agent_keys_created_after_start_are_found(tmp_path: Path) -> None:
    keys = tmp_path / "later"
    verifier = EnvelopeVerifier(parse_config({}, base_dir=tmp_path), keys)
    generate_dev_keys(keys, agents=["planner", "worker"])
    token = mint_envelope(agent_key(keys, "planner"), iss="planner", sub="worker", task_id="t", audience=AUD)
    assert await verifier.verify(token, WORKER) is not None


async def test_configured_agents_replace_the_dev_folder(keys_dir: Path, tmp_path: Path) -> None:
    es_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "lead.pub.pem").write_bytes(
        es_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = parse_config(
        {"agents": [{"id": "lead", "algorithms": ["ES256"], "keys": ["lead.pub.pem"]}]}, tmp_path
    )
    verifier = EnvelopeVerifier(config, keys_dir)
    token = mint_envelope(es_key, iss="lead", sub="worker", task_id="t", audience=AUD)
    envelope = await verifier.verify(token, WORKER)
    assert envelope is not None and envelope.iss == "lead"
    dev = mint_envelope(
        agent_key(keys_dir, "planner"), iss="planner", sub="worker", task_id="t", audience=AUD
    )
    with pytest.raises(problems.EnvelopeUnauthenticated):
        await verifier.verify(dev, WORKER)
    pinned = parse_config({"agents": [{"id": "lead", "keys": ["lead.pub.pem"]}]}, tmp_path)  # EdDSA only
    with pytest.raises(problems.EnvelopeUnauthenticated):
        await EnvelopeVerifier(pinned, keys_dir).verify(token, WORKER)


@pytest.mark.parametrize(
    "agents",
    [
        [{"id": "a", "keys": ["missing.pub.pem"]}],
        [{"id": "a"}],
        [{"id": "a", "keys": ["k.pub.pem"]}, {"id": "a", "keys": ["k.pub.pem"]}],
    ],
)
def test_agent_configuration_errors(tmp_path: Path, agents: list[dict[str, Any]]) -> None:
    generate_dev_keys(tmp_path / "keys", agents=["k"])
    (tmp_path / "k.pub.pem").write_bytes((tmp_path / "keys" / "agents" / "k.pub.pem").read_bytes())
    with pytest.raises(ConfigError) as caught:
        EnvelopeVerifier(parse_config({"agents": agents}, tmp_path), tmp_path / "keys")
    assert str(caught.value).startswith("agents:") and "\n" not in str(caught.value)


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_prints_a_verifiable_envelope(keys_dir: Path, tmp_path: Path) -> None:
    args = [
        "envelope", "--keys-dir", str(keys_dir), "--iss", "planner", "--sub", "worker", "--task", "t-cli",
        "--deadline", "120", "--goal-revision", "2", "--expected-artifact", "report", "--parent", "in_x",
        "--precondition", "a", "--precondition", "b",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert jwt.get_unverified_header(token)["typ"] == "handoff+jwt"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["exp"] - payload["iat"] == 120
    picked = ("task_id", "goal_revision", "expected_artifact", "parent", "preconditions")
    assert {name: payload[name] for name in picked} == {
        "task_id": "t-cli", "goal_revision": 2, "expected_artifact": "report", "parent": "in_x",
        "preconditions": ["a", "b"],
    }  # fmt: skip


async def test_cli_envelope_passes_the_verifier(keys_dir: Path, tmp_path: Path) -> None:
    args = ["envelope", "--keys-dir", str(keys_dir), "--iss", "planner", "--sub", "worker", "--task", "t"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert await EnvelopeVerifier(parse_config({}, base_dir=tmp_path), keys_dir).verify(
        result.output.strip(), WORKER
    )


@pytest.mark.parametrize("iss", ["nobody", "../issuer"])
def test_cli_refuses_a_missing_agent_key_in_one_line(keys_dir: Path, iss: str) -> None:
    args = ["envelope", "--keys-dir", str(keys_dir), "--iss", iss, "--sub", "worker", "--task", "t"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1


# --- through the real app -----------------------------------------------------------------------

PROBLEM = "application/problem+json"


def worker_headers(keys_dir: Path, envelope: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {role_token(keys_dir, 'worker', 'worker')}"}
    if envelope is not None:
        headers["Agent-Handoff"] = envelope
    return headers


def app_forgeries(keys_dir: Path) -> dict[str, tuple[str, int, str]]:
    """name → (envelope, status, problem name)."""
    planner = agent_key(keys_dir, "planner")
    now = int(time.time())
    stale = claims(goal_revision=1)
    missing = claims()
    del missing["expected_artifact"], missing["goal_revision"]
    good = sign(claims(), planner)
    head, _, signature = good.split(".")
    stranger = ed25519.Ed25519PrivateKey.generate()
    worker = agent_key(keys_dir, "worker")
    return {
        "unregistered key": (sign(claims(), stranger), 401, "envelope-signature-invalid"),
        "self-signed": (sign(claims(iss="worker"), worker), 403, "envelope-self-issued"),
        "another sub": (sign(claims(sub="committer"), planner), 403, "envelope-subject-mismatch"),
        "another audience": (sign(claims(aud="elsewhere"), planner), 422, "envelope-invalid"),
        "tampered claim": (
            f"{head}.{_b64(json.dumps(claims(sub='worker', task_id='t-2')).encode())}.{signature}",
            401, "envelope-signature-invalid",
        ),
        "expired": (sign(claims(iat=now - 900, exp=now - 300), planner), 422, "deadline-passed"),
        "missing fields": (sign(missing, planner), 422, "envelope-invalid"),
        "unknown schema version": (sign(claims(schema_version="9"), planner), 422, "envelope-invalid"),
        "stale goal revision": (sign(stale, planner), 409, "stale-goal"),
    }  # fmt: skip


async def test_valid_handoff_reaches_the_tool(app_client: Any, keys_dir: Path, effects: Any) -> None:
    client, _ = app_client
    envelope = mint_envelope(
        agent_key(keys_dir, "planner"), iss="planner", sub="worker", task_id="t", audience=AUD
    )
    response = await client.get(
        "/tools/docs.search", params={"q": "x"}, headers=worker_headers(keys_dir, envelope)
    )
    assert response.status_code == 200, response.text
    assert effects.calls["docs.search"] == 1
    assert "agent-handoff" not in {name.lower() for name in effects.headers[-1]}


async def test_forged_handoffs_never_reach_the_tool(
    app_client: Any, keys_dir: Path, effects: Any, upstream: tuple[str, Any]
) -> None:
    client, _ = app_client
    for name, (envelope, status, problem) in app_forgeries(keys_dir).items():
        response = await client.get(
            "/tools/docs.search", params={"q": name}, headers=worker_headers(keys_dir, envelope)
        )
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"].startswith(PROBLEM), name
        body = response.json()
        assert body["type"] == f"https://agent-gateway.dev/problems/{problem}", name
        if name == "missing fields":
            assert body["invalid_fields"] == ["expected_artifact", "goal_revision"]
            assert "expected_artifact" in body["detail"] and "goal_revision" in body["detail"]
        if name in ("another audience", "unknown schema version"):
            assert body["invalid_fields"] == [{"another audience": "aud"}.get(name, "schema_version")]
    # The oracle: the upstream itself saw nothing.
    assert effects.calls["docs.search"] == 0
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(f"{upstream[0]}/_effects")).json()["calls"] == {}


async def test_stale_goal_through_an_injected_goal_store(
    app_client: Any, keys_dir: Path, effects: Any
) -> None:
    client, app = app_client

    async def goal_revision_of(task_id: str) -> int | None:
        return 4 if task_id == "t-goal" else None

    app.state.gateway.envelopes.goal_revision_of = goal_revision_of
    planner = agent_key(keys_dir, "planner")
    for revision, status in ((3, 409), (4, 200)):
        envelope = mint_envelope(
            planner, iss="planner", sub="worker", task_id="t-goal", audience=AUD, goal_revision=revision
        )
        response = await client.get("/tools/docs.search", headers=worker_headers(keys_dir, envelope))
        assert response.status_code == status, response.text
    assert effects.calls["docs.search"] == 1


async def test_write_tool_arguments_failing_the_schema_are_422_with_paths(
    app_client: Any, keys_dir: Path, effects: Any
) -> None:
    client, _ = app_client
    response = await client.post(
        "/tools/payments.transfer",
        json={"from_account": "a", "amount": "5", "currency": "eur", "note": 1},
        headers={"Authorization": f"Bearer {role_token(keys_dir, 'committer', 'committer')}"},
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == "https://agent-gateway.dev/problems/input-invalid"
    assert [error["path"] for error in body["errors"]] == ["/amount", "/currency", "/note", "/to_account"]
    assert all(error["message"] for error in body["errors"])
    assert effects.effects == []


LOOKUP_SCHEMA = {
    "type": "object",
    "required": ["q"],
    "additionalProperties": False,
    "properties": {"q": {"type": "string", "minLength": 2}},
}


@pytest.fixture
async def lookup_client(tmp_path: Path, database_url: str, upstream: tuple[str, Any], keys_dir: Path) -> Any:
    """The app with a read tool whose inline schema constrains its query."""
    from gateway.app import create_app

    base = gateway_config(tmp_path, database_url, upstream[0], keys_dir=keys_dir)
    lookup = {"name": "docs.lookup", "upstream": f"{upstream[0]}/search", "input_schema": LOOKUP_SCHEMA}
    tools = [tool.model_dump() for tool in base.tools] + [lookup]
    app = create_app(gateway_config(tmp_path, database_url, upstream[0], keys_dir=keys_dir, tools=tools))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client


async def test_read_tool_input_is_checked_against_its_inline_schema(
    lookup_client: httpx.AsyncClient, keys_dir: Path, effects: Any
) -> None:
    headers = worker_headers(keys_dir)
    for params, paths in (
        ({"q": "x"}, ["/q"]),
        ({"q": "ok", "limit": "5"}, ["/limit"]),
        ({"limit": "5"}, ["/limit", "/q"]),
    ):
        response = await lookup_client.get("/tools/docs.lookup", params=params, headers=headers)
        assert response.status_code == 422, response.text
        assert [error["path"] for error in response.json()["errors"]] == paths
    assert effects.calls["docs.search"] == 0
    response = await lookup_client.get("/tools/docs.lookup", params={"q": "ok"}, headers=headers)
    assert response.status_code == 200, response.text
    assert effects.calls["docs.search"] == 1


# --- the cache of authenticated envelopes ------------------------------------------------------


async def test_a_repeated_envelope_is_authenticated_once_and_still_checked_each_time(
    keys_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    goals: dict[str, int] = {}

    async def goal_revision_of(task_id: str) -> int | None:
        return goals.get(task_id)

    verifier = EnvelopeVerifier(parse_config({}, base_dir=tmp_path), keys_dir, goal_revision_of)
    signature_checks = 0
    authenticate = verifier._authenticate

    async def counted(token: str) -> tuple[dict[str, Any], str]:
        nonlocal signature_checks
        signature_checks += 1
        return await authenticate(token)

    monkeypatch.setattr(verifier, "_authenticate", counted)
    token = sign(claims(), agent_key(keys_dir, "planner"))
    for _ in range(3):
        assert (await verifier.verify(token, WORKER)) is not None
    assert signature_checks == 1
    # What is cached is the signature check only: the receiver, the goal and the deadline
    # are judged on every use.
    other = Principal(sub="committer", role="committer", iss="agent-gateway-dev", jti="j", exp=0, claims={})
    with pytest.raises(EnvelopeSubjectMismatch):
        await verifier.verify(token, other)
    goals["t-1"] = 1
    with pytest.raises(StaleGoal):
        await verifier.verify(token, WORKER)
    goals.clear()
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 400)
    with pytest.raises(DeadlinePassed):
        await verifier.verify(token, WORKER)
    assert signature_checks == 1


async def test_a_tampered_copy_of_a_cached_envelope_is_still_refused(
    verifier: EnvelopeVerifier, keys_dir: Path
) -> None:
    token = sign(claims(), agent_key(keys_dir, "planner"))
    assert (await verifier.verify(token, WORKER)) is not None
    head, payload, signature = token.split(".")
    forged = _b64(json.dumps(claims(sub="worker", task_id="t-other")).encode())
    with pytest.raises(problems.EnvelopeUnauthenticated):
        await verifier.verify(f"{head}.{forged}.{signature}", WORKER)


async def test_the_goal_read_with_the_intent_is_used_for_its_task_only(
    verifier: EnvelopeVerifier, keys_dir: Path
) -> None:
    async def at_two(task_id: str) -> int | None:
        return 2

    verifier.goal_revision_of = at_two
    token = sign(claims(goal_revision=2), agent_key(keys_dir, "planner"))
    assert (await verifier.verify(token, WORKER, known_goal=("t-1", 2))) is not None
    with pytest.raises(StaleGoal):
        await verifier.verify(token, WORKER, known_goal=("t-1", None))
    # A revision read for another task is ignored: the goal store answers.
    assert (await verifier.verify(token, WORKER, known_goal=("t-9", None))) is not None
