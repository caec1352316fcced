"""The `params._meta` keys the gateway reads from agents and adds to what it relays.

    agent-gateway/handoff          the handoff envelope (instead of the Agent-Handoff header)
    agent-gateway/intent_id        the verified intent an effectful tools/call commits
    agent-gateway/idempotency_key  the commit's Idempotency-Key (or the HTTP header)
    agent-gateway/decision_id      on results: the policy decision that let the call through
    agent-gateway/status           on results: the intent's status (committed, failed, ...)
    traceparent, tracestate        W3C trace context (the MCP convention)

Every `agent-gateway/` key is removed before a message is relayed to an MCP server:
a handoff envelope is a delegation to the receiving agent, not to the tool.
"""

from __future__ import annotations

from typing import Any

PREFIX = "agent-gateway/"
HANDOFF = PREFIX + "handoff"
INTENT_ID = PREFIX + "intent_id"
IDEMPOTENCY_KEY = PREFIX + "idempotency_key"
DECISION_ID = PREFIX + "decision_id"
STATUS = PREFIX + "status"
APPROVAL_ID = PREFIX + "approval_id"
TRACEPARENT = "traceparent"


def for_upstream(message: dict[str, Any], traceparent: str) -> dict[str, Any]:
    """A copy of a request for the server: the gateway's keys removed, its span as trace parent."""
    params = message.get("params")
    params = dict(params) if isinstance(params, dict) else {}
    meta = params.get("_meta")
    meta = (
        {key: value for key, value in meta.items() if not key.startswith(PREFIX)}
        if isinstance(meta, dict)
        else {}
    )
    meta[TRACEPARENT] = traceparent
    return {**message, "params": {**params, "_meta": meta}}
