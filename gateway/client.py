"""A typed client for agents: role token, handoff envelopes, tool calls and the commit protocol.

`GatewayClient` (sync) and `AsyncGatewayClient` (async, same methods awaited) wrap httpx.
Every `application/problem+json` answer becomes an exception named after its problem:

    GatewayProblem                      any problem; `.status`, `.type`, `.title`, `.detail`, `.body`
    ├── BadRequest                      400 bad-request
    ├── IdempotencyKeyMissing           400 idempotency-key-missing
    ├── TokenInvalid                    401 token-invalid
    ├── EnvelopeSignatureInvalid        401 envelope-signature-invalid
    ├── Forbidden                       403 forbidden
    │   ├── PolicyDenied                403 policy-denied
    │   ├── CommitRequired              403 commit-required
    │   ├── EnvelopeSubjectMismatch     403 envelope-subject-mismatch
    │   └── EnvelopeSelfIssued          403 envelope-self-issued
    ├── NotFound                        404 not-found
    ├── StaleGoal                       409 stale-goal
    ├── StaleDependency                 409 stale-dependency
    ├── CommitInProgress                409 commit-in-progress
    ├── RevisionNotReached              409 revision-not-reached
    ├── PreconditionFailed              412 precondition-failed
    ├── PayloadTooLarge                 413 payload-too-large
    ├── EnvelopeInvalid                 422 envelope-invalid
    ├── DeadlinePassed                  422 deadline-passed
    ├── InputInvalid                    422 input-invalid
    ├── IdempotencyKeyReused            422 idempotency-key-reused
    ├── PreconditionRequired            428 precondition-required
    ├── RateLimited                     429 rate-limited
    ├── UpstreamUnavailable             502/504 upstream-unavailable
    └── PolicyUnavailable               503 policy-unavailable

A problem name the client does not know is raised as `GatewayProblem` itself.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from gateway.envelopes import mint_envelope
from gateway.identity import DEV_ISSUER, mint_role_token
from gateway.keys import PrivateKey, load_private_key

__all__ = [
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

PROBLEM_BASE = "https://agent-gateway.dev/problems/"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
MAX_IDEMPOTENCY_KEY = 255


class GatewayProblem(Exception):
    """An RFC 9457 problem answered by the gateway."""

    name = ""

    def __init__(self, status: int, type: str, title: str, detail: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {type.removeprefix(PROBLEM_BASE)}: {detail or title}")
        self.status, self.type, self.title, self.detail, self.body = status, type, title, detail, body

    @property
    def problem(self) -> str:
        """The problem name, e.g. "stale-goal"."""
        return self.type.removeprefix(PROBLEM_BASE)

    @property
    def decision_id(self) -> str | None:
        return self.body.get("decision_id")

    @property
    def intent_id(self) -> str | None:
        return self.body.get("intent_id")


class BadRequest(GatewayProblem):
    name = "bad-request"


class IdempotencyKeyMissing(GatewayProblem):
    name = "idempotency-key-missing"


class TokenInvalid(GatewayProblem):
    name = "token-invalid"


class EnvelopeSignatureInvalid(GatewayProblem):
    name = "envelope-signature-invalid"


class Forbidden(GatewayProblem):
    name = "forbidden"


class PolicyDenied(Forbidden):
    name = "policy-denied"


class CommitRequired(Forbidden):
    name = "commit-required"


class EnvelopeSubjectMismatch(Forbidden):
    name = "envelope-subject-mismatch"


class EnvelopeSelfIssued(Forbidden):
    name = "envelope-self-issued"


class NotFound(GatewayProblem):
    name = "not-found"


class StaleGoal(GatewayProblem):
    name = "stale-goal"


class StaleDependency(GatewayProblem):
    name = "stale-dependency"


class CommitInProgress(GatewayProblem):
    name = "commit-in-progress"


class RevisionNotReached(GatewayProblem):
    name = "revision-not-reached"


class PreconditionFailed(GatewayProblem):
    name = "precondition-failed"


class PayloadTooLarge(GatewayProblem):
    name = "payload-too-large"


class EnvelopeInvalid(GatewayProblem):
    name = "envelope-invalid"


class DeadlinePassed(GatewayProblem):
    name = "deadline-passed"


class InputInvalid(GatewayProblem):
    name = "input-invalid"


class IdempotencyKeyReused(GatewayProblem):
    name = "idempotency-key-reused"


class PreconditionRequired(GatewayProblem):
    name = "precondition-required"


class RateLimited(GatewayProblem):
    name = "rate-limited"


class UpstreamUnavailable(GatewayProblem):
    name = "upstream-unavailable"


class PolicyUnavailable(GatewayProblem):
    name = "policy-unavailable"


_BY_NAME: dict[str, type[GatewayProblem]] = {
    cls.name: cls for cls in globals().values() if isinstance(cls, type) and issubclass(cls, GatewayProblem)
}


def problem_from_response(response: httpx.Response) -> GatewayProblem | None:
    """The typed problem in an error response; None for a success."""
    if response.status_code < 400:
        return None
    body: Any = None
    if "json" in response.headers.get("content-type", ""):
        try:
            body = response.json()
        except ValueError:
            body = None
    if not isinstance(body, dict):
        body = {"detail": response.text[:500]}
    kind = str(body.get("type", "about:blank"))
    name = kind.removeprefix(PROBLEM_BASE) if kind.startswith(PROBLEM_BASE) else ""
    cls = _BY_NAME.get(name, GatewayProblem) if name else GatewayProblem
    title = str(body.get("title", response.reason_phrase))
    return cls(response.status_code, kind, title, str(body.get("detail", "")), body)


class Credentials:
    """Mints (and re-mints before expiry) the caller's role JWT; signs handoffs with the agent key."""

    def __init__(
        self,
        issuer_key: PrivateKey,
        *,
        iss: str,
        sub: str,
        role: str,
        audience: str = "agent-gateway",
        ttl: int = 900,
        kid: str | None = None,
        agent_key: PrivateKey | None = None,
    ) -> None:
        self.issuer_key, self.iss, self.sub, self.role = issuer_key, iss, sub, role
        self.audience, self.ttl, self.kid, self.agent_key = audience, ttl, kid, agent_key
        self._token: tuple[str, float] | None = None

    @classmethod
    def from_dev_keys(
        cls, keys_dir: str | Path, *, sub: str, role: str, audience: str = "agent-gateway", ttl: int = 900
    ) -> Credentials:
        """The dev issuer's key, and `agents/<sub>.key.pem` for handoffs when it exists."""
        folder = Path(keys_dir)
        agent_file = folder / "agents" / f"{sub}.key.pem"
        agent_key = load_private_key(agent_file) if agent_file.exists() else None
        issuer = load_private_key(folder / "issuer.key.pem")
        return cls(
            issuer, iss=DEV_ISSUER, sub=sub, role=role, audience=audience, ttl=ttl, agent_key=agent_key
        )

    def token(self) -> str:
        now = time.time()
        if self._token is None or self._token[1] - now < min(60.0, self.ttl / 4):
            token = mint_role_token(
                self.issuer_key,
                iss=self.iss,
                sub=self.sub,
                role=self.role,
                audience=self.audience,
                ttl=self.ttl,
                kid=self.kid,
            )
            self._token = (token, now + self.ttl)
        return self._token[0]

    def handoff(self, to: str, task_id: str, **claims: Any) -> str:
        """A handoff envelope from this agent to agent `to` (see `mint_envelope` for claims)."""
        if self.agent_key is None:
            raise ValueError(f"no agent key for {self.sub!r}: cannot sign a handoff")
        return mint_envelope(
            self.agent_key, iss=self.sub, sub=to, task_id=task_id, audience=self.audience, **claims
        )


@dataclass(frozen=True)
class CommitResult:
    """A commit's answer: the tool's result (200) or a pending approval (202)."""

    status_code: int
    body: Any
    intent_id: str
    idempotency_key: str
    approval_id: str | None = None
    location: str | None = None
    decision_id: str | None = None

    @property
    def pending(self) -> bool:
        return self.status_code == 202


def _sf_string(key: str) -> str:
    """An Idempotency-Key as an RFC 8941 sf-string."""
    if len(key) > MAX_IDEMPOTENCY_KEY or not all(" " <= char <= "~" for char in key):
        raise ValueError("an idempotency key is at most 255 printable ASCII characters")
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _segment(value: str) -> str:
    return quote(value, safe="")


@dataclass(frozen=True)
class _Op:
    method: str
    url: str
    json: Any = None
    params: dict[str, Any] | None = None
    envelope: str | None = None
    idempotency_key: str | None = None


class _Base:
    """Builds requests and reads answers; the subclasses only send."""

    def __init__(self, token: str | Credentials, envelope: str | None) -> None:
        self.credentials = token if isinstance(token, Credentials) else None
        self._static_token = token if isinstance(token, str) else None
        self.envelope = envelope  # carried on every call unless a call names its own

    def handoff(self, to: str, task_id: str, **claims: Any) -> str:
        if self.credentials is None:
            raise ValueError("minting a handoff needs Credentials with an agent key")
        return self.credentials.handoff(to, task_id, **claims)

    def _headers(self, op: _Op) -> dict[str, str]:
        token = self.credentials.token() if self.credentials else self._static_token
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        envelope = op.envelope if op.envelope is not None else self.envelope
        if envelope is not None:
            headers["Agent-Handoff"] = envelope
        if op.idempotency_key is not None:
            headers["Idempotency-Key"] = _sf_string(op.idempotency_key)
        return headers

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        problem = problem_from_response(response)
        if problem is not None:
            raise problem
        return response.json() if response.content else None

    @staticmethod
    def _tool_response(response: httpx.Response) -> httpx.Response:
        # A tool's own error answer is returned as is; only gateway problems raise.
        if "application/problem+json" in response.headers.get("content-type", ""):
            problem = problem_from_response(response)
            if problem is not None:
                raise problem
        return response

    @staticmethod
    def _commit_result(response: httpx.Response, intent_id: str, key: str) -> CommitResult:
        body = _Base._json(response)
        pending = response.status_code == 202 and isinstance(body, dict)
        return CommitResult(
            status_code=response.status_code,
            body=body,
            intent_id=intent_id,
            idempotency_key=key,
            approval_id=body.get("approval_id") if pending else None,
            location=response.headers.get("location"),
            decision_id=response.headers.get("gateway-decision-id"),
        )

    @staticmethod
    def _listing(body: Any, key: str) -> list[dict[str, Any]]:
        if isinstance(body, dict) and isinstance(body.get(key), list):
            return body[key]
        return body if isinstance(body, list) else []

    # Operations, shared by both clients.
    @staticmethod
    def _op_call_tool(
        tool: str, json: Any, params: dict[str, Any] | None, method: str, envelope: str | None, path: str
    ) -> _Op:
        url = f"/tools/{_segment(tool)}" + (f"/{path.lstrip('/')}" if path else "")
        return _Op(method.upper(), url, json=json, params=params, envelope=envelope)

    @staticmethod
    def _op_propose(
        task_id: str,
        tool: str,
        arguments: Any,
        compensation: dict[str, Any] | None,
        depends_on: Sequence[dict[str, Any]] | None,
        memory_writes: Sequence[dict[str, Any]] | None,
        envelope: str | None,
    ) -> _Op:
        body: dict[str, Any] = {"task_id": task_id, "tool": tool, "arguments": arguments}
        optional = {"compensation": compensation, "depends_on": depends_on, "memory_writes": memory_writes}
        body.update({name: value for name, value in optional.items() if value is not None})
        return _Op("POST", "/intents", json=body, envelope=envelope)

    @staticmethod
    def _memory_url(namespace: str, key: str) -> str:
        return f"/memory/{quote(namespace, safe='/')}/{_segment(key)}"

    @staticmethod
    def _ledger_params(task_id: str | None, intent_id: str | None) -> dict[str, Any]:
        return {name: value for name, value in (("task_id", task_id), ("intent_id", intent_id)) if value}


class GatewayClient(_Base):
    """Synchronous client; use as a context manager or call `close()`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | Credentials,
        envelope: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(token, envelope)
        self.http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, op: _Op) -> httpx.Response:
        return self.http.request(op.method, op.url, json=op.json, params=op.params, headers=self._headers(op))

    def call_tool(
        self,
        tool: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        method: str = "POST",
        envelope: str | None = None,
        path: str = "",
    ) -> httpx.Response:
        return self._tool_response(self._send(self._op_call_tool(tool, json, params, method, envelope, path)))

    def propose(
        self,
        task_id: str,
        tool: str,
        arguments: Any,
        *,
        compensation: dict[str, Any] | None = None,
        depends_on: Sequence[dict[str, Any]] | None = None,
        memory_writes: Sequence[dict[str, Any]] | None = None,
        envelope: str | None = None,
    ) -> dict[str, Any]:
        op = self._op_propose(task_id, tool, arguments, compensation, depends_on, memory_writes, envelope)
        return self._json(self._send(op))

    def verify(
        self, intent_id: str, verdict: str, reason: str, envelope: str | None = None, checks: Any = None
    ) -> dict[str, Any]:
        body = {"verdict": verdict, "reason": reason, **({"checks": checks} if checks is not None else {})}
        url = f"/intents/{_segment(intent_id)}/verify"
        return self._json(self._send(_Op("POST", url, json=body, envelope=envelope)))

    def commit(
        self, intent_id: str, idempotency_key: str | None = None, envelope: str | None = None
    ) -> CommitResult:
        key = idempotency_key or uuid.uuid4().hex
        url = f"/intents/{_segment(intent_id)}/commit"
        response = self._send(_Op("POST", url, envelope=envelope, idempotency_key=key))
        return self._commit_result(response, intent_id, key)

    def get_intent(self, intent_id: str) -> dict[str, Any]:
        return self._json(self._send(_Op("GET", f"/intents/{_segment(intent_id)}")))

    def compensate(self, task_id: str, idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or uuid.uuid4().hex
        url = f"/tasks/{_segment(task_id)}/compensate"
        return self._json(self._send(_Op("POST", url, idempotency_key=key)))

    def approvals(self, status: str | None = "pending") -> list[dict[str, Any]]:
        params = {"status": status} if status else None
        return self._listing(self._json(self._send(_Op("GET", "/approvals", params=params))), "approvals")

    def approval(self, approval_id: str) -> dict[str, Any]:
        return self._json(self._send(_Op("GET", f"/approvals/{_segment(approval_id)}")))

    def decide_approval(self, approval_id: str, decision: str, reason: str) -> dict[str, Any]:
        url = f"/approvals/{_segment(approval_id)}/decision"
        return self._json(self._send(_Op("POST", url, json={"decision": decision, "reason": reason})))

    def memory_get(
        self, namespace: str, key: str, min_revision: int | None = None, wait: float | None = None
    ) -> dict[str, Any]:
        params = {name: v for name, v in (("min_revision", min_revision), ("wait", wait)) if v is not None}
        return self._json(self._send(_Op("GET", self._memory_url(namespace, key), params=params or None)))

    def ledger(self, task_id: str | None = None, intent_id: str | None = None) -> Any:
        params = self._ledger_params(task_id, intent_id)
        return self._json(self._send(_Op("GET", "/ledger", params=params or None)))

    def trace(self, intent_id: str) -> dict[str, Any]:
        return self._json(self._send(_Op("GET", f"/trace/{_segment(intent_id)}")))


class AsyncGatewayClient(_Base):
    """Asynchronous client with the same methods as `GatewayClient`, awaited."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | Credentials,
        envelope: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(token, envelope)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, op: _Op) -> httpx.Response:
        return await self.http.request(
            op.method, op.url, json=op.json, params=op.params, headers=self._headers(op)
        )

    async def call_tool(
        self,
        tool: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        method: str = "POST",
        envelope: str | None = None,
        path: str = "",
    ) -> httpx.Response:
        op = self._op_call_tool(tool, json, params, method, envelope, path)
        return self._tool_response(await self._send(op))

    async def propose(
        self,
        task_id: str,
        tool: str,
        arguments: Any,
        *,
        compensation: dict[str, Any] | None = None,
        depends_on: Sequence[dict[str, Any]] | None = None,
        memory_writes: Sequence[dict[str, Any]] | None = None,
        envelope: str | None = None,
    ) -> dict[str, Any]:
        op = self._op_propose(task_id, tool, arguments, compensation, depends_on, memory_writes, envelope)
        return self._json(await self._send(op))

    async def verify(
        self, intent_id: str, verdict: str, reason: str, envelope: str | None = None, checks: Any = None
    ) -> dict[str, Any]:
        body = {"verdict": verdict, "reason": reason, **({"checks": checks} if checks is not None else {})}
        url = f"/intents/{_segment(intent_id)}/verify"
        return self._json(await self._send(_Op("POST", url, json=body, envelope=envelope)))

    async def commit(
        self, intent_id: str, idempotency_key: str | None = None, envelope: str | None = None
    ) -> CommitResult:
        key = idempotency_key or uuid.uuid4().hex
        url = f"/intents/{_segment(intent_id)}/commit"
        response = await self._send(_Op("POST", url, envelope=envelope, idempotency_key=key))
        return self._commit_result(response, intent_id, key)

    async def get_intent(self, intent_id: str) -> dict[str, Any]:
        return self._json(await self._send(_Op("GET", f"/intents/{_segment(intent_id)}")))

    async def compensate(self, task_id: str, idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or uuid.uuid4().hex
        url = f"/tasks/{_segment(task_id)}/compensate"
        return self._json(await self._send(_Op("POST", url, idempotency_key=key)))

    async def approvals(self, status: str | None = "pending") -> list[dict[str, Any]]:
        params = {"status": status} if status else None
        body = self._json(await self._send(_Op("GET", "/approvals", params=params)))
        return self._listing(body, "approvals")

    async def approval(self, approval_id: str) -> dict[str, Any]:
        return self._json(await self._send(_Op("GET", f"/approvals/{_segment(approval_id)}")))

    async def decide_approval(self, approval_id: str, decision: str, reason: str) -> dict[str, Any]:
        url = f"/approvals/{_segment(approval_id)}/decision"
        return self._json(await self._send(_Op("POST", url, json={"decision": decision, "reason": reason})))

    async def memory_get(
        self, namespace: str, key: str, min_revision: int | None = None, wait: float | None = None
    ) -> dict[str, Any]:
        params = {name: v for name, v in (("min_revision", min_revision), ("wait", wait)) if v is not None}
        op = _Op("GET", self._memory_url(namespace, key), params=params or None)
        return self._json(await self._send(op))

    async def ledger(self, task_id: str | None = None, intent_id: str | None = None) -> Any:
        params = self._ledger_params(task_id, intent_id)
        return self._json(await self._send(_Op("GET", "/ledger", params=params or None)))

    async def trace(self, intent_id: str) -> dict[str, Any]:
        return self._json(await self._send(_Op("GET", f"/trace/{_segment(intent_id)}")))
