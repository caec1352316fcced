"""The gateway's error tree, rendered as RFC 9457 problem details.

    GatewayError
    ├── TokenInvalid            401 token-invalid
    ├── EnvelopeUnauthenticated 401 envelope-signature-invalid
    ├── Forbidden               403 forbidden
    │   ├── PolicyDenied        403 policy-denied
    │   └── CommitRequired      403 commit-required
    ├── NotFound                404 not-found
    ├── MethodNotAllowed        405 method-not-allowed
    ├── Conflict                409 (stale-goal, commit-in-progress, ...)
    ├── PayloadTooLarge         413 payload-too-large
    ├── Unprocessable           422 (envelope-invalid, input-invalid, ...)
    ├── RateLimited             429 rate-limited
    ├── PolicyUnavailable       503 policy-unavailable
    └── UpstreamUnavailable     502/504 upstream-unavailable

Library errors (pyjwt, SQLAlchemy, aiohttp) are translated into this tree
where they are caught, with `raise Mapped(...) from exc`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

PROBLEM_BASE = "https://agent-gateway.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class GatewayError(Exception):
    status: int = 500
    name: str = "internal-error"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        name: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if name is not None:
            self.name = name
        if title is not None:
            self.title = title
        self.headers = headers or {}
        self.extra = {key: value for key, value in extra.items() if value is not None}

    def to_problem(self, **context: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.name,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        body.update({key: value for key, value in context.items() if value is not None})
        body.update(self.extra)
        return body


class TokenInvalid(GatewayError):
    status, name, title = 401, "token-invalid", "Role token invalid"


class EnvelopeUnauthenticated(GatewayError):
    status, name, title = 401, "envelope-signature-invalid", "Handoff envelope signature invalid"


class Forbidden(GatewayError):
    status, name, title = 403, "forbidden", "Forbidden"


class PolicyDenied(Forbidden):
    name, title = "policy-denied", "Denied by policy"


class CommitRequired(Forbidden):
    name, title = "commit-required", "This tool has side effects and must be reached through a commit"


class NotFound(GatewayError):
    status, name, title = 404, "not-found", "Not found"


class MethodNotAllowed(GatewayError):
    status, name, title = 405, "method-not-allowed", "Method not allowed"


class BadRequest(GatewayError):
    status, name, title = 400, "bad-request", "Bad request"


class Conflict(GatewayError):
    status, name, title = 409, "conflict", "Conflict"


class PreconditionFailed(GatewayError):
    status, name, title = 412, "precondition-failed", "Precondition failed"


class PreconditionRequired(GatewayError):
    status, name, title = 428, "precondition-required", "Precondition required"


class PayloadTooLarge(GatewayError):
    status, name, title = 413, "payload-too-large", "Request body too large"


class UnsupportedMediaType(GatewayError):
    status, name, title = 415, "unsupported-media-type", "Unsupported media type"


class Unprocessable(GatewayError):
    status, name, title = 422, "unprocessable", "Unprocessable request"


class RateLimited(GatewayError):
    status, name, title = 429, "rate-limited", "Rate limit exceeded"


class PolicyUnavailable(GatewayError):
    status, name, title = 503, "policy-unavailable", "Policy engine unavailable; failing closed"


class UpstreamUnavailable(GatewayError):
    status, name, title = 502, "upstream-unavailable", "Tool upstream unavailable"


def problem_response(
    error: GatewayError, *, headers: dict[str, str] | None = None, **context: Any
) -> Response:
    merged = {**error.headers, **(headers or {})}
    return Response(
        json.dumps(error.to_problem(**context)),
        status_code=error.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=merged,
    )
