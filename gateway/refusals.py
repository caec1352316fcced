"""Refusals of authenticated agents go to the ledger.

An escalation attempt — a forged or self-issued handoff, a committer-only action by
another role, a self-approval, a call on a superseded goal — is a coordination event
worth keeping next to the protocol events it tried to subvert. Only callers whose
role token verified are recorded: an unauthenticated request must not be able to
write to the ledger at all (that would be a free amplification of load).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from gateway import ledger
from gateway.problems import GatewayError

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.refusals")

# Refusals that say "you may not", as opposed to races and bad input.
RECORDED_STATUSES = frozenset({401, 403})
RECORDED_NAMES = frozenset({"stale-goal", "deadline-passed", "envelope-invalid"})


def worth_recording(error: GatewayError) -> bool:
    return error.status in RECORDED_STATUSES or error.name in RECORDED_NAMES


async def record_refusal(gateway: Gateway, request: Request, error: GatewayError) -> None:
    """Best effort: a ledger that cannot be written never hides the refusal itself."""
    principal = getattr(request.state, "principal", None)
    if principal is None or not worth_recording(error):
        return
    params: dict[str, Any] = request.path_params
    intent_id = error.extra.get("intent_id") or params.get("intent_id")
    try:
        async with gateway.db.transaction() as session:
            await ledger.append(
                session,
                event="refused",
                actor=principal,
                task_id=error.extra.get("task_id") or params.get("task_id"),
                intent_id=intent_id if isinstance(intent_id, str) else None,
                decision_id=error.extra.get("decision_id"),
                data={
                    "problem": error.name,
                    "status": error.status,
                    "method": request.method,
                    "path": request.url.path,
                    "detail": error.detail[:500],
                },
            )
    except Exception:  # noqa: BLE001 - the caller still gets its problem answer
        log.exception("could not ledger a refusal (%s on %s)", error.name, request.url.path)
