"""Human approval of high-impact commits (contract §5).

store.py    the approvals' states, claims with conditional UPDATEs, the commit run on approval
api.py      GET /approvals, GET /approvals/{id}, POST /approvals/{id}/decision
webhook.py  the signed new-approval webhook (an outbox drained in the background)
sweep.py    the background task: expire overdue approvals, resume, send webhooks
cli.py      `agent-gateway approvals list|show|approve|deny`, over HTTP

The page for humans is `gateway.web` (/ui/approvals).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from gateway.state import Gateway

__all__ = ["routes"]


def routes(gateway: Gateway) -> list[BaseRoute]:
    # Imported here: `agent-gateway approvals` (the CLI) imports this package and needs none of it.
    from gateway.app import bind
    from gateway.approvals.api import decide, list_approvals, show_approval

    return [
        Route("/approvals", bind(gateway, list_approvals), methods=["GET"]),
        Route("/approvals/{approval_id}", bind(gateway, show_approval), methods=["GET"]),
        Route("/approvals/{approval_id}/decision", bind(gateway, decide), methods=["POST"]),
    ]
