"""The approvals page: server-rendered HTML, no JavaScript.

    GET  /ui                               → /ui/approvals
    GET  /ui/approvals                     pending approvals (or the sign-in form)
    GET  /ui/approvals/{id}                one approval: intent, arguments, reasons, causal chain
    POST /ui/approvals/{id}/decision       approve or deny, with a reason
    POST /ui/sign-in                       paste an approver token; starts a session
    POST /ui/sign-out

Decisions go through the same `approvals.store.decide_approval` as the API, so the
page has exactly the API's rules (approver role, policy, no self-approval, distinct
approvers, expiry, final decisions). See `security.py` for CSRF and escaping.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.approvals import store
from gateway.intents import Step
from gateway.problems import GatewayError, NotFound
from gateway.proxy import read_body
from gateway.traces import causal_trace
from gateway.tracing import from_traceparent
from gateway.web import sessions
from gateway.web.security import check_same_origin, harden, same_token

if TYPE_CHECKING:
    from gateway.state import Gateway

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_FORM_BYTES = 16_384
NEXT_PAGE = re.compile(r"^/ui/approvals(/ap_[A-Za-z0-9_\-]{1,76})?$")
DONE_MESSAGES = {
    "approve": "Your approval was recorded.",
    "deny": "The approval was denied; the commit will not run.",
}


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def _parse(stamp: str | None) -> datetime | None:
    if not stamp:
        return None
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _clock(stamp: str | None) -> str:
    moment = _parse(stamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def _relative(stamp: str | None) -> str:
    moment = _parse(stamp)
    if moment is None:
        return ""
    seconds = int((moment - datetime.now(UTC)).total_seconds())
    span = abs(seconds)
    amount = (
        f"{span} s"
        if span < 60
        else f"{span // 60} min"
        if span < 3600
        else f"{span // 3600} h {span % 3600 // 60} min"
    )
    return f"in {amount}" if seconds >= 0 else f"{amount} ago"


def _party(actor: Any) -> str:
    if not isinstance(actor, dict) or not actor.get("sub"):
        return "—"
    return f"{actor['sub']} ({actor.get('role', '?')})"


environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(enabled_extensions=("html",), default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters.update(pretty=_pretty, clock=_clock, relative=_relative, party=_party)


def render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = environment.get_template(template).render(**context)
    return harden(HTMLResponse(html, status_code=status))  # type: ignore[return-value]


def _next(value: str | None) -> str:
    return value if value and NEXT_PAGE.match(value) else "/ui/approvals"


async def _form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body (the only kind our forms send), first value of each."""
    body = await read_body(request, MAX_FORM_BYTES)
    pairs = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=20)
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def _error_page(error: GatewayError, user: sessions.Session | None = None) -> HTMLResponse:
    return render("error.html", error.status, error=error, user=user, csrf=user.csrf_token if user else "")


# --- signing in ---------------------------------------------------------------------


def sign_in_page(request: Request, *, status: int = 200, message: str = "", next_page: str = "") -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        "sign_in.html", status, signin_csrf=token, message=message, next_page=_next(next_page), user=None
    )
    sessions.set_cookie(request, response, sessions.signin_cookie_name(request), token, 900)
    return response


async def sign_in(gateway: Gateway, request: Request) -> Response:
    try:
        check_same_origin(request)
        form = await _form(request)
    except GatewayError as error:
        return _error_page(error)
    next_page = _next(form.get("next"))
    if not same_token(request.cookies.get(sessions.signin_cookie_name(request), ""), form.get("csrf")):
        return sign_in_page(request, status=403, message="The form expired; try again.", next_page=next_page)
    token = "".join(form.get("token", "").split())
    try:
        principal = await gateway.tokens.verify(f"Bearer {token}")
    except GatewayError as error:
        return sign_in_page(
            request, status=401, message=f"Sign-in refused: {error.detail}", next_page=next_page
        )
    if principal.role != "approver":
        message = f"Sign-in refused: the token's role is {principal.role!r}; the page is for approvers."
        return sign_in_page(request, status=403, message=message, next_page=next_page)
    response = RedirectResponse(next_page, status_code=303)
    await sessions.create(gateway, request, response, principal)
    sessions.clear_cookie(request, response, sessions.signin_cookie_name(request))
    return harden(response)


async def sign_out(gateway: Gateway, request: Request) -> Response:
    user = await sessions.current(gateway, request)
    try:
        check_same_origin(request)
        form = await _form(request)
    except GatewayError as error:
        return _error_page(error, user)
    if user is not None and not same_token(user.csrf_token, form.get("csrf")):
        return _error_page(
            GatewayError("the form expired", status=403, name="csrf", title="Form expired"), user
        )
    response = RedirectResponse("/ui/approvals", status_code=303)
    await sessions.end(gateway, request, response)
    return harden(response)


# --- pages --------------------------------------------------------------------------


async def index(gateway: Gateway, request: Request) -> Response:
    return harden(RedirectResponse("/ui/approvals", status_code=303))


async def list_page(gateway: Gateway, request: Request) -> Response:
    user = await sessions.current(gateway, request)
    if user is None:
        return sign_in_page(request)
    pending = [store.view(item) for item in await store.listing(gateway, store.PENDING, 200)]
    recent = [
        store.view(item)
        for item in await store.listing(gateway, None, 40)
        if item.approval.status != store.PENDING
    ][:15]
    return render("list.html", user=user, csrf=user.csrf_token, pending=pending, recent=recent)


async def _detail(
    gateway: Gateway,
    user: sessions.Session,
    approval_id: str,
    *,
    status: int = 200,
    message: str = "",
    error: str = "",
) -> Response:
    approval = store.view(await store.get(gateway, approval_id))
    try:
        trace: dict[str, Any] | None = await causal_trace(gateway, approval["intent_id"])
    except NotFound:
        trace = None
    involved = user.sub in {
        party.get("sub")
        for party in (
            approval["proposer"],
            approval["verifier"],
            approval["committer"],
            approval["requested_by"],
        )
        if isinstance(party, dict)
    }
    decided = any(decision["approver"] == user.sub for decision in approval["decisions"])
    return render(
        "detail.html",
        status,
        user=user,
        csrf=user.csrf_token,
        a=approval,
        trace=trace,
        involved=involved,
        decided=decided,
        may_decide=approval["status"] == store.PENDING and not involved and not decided,
        message=message,
        error=error,
    )


async def detail_page(gateway: Gateway, request: Request) -> Response:
    user = await sessions.current(gateway, request)
    approval_id = request.path_params["approval_id"]
    if user is None:
        return sign_in_page(request, next_page=f"/ui/approvals/{approval_id}")
    try:
        return await _detail(
            gateway, user, approval_id, message=DONE_MESSAGES.get(request.query_params.get("done", ""), "")
        )
    except GatewayError as error:
        return _error_page(error, user)


async def decide(gateway: Gateway, request: Request) -> Response:
    user = await sessions.current(gateway, request)
    approval_id = request.path_params["approval_id"]
    try:
        check_same_origin(request)
        form = await _form(request)
    except GatewayError as error:
        return _error_page(error, user)
    if user is None:
        return sign_in_page(
            request, status=401, message="Sign in again to decide.", next_page=f"/ui/approvals/{approval_id}"
        )
    if not same_token(user.csrf_token, form.get("csrf")):
        return await _detail(
            gateway, user, approval_id, status=403, error="The form expired; reload and try again."
        )
    step = Step(request, user.principal(), from_traceparent(None), b"")
    try:
        decision, reason = store.parse_decision(
            {"decision": form.get("decision"), "reason": form.get("reason", "")}
        )
        await store.decide_approval(gateway, step, approval_id, decision, reason)
    except GatewayError as error:
        if isinstance(error, NotFound):
            return _error_page(error, user)
        return await _detail(gateway, user, approval_id, status=error.status, error=error.detail)
    return harden(RedirectResponse(f"/ui/approvals/{approval_id}?done={decision}", status_code=303))
