"""What keeps the approvals page safe in a browser: same-origin checks and response headers.

Cross-site request forgery. A state-changing request is refused (403) unless the
browser says it came from this site. Browsers send `Sec-Fetch-Site` on every request
(Chromium, Firefox, Safari since 2023); `same-origin` (or `none`, typed by the user)
passes, anything else (`cross-site`, `same-site`: a sibling subdomain is not us) is
refused. Without that header we fall back to `Origin`, which must name this very
origin. With neither — an old browser or a non-browser client — the per-session
token in every form still has to match, and the session cookie is `SameSite=Strict`
and so is never sent on a request another site starts. Three independent locks.

Content. Every page is rendered by Jinja2 with autoescaping, so what agents put in an
intent (arguments, reasons, task ids) is text, never markup; the Content-Security-
Policy allows no script at all and styles only from this origin, so even markup that
slipped through could not run. The page cannot be framed (clickjacking).
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response

from gateway.problems import Forbidden

CSP = "; ".join(
    [
        "default-src 'none'",
        "style-src 'self'",
        "img-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # `same-origin`, not `no-referrer`: with no-referrer, browsers send `Origin: null` on forms.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class CrossSiteRequest(Forbidden):
    name, title = "cross-site-request", "Cross-site request refused"


def harden(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}".lower()


def check_same_origin(request: Request) -> None:
    """Refuse a state-changing request that a browser says another site started."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        if site.lower() not in ("same-origin", "none"):
            raise CrossSiteRequest(f"refused a {site} request; use the approvals page itself")
        return
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() != own_origin(request):
        raise CrossSiteRequest("refused a request from another origin; use the approvals page itself")


def same_token(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"
