"""Handoff envelopes (contract §2): a delegating agent's signed statement of what a
receiving agent is asked to do, carried as `Agent-Handoff: <compact JWS>`.

`EnvelopeVerifier.verify` authenticates first and reads claims second:

    not a compact JWS, wrong `typ`, `alg` not pinned for the signer, `iss` not a
    registered agent, unknown `kid`, bad signature    → 401 envelope-signature-invalid
    any claim missing or malformed (all are named)   → 422 envelope-invalid
    `sub` is not the caller                          → 403 envelope-subject-mismatch
    `iss` is the caller (a self-signed handoff)      → 403 envelope-self-issued
    `exp` has passed                                 → 422 deadline-passed
    `goal_revision` is not the task goal's revision  → 409 stale-goal

An envelope is a delegation for the life of a task step, so its `jti` may be presented
on several calls until `exp`; the deadline bounds replay, and `sub` pins the receiver.
Whether a call needs an envelope at all is policy's decision: an absent header is None.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from gateway.config import Agent, Config, ConfigError
from gateway.identity import CACHE_ENTRIES, CACHE_SECONDS, KeySet, Principal
from gateway.keys import KeyLoadError, PrivateKey, algorithm_for, kid_for
from gateway.problems import Conflict, EnvelopeUnauthenticated, Forbidden, Unprocessable

ENVELOPE_TYPE = "handoff+jwt"
HEADER = "Agent-Handoff"
MAX_ENVELOPE_BYTES = 8192
LEEWAY = 30  # seconds of clock skew tolerated on iat and exp
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

GoalLookup = Callable[[str], Awaitable[int | None]]


class EnvelopeInvalid(Unprocessable):
    name, title = "envelope-invalid", "Handoff envelope is missing or has malformed fields"


class DeadlinePassed(Unprocessable):
    name, title = "deadline-passed", "Handoff deadline has passed"


class StaleGoal(Conflict):
    name, title = "stale-goal", "Handoff was issued against an older goal revision"


class EnvelopeSubjectMismatch(Forbidden):
    name, title = "envelope-subject-mismatch", "Handoff envelope is addressed to another agent"


class EnvelopeSelfIssued(Forbidden):
    name, title = "envelope-self-issued", "An agent cannot sign its own handoff envelope"


@dataclass(frozen=True)
class Envelope:
    claims: dict[str, Any]
    iss: str
    sub: str
    task_id: str
    jti: str
    deadline: int
    goal_revision: int
    kid: str


async def no_goal(task_id: str) -> int | None:
    """Until versioned memory holds goals, no task has one (its revision is then 0)."""
    return None


def mint_envelope(
    private_key: PrivateKey,
    *,
    iss: str,
    sub: str,
    task_id: str,
    audience: str,
    deadline_seconds: int = 300,
    schema_version: str = "1",
    preconditions: Sequence[Any] = (),
    expected_artifact: str = "result",
    parent: str | None = None,
    goal_revision: int = 0,
    kid: str | None = None,
) -> str:
    """Sign a handoff from agent `iss` to agent `sub`; `parent` defaults to the task."""
    now = int(time.time())
    claims = {
        "iss": iss,
        "sub": sub,
        "aud": audience,
        "iat": now,
        "exp": now + deadline_seconds,
        "jti": uuid.uuid4().hex,
        "task_id": task_id,
        "schema_version": schema_version,
        "preconditions": list(preconditions),
        "expected_artifact": expected_artifact,
        "parent": parent if parent is not None else task_id,
        "goal_revision": goal_revision,
    }
    headers = {"typ": ENVELOPE_TYPE, "kid": kid or kid_for(private_key.public_key())}
    return jwt.encode(claims, private_key, algorithm=algorithm_for(private_key), headers=headers)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def claim_errors(
    claims: dict[str, Any], audience: str, versions: Iterable[str], now: int
) -> list[dict[str, str]]:
    """Every missing or malformed claim, each named; nothing is coerced."""
    supported = list(versions)
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("iss", _text, "must be a non-empty string"),
        ("sub", _text, "must be a non-empty string"),
        ("aud", lambda v: v == audience, f"must be {audience!r}"),
        ("iat", lambda v: _is_int(v) and v <= now + LEEWAY, "must be an integer time, not in the future"),
        ("exp", _is_int, "must be an integer time"),
        ("jti", _text, "must be a non-empty string"),
        ("task_id", _text, "must be a non-empty string"),
        ("schema_version", lambda v: isinstance(v, str) and v in supported, f"must be one of {supported}"),
        (
            "preconditions",
            lambda v: isinstance(v, list) and all(isinstance(item, str | dict) for item in v),
            "must be a list of strings or objects",
        ),
        ("expected_artifact", _text, "must be a non-empty string"),
        ("parent", _text, "must be a non-empty string"),
        ("goal_revision", lambda v: _is_int(v) and v >= 0, "must be a non-negative integer"),
    ]
    errors = []
    for name, valid, rule in checks:
        if name not in claims:
            errors.append({"field": name, "message": "is missing"})
        elif not valid(claims[name]):
            errors.append({"field": name, "message": rule})
    if not errors and claims["exp"] <= claims["iat"]:
        errors.append({"field": "exp", "message": "must be later than iat"})
    return errors


_JWS = jwt.PyJWS()


def _payload(raw: bytes) -> dict[str, Any]:
    claims = json.loads(raw)
    if not isinstance(claims, dict):
        raise ValueError("the payload is not a JSON object")
    return claims


def _unauthenticated(detail: str) -> EnvelopeUnauthenticated:
    return EnvelopeUnauthenticated(detail)


class AgentKeys:
    """Registered agents and their keys: `[[agents]]`, or the dev folder `keys/agents/`.

    With no `[[agents]]`, an agent `<id>` exists while `keys/agents/<id>.pub.pem` does;
    the folder is read when an id is first seen, so keys created at start are found.
    """

    def __init__(self, agents: Sequence[Agent], config: Config, keys_dir: Path) -> None:
        self._configured = bool(agents)
        self._dev_dir = Path(keys_dir) / "agents"
        self._agents: dict[str, tuple[tuple[str, ...], KeySet]] = {}
        for agent in agents:
            if agent.id in self._agents:
                raise ConfigError(f"agents: duplicate id {agent.id!r}")
            if not agent.keys and not agent.jwks_url:
                raise ConfigError(f"agents: {agent.id!r} has neither keys nor jwks_url")
            try:
                keyset = KeySet(files=[config.path(path) for path in agent.keys], jwks_url=agent.jwks_url)
            except KeyLoadError as error:
                raise ConfigError(f"agents: {agent.id!r}: {error}") from None
            self._agents[agent.id] = (tuple(agent.algorithms), keyset)

    def lookup(self, agent_id: str) -> tuple[tuple[str, ...], KeySet] | None:
        found = self._agents.get(agent_id)
        if found is not None or self._configured or not AGENT_ID.match(agent_id):
            return found
        if not (self._dev_dir / f"{agent_id}.pub.pem").is_file():
            return None
        # The id is a plain file name (no glob characters), so the pattern matches one file.
        found = (("EdDSA",), KeySet(patterns=[(self._dev_dir, f"{agent_id}.pub.pem")]))
        self._agents[agent_id] = found
        return found


class EnvelopeVerifier:
    def __init__(self, config: Config, keys_dir: Path, goal_revision_of: GoalLookup | None = None) -> None:
        self.audience = config.gateway.audience
        self.versions = tuple(config.gateway.supported_schema_versions)
        self.agents = AgentKeys(config.agents, config, keys_dir)
        # Public so the goal store can be plugged in after the gateway is built.
        self.goal_revision_of: GoalLookup = goal_revision_of or no_goal
        # Authenticated envelopes by their exact text, for CACHE_SECONDS (like role tokens): a
        # removed agent key stops working within that time. Claims are re-checked on every use.
        self._authenticated: OrderedDict[str, tuple[dict[str, Any], str, float]] = OrderedDict()

    async def verify(
        self, header: str | None, principal: Principal, *, known_goal: tuple[str, int | None] | None = None
    ) -> Envelope | None:
        """`known_goal`: (task id, its goal's current revision) when the caller has just read it."""
        if header is None:
            return None
        claims, kid = await self._authenticated_claims(header.strip())
        now = int(time.time())
        errors = claim_errors(claims, self.audience, self.versions, now)
        if errors:
            listed = ", ".join(f"{error['field']} {error['message']}" for error in errors)
            raise EnvelopeInvalid(
                f"handoff envelope is invalid: {listed}",
                errors=errors,
                invalid_fields=[error["field"] for error in errors],
            )
        if claims["sub"] != principal.sub:
            raise EnvelopeSubjectMismatch("handoff envelope is addressed to another agent than the caller")
        if claims["iss"] == principal.sub:
            raise EnvelopeSelfIssued("the receiving agent signed its own handoff envelope")
        if claims["exp"] + LEEWAY < now:
            raise DeadlinePassed(
                f"handoff deadline passed {now - claims['exp']} s ago", deadline=claims["exp"]
            )
        if known_goal is not None and known_goal[0] == claims["task_id"]:
            current = known_goal[1]
        else:
            current = await self.goal_revision_of(claims["task_id"])
        expected = 0 if current is None else current
        if claims["goal_revision"] != expected:
            raise StaleGoal(
                f"handoff acts on goal revision {claims['goal_revision']}; "
                f"the goal of task {claims['task_id']!r} is at revision {expected}",
                task_id=claims["task_id"],
                goal_revision=expected,
            )
        return Envelope(
            claims=claims,
            iss=claims["iss"],
            sub=claims["sub"],
            task_id=claims["task_id"],
            jti=claims["jti"],
            deadline=claims["exp"],
            goal_revision=claims["goal_revision"],
            kid=kid,
        )

    async def _authenticated_claims(self, token: str) -> tuple[dict[str, Any], str]:
        cached = self._authenticated.get(token)
        if cached is not None and time.monotonic() - cached[2] < CACHE_SECONDS:
            return dict(cached[0]), cached[1]
        claims, kid = await self._authenticate(token)
        self._authenticated.pop(token, None)
        if len(self._authenticated) >= CACHE_ENTRIES:
            self._authenticated.popitem(last=False)
        self._authenticated[token] = (dict(claims), kid, time.monotonic())
        return claims, kid

    async def _authenticate(self, token: str) -> tuple[dict[str, Any], str]:
        if not token or len(token) > MAX_ENVELOPE_BYTES or token.count(".") != 2:
            raise _unauthenticated(f"{HEADER} is not a compact JWS")
        try:
            header = jwt.get_unverified_header(token)
            unverified = _payload(_JWS.decode(token, options={"verify_signature": False}))
        except (jwt.PyJWTError, ValueError):
            raise _unauthenticated(f"{HEADER} is malformed") from None
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in (ENVELOPE_TYPE, "application/" + ENVELOPE_TYPE):
            raise _unauthenticated(f"envelope header typ must be {ENVELOPE_TYPE!r}")
        iss = unverified.get("iss")
        found = self.agents.lookup(iss) if isinstance(iss, str) else None
        if found is None:
            raise _unauthenticated("envelope issuer is not a registered agent")
        algorithms, keyset = found
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in algorithms:
            raise _unauthenticated("envelope algorithm is not allowed for this agent")
        key = await keyset.key_for(kid)
        if key is None or not isinstance(kid, str):
            raise _unauthenticated("envelope signing key (kid) is unknown for this agent")
        if algorithm_for(key) != alg:
            raise _unauthenticated("envelope algorithm does not match the key type")
        try:
            # The signature only: every claim is checked by claim_errors, all at once.
            claims = _payload(_JWS.decode(token, key, algorithms=[alg]))
        except (jwt.PyJWTError, ValueError):
            raise _unauthenticated("envelope signature is invalid") from None
        return claims, kid
