"""The approvals API (contract §5), for approvers only.

    GET  /approvals[?status=pending|approved|denied|expired&limit=N]   newest first
    GET  /approvals/{id}                                                one, with its decisions
    POST /approvals/{id}/decision  {decision: "approve"|"deny", reason}  200 with the approval

A caller whose role is not `approver` gets 403 whatever the policy says; a decision
also asks policy (`action = "approve"`). The final approval runs the commit before
answering, so the answer carries the intent's new status and result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.approvals import store
from gateway.identity import Principal
from gateway.intents import begin, json_body
from gateway.problems import BadRequest, Forbidden

if TYPE_CHECKING:
    from gateway.state import Gateway

MAX_LIMIT = 500


def require_approver(principal: Principal) -> None:
    if principal.role != "approver":
        raise Forbidden(f"only the approver role may see or decide approvals (role {principal.role!r})")


async def list_approvals(gateway: Gateway, request: Request) -> Response:
    require_approver(await gateway.tokens.verify(request.headers.get("authorization")))
    status = request.query_params.get("status") or None
    if status == "all":
        status = None
    if status is not None and status not in store.STATUSES:
        raise BadRequest(f"status must be one of {', '.join(store.STATUSES)} or all")
    raw_limit = request.query_params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    found = await store.listing(gateway, status, int(raw_limit))
    return JSONResponse({"approvals": [store.view(loaded) for loaded in found]})


async def show_approval(gateway: Gateway, request: Request) -> Response:
    require_approver(await gateway.tokens.verify(request.headers.get("authorization")))
    return JSONResponse(store.view(await store.get(gateway, request.path_params["approval_id"])))


async def decide(gateway: Gateway, request: Request) -> Response:
    step = await begin(gateway, request)
    require_approver(step.principal)
    decision, reason = store.parse_decision(json_body(step))
    loaded = await store.decide_approval(gateway, step, request.path_params["approval_id"], decision, reason)
    return JSONResponse(store.view(loaded))
