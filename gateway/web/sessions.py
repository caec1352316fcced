"""Approvals-page sessions: a random id in an HttpOnly, SameSite=Strict cookie; its hash in the database.

Signing in takes an approver's role JWT (pasted by the human), verified exactly like a
bearer token. The session remembers who (sub, iss, role, jti) and ends when the token
would have expired, after `[approvals] session_seconds`, at sign-out, or as soon as the
token's `jti` or the approver's `sub` is revoked. The database holds only the SHA-256
of the cookie value, so a copy of the database signs nobody in, and every replica
knows every session.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete
from starlette.requests import Request
from starlette.responses import Response

from gateway import ledger
from gateway.identity import Principal
from gateway.storage.models import UiSession
from gateway.web.security import is_https

if TYPE_CHECKING:
    from gateway.state import Gateway

PATH = "/ui"


def cookie_name(request: Request) -> str:
    # `__Host-` pins the cookie to this host, Secure and Path=/ (browsers enforce all three).
    return "__Host-agw_session" if is_https(request) else "agw_session"


def signin_cookie_name(request: Request) -> str:
    return "__Host-agw_signin" if is_https(request) else "agw_signin"


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    sub: str
    iss: str
    role: str
    jti: str
    csrf_token: str
    expires_at: datetime

    def principal(self) -> Principal:
        return Principal(
            sub=self.sub,
            role=self.role,
            iss=self.iss,
            jti=self.jti,
            exp=int(self.expires_at.timestamp()),
            claims={},
        )


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    secure = is_https(request)
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/" if secure else PATH,
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def clear_cookie(request: Request, response: Response, name: str) -> None:
    secure = is_https(request)
    response.delete_cookie(
        name, path="/" if secure else PATH, secure=secure, httponly=True, samesite="strict"
    )


async def create(gateway: Gateway, request: Request, response: Response, principal: Principal) -> None:
    now = datetime.now(UTC)
    expires = min(
        now + timedelta(seconds=gateway.config.approvals.session_seconds),
        datetime.fromtimestamp(principal.exp, UTC),
    )
    value = secrets.token_urlsafe(32)
    async with gateway.db.transaction() as session:
        await session.execute(delete(UiSession).where(UiSession.expires_at <= now))
        session.add(
            UiSession(
                id_hash=_hash(value),
                sub=principal.sub,
                iss=principal.iss,
                role=principal.role,
                jti=principal.jti,
                csrf_token=secrets.token_urlsafe(32),
                created_at=now,
                expires_at=expires,
            )
        )
    set_cookie(request, response, cookie_name(request), value, int((expires - now).total_seconds()))


async def current(gateway: Gateway, request: Request) -> Session | None:
    value = request.cookies.get(cookie_name(request))
    if not value or len(value) > 128:
        return None
    async with gateway.db.reading() as session:
        row = await session.get(UiSession, _hash(value))
    if row is None or ledger.utc(row.expires_at) <= datetime.now(UTC):
        return None
    if gateway.revocations.is_revoked(row.jti, row.sub):
        return None
    return Session(row.sub, row.iss, row.role, row.jti, row.csrf_token, ledger.utc(row.expires_at))


async def end(gateway: Gateway, request: Request, response: Response) -> None:
    value = request.cookies.get(cookie_name(request))
    if value:
        async with gateway.db.transaction() as session:
            await session.execute(delete(UiSession).where(UiSession.id_hash == _hash(value)))
    clear_cookie(request, response, cookie_name(request))
