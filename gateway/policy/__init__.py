"""Policy: every gateway action is decided by Rego `data.gateway.decision`.

    build_engine(config, decision_log) -> PolicyEngine
        EmbeddedEngine  the policy folder, compiled and evaluated in-process (regopy)
        OpaEngine       an OPA server's Data API (opa-python-client)
    Decision            allow, reasons, require_approval, approvals_required, ...
    DecisionLog         one OPA-shaped JSON line per decision, secrets masked
    PolicyError         a policy that cannot be loaded (compile error, crash, ...)

Both engines fail closed: no loaded policy or an unreachable server is
PolicyUnavailable (503), and a malformed or undefined decision is a deny.
"""

from __future__ import annotations

from gateway.config import Config
from gateway.policy.decision import Decision, PolicyEngine, PolicyError
from gateway.policy.decision_log import DecisionLog

__all__ = ["Decision", "DecisionLog", "PolicyEngine", "PolicyError", "build_engine"]


def build_engine(config: Config, decision_log: DecisionLog | None = None) -> PolicyEngine:
    if config.policy.engine == "opa":
        from gateway.policy.opa import OpaEngine

        return OpaEngine(
            config.policy.opa_url, decision_log=decision_log, health_interval=config.policy.reload_interval
        )
    from gateway.policy.embedded import EmbeddedEngine

    return EmbeddedEngine(
        config.path(config.policy.dir),
        decision_log=decision_log,
        reload=config.policy.reload,
        reload_interval=config.policy.reload_interval,
        memo_size=config.policy.memo_size,
    )
