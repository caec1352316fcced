"""What every policy engine answers, and how a raw Rego result becomes one.

A raw result is kept in the shape of OPA's Data API response: `{"result": value}`
when `data.gateway.decision` is defined, `{}` when it is undefined, and
`{"error": message}` when evaluation failed. Anything but a well-formed decision
object is a deny whose reasons say why: the gateway never fails open.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

DECISION_PATH = "gateway/decision"


class PolicyError(Exception):
    """A policy could not be loaded or compiled; the message says why."""


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: list[str]
    require_approval: bool
    approvals_required: int
    policy_version: str
    decision_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def deny(cls, reason: str, *, policy_version: str, raw: dict[str, Any] | None = None) -> Decision:
        return cls(False, [reason], False, 0, policy_version, raw=raw or {})


class PolicyEngine(Protocol):
    """The interface the pipeline uses; `embedded` and `opa` implement it."""

    @property
    def version(self) -> str:
        """The policy version in use; empty while no policy can be served."""
        ...

    @property
    def last_reload(self) -> dict[str, Any]:
        """`{"ok": bool, "error": str | None, "at": iso8601, ...}` of the latest (re)load."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def decide(self, input: dict[str, Any], *, labels: dict[str, Any] | None = None) -> Decision: ...


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decision_from_result(raw: dict[str, Any], *, policy_version: str) -> Decision:
    """Read a decision out of a raw result; every malformed shape is a deny."""

    def deny(reason: str) -> Decision:
        return Decision.deny(reason, policy_version=policy_version, raw=raw)

    if "error" in raw:
        return deny(f"policy evaluation failed: {raw['error']}")
    if "result" not in raw:
        return deny("policy returned no decision (data.gateway.decision is undefined)")
    result = raw["result"]
    if not isinstance(result, dict):
        return deny("policy decision is not an object")
    allow = result.get("allow")
    if not isinstance(allow, bool):
        return deny("policy decision has no boolean 'allow'")
    reasons = result.get("reasons", [])
    if not isinstance(reasons, list) or not all(isinstance(reason, str) for reason in reasons):
        return deny("policy decision 'reasons' is not a list of strings")
    require_approval = result.get("require_approval", False)
    if not isinstance(require_approval, bool):
        return deny("policy decision 'require_approval' is not a boolean")
    approvals = result.get("approvals_required", 1 if require_approval else 0)
    if not _is_int(approvals) or approvals < 0 or (require_approval and approvals < 1):
        return deny("policy decision 'approvals_required' is not a valid count")
    return Decision(allow, list(reasons), require_approval, approvals, policy_version, raw=raw)
