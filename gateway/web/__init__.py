"""The approvals page for humans (contract §5): `/ui/approvals`, server-rendered, no JavaScript.

pages.py     the routes and their templates (templates/*.html, Jinja2 with autoescaping)
sessions.py  sign-in with an approver token; the session cookie and its table
security.py  CSRF (Sec-Fetch-Site / Origin and a per-session form token), CSP and friends
static/      the one stylesheet

OIDC sign-in is not implemented: approvers paste a role JWT from the configured issuer
(for example `agent-gateway token --role approver --sub alice` with dev keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.web import pages

if TYPE_CHECKING:
    from gateway.state import Gateway

STATIC = pages.TEMPLATES.parent / "static"


def routes(gateway: Gateway) -> list[BaseRoute]:
    from gateway.app import bind

    return [
        Route("/ui", bind(gateway, pages.index), methods=["GET"]),
        Route("/ui/approvals", bind(gateway, pages.list_page), methods=["GET"]),
        Route("/ui/approvals/{approval_id}", bind(gateway, pages.detail_page), methods=["GET"]),
        Route("/ui/approvals/{approval_id}/decision", bind(gateway, pages.decide), methods=["POST"]),
        Route("/ui/sign-in", bind(gateway, pages.sign_in), methods=["POST"]),
        Route("/ui/sign-out", bind(gateway, pages.sign_out), methods=["POST"]),
        Mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static"),
    ]
