"""Who is calling: role JWTs (contract §2), the keys that verify them, and revocation.

`TokenVerifier.verify` turns an `Authorization` header into a `Principal` or raises
`problems.TokenInvalid` (401). Nothing the caller sends chooses how it is checked:
the issuer's pinned algorithms and registered keys decide, and the token's own `alg`
must match both. Details say what failed and never echo the token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway import problems
from gateway.background import Pauses
from gateway.config import ConfigError, Issuer
from gateway.keys import (
    KeyLoadError,
    PrivateKey,
    PublicKey,
    algorithm_for,
    key_from_jwk,
    kid_for,
    load_public_key,
)
from gateway.storage import Database
from gateway.storage.models import Revocation

log = logging.getLogger(__name__)

DEV_ISSUER = "agent-gateway-dev"
TOKEN_TYPE = "role+jwt"  # noqa: S105 (a media type, not a secret)
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "nbf", "iat", "jti", "role")
MAX_TOKEN_BYTES = 8192
MAX_JWKS_BYTES = 1_048_576
# A token whose signature and claims were checked is remembered by its exact text for
# a short while: the signature check dominates a read call's cost. Revocation and the
# time window are still checked on every use, and a removed key stops being trusted
# within CACHE_SECONDS.
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class Principal:
    sub: str
    role: str
    iss: str
    jti: str
    exp: int
    claims: dict[str, Any]


def mint_role_token(
    private_key: PrivateKey,
    *,
    iss: str,
    sub: str,
    role: str,
    audience: str,
    ttl: int = 900,
    kid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    now = int(time.time())
    claims = {
        **(extra or {}),
        "iss": iss,
        "sub": sub,
        "aud": audience,
        "exp": now + ttl,
        "nbf": now,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "role": role,
    }
    headers = {"typ": TOKEN_TYPE, "kid": kid or kid_for(private_key.public_key())}
    return jwt.encode(claims, private_key, algorithm=algorithm_for(private_key), headers=headers)


class KeySet:
    """The public keys of one signer (an issuer or an agent), looked up by `kid`.

    Sources: PEM files named outright, PEM files matching glob patterns (re-scanned on an
    unknown kid, so a key rotated on disk is picked up), and a JWKS URL. The JWKS is
    cached; an unknown kid triggers a refetch at most once per `cooldown`, so a caller
    cannot make the gateway hammer the issuer. A failed fetch leaves the kid unknown:
    the token is refused, never accepted on a guess.
    """

    def __init__(
        self,
        *,
        files: Iterable[Path] = (),
        patterns: Iterable[tuple[Path, str]] = (),
        jwks_url: str | None = None,
        cooldown: float = 30.0,
        max_age: float = 300.0,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._files = [Path(path) for path in files]
        self._patterns = list(patterns)
        self._jwks_url = jwks_url
        self._cooldown, self._max_age, self._timeout = cooldown, max_age, timeout
        self._transport = transport
        self._clock = clock
        self._disk: dict[str, PublicKey] = {}
        self._remote: dict[str, PublicKey] = {}
        self._fetched_at: float | None = None
        self._scanned_at: float | None = None
        self._lock = asyncio.Lock()
        for path in self._files:  # a named file that cannot be read is a configuration error
            key = load_public_key(path)
            self._disk[kid_for(key)] = key
        self._scan()

    def _scan(self) -> None:
        for directory, pattern in self._patterns:
            for path in sorted(Path(directory).glob(pattern)):
                try:
                    key = load_public_key(path)
                except KeyLoadError as error:
                    log.warning("ignoring key file: %s", error)
                    continue
                self._disk.setdefault(kid_for(key), key)

    def _due(self, last: float | None, interval: float) -> bool:
        return last is None or self._clock() - last >= interval

    async def _download(self, url: str) -> bytes:
        async with (
            httpx.AsyncClient(transport=self._transport, timeout=self._timeout) as client,
            client.stream("GET", url, headers={"Accept": "application/json"}) as response,
        ):
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS too large")
            return body

    async def _fetch(self, url: str) -> None:
        self._fetched_at = self._clock()
        try:
            entries = json.loads(await self._download(url))["keys"]
            if not isinstance(entries, list):
                raise ValueError("'keys' is not a list")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            log.warning("JWKS fetch from %s failed: %s", url, type(error).__name__)
            return  # keep the last good keys; an unknown kid stays unknown
        keys: dict[str, PublicKey] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if "d" in entry:  # a published private key is compromised; never trust it
                log.warning("JWKS %s publishes private key material; key ignored", url)
                continue
            try:
                key = key_from_jwk(entry)
            except KeyLoadError as error:
                log.warning("JWKS %s: %s", url, error)
                continue
            if entry.get("alg", algorithm_for(key)) != algorithm_for(key):
                log.warning("JWKS %s: key alg does not match its type; key ignored", url)
                continue
            kid = entry.get("kid")
            keys[kid if isinstance(kid, str) and kid else kid_for(key)] = key
        self._remote = keys

    async def key_for(self, kid: str | None) -> PublicKey | None:
        if not isinstance(kid, str) or not kid:
            return None
        stale = bool(self._jwks_url) and self._due(self._fetched_at, self._max_age)
        if not stale and (key := self._lookup(kid)) is not None:
            return key
        async with self._lock:  # one fetch or scan at a time; the others wait for its result
            if self._jwks_url and self._due(self._fetched_at, self._max_age):
                await self._fetch(self._jwks_url)
            if (key := self._lookup(kid)) is not None:
                return key
            # Disk is cheap to re-read; a short cooldown still bounds scans per second.
            if self._patterns and self._due(self._scanned_at, min(self._cooldown, 1.0)):
                self._scanned_at = self._clock()
                self._scan()
            if self._jwks_url and self._due(self._fetched_at, self._cooldown):
                await self._fetch(self._jwks_url)
            return self._lookup(kid)

    def _lookup(self, kid: str) -> PublicKey | None:
        return self._disk.get(kid) or self._remote.get(kid)


class RevocationsUnavailable(problems.GatewayError):
    status, name, title = 503, "revocations-unavailable", "Revocation list unavailable; failing closed"


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; they were stored as UTC.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _later(first: datetime | None, second: datetime | None) -> datetime | None:
    """The later expiry of two; None (never expires) wins."""
    first, second = _utc(first), _utc(second)
    return None if first is None or second is None else max(first, second)


async def _store(database: Database, kind: str, value: str, reason: str, expires_at: datetime | None) -> None:
    """Insert the revocation, or extend the stored one; safe when replicas race."""
    for attempt in range(2):
        try:
            async with database.transaction() as session:
                row = await session.get(Revocation, (kind, value), with_for_update=True)
                if row is None:
                    session.add(
                        Revocation(
                            kind=kind,
                            value=value,
                            reason=reason,
                            created_at=datetime.now(UTC),
                            expires_at=expires_at,
                        )
                    )
                else:  # revoking again only ever extends
                    row.expires_at = _later(row.expires_at, expires_at)
            return
        except IntegrityError:  # another replica inserted it first
            if attempt:
                raise


class Revocations:
    """Revoked token ids and agents, shared by every replica through the database.

    Checks are answered from an in-memory snapshot; `run()` reloads it every `interval`
    so a revocation written by another replica applies within a second. With a database,
    a snapshot older than `max_staleness` (or none yet) fails closed. `Revocations(None)`
    keeps everything in memory (unit tests).
    """

    def __init__(self, database: Database | None, *, max_staleness: float = 5.0) -> None:
        self._db = database
        self._max_staleness = max_staleness
        self._entries: dict[tuple[str, str], datetime | None] = {}
        self._local: dict[tuple[str, str], tuple[datetime | None, int]] = {}
        self._seq = 0
        self._loaded_at: float | None = None
        self.pauses = Pauses()  # `run` ends at its next pause once these are stopped

    async def revoke(
        self, kind: Literal["jti", "sub"], value: str, reason: str = "", expires_at: datetime | None = None
    ) -> None:
        if kind not in ("jti", "sub"):
            raise ValueError("kind must be 'jti' or 'sub'")
        if self._db is not None:
            await _store(self._db, kind, value, reason, expires_at)
        # After the write, so a refresh that read before the commit cannot overwrite it.
        merged = _later(self._entries.get((kind, value), expires_at), expires_at)
        self._entries[(kind, value)] = merged
        if self._db is not None:
            self._seq += 1
            self._local[(kind, value)] = (merged, self._seq)

    def is_revoked(self, jti: str, sub: str) -> bool:
        if self._db is not None and not (
            self._loaded_at is not None and time.monotonic() - self._loaded_at <= self._max_staleness
        ):
            raise RevocationsUnavailable("the revocation list has not been refreshed recently")
        now = datetime.now(UTC)
        for key in (("jti", jti), ("sub", sub)):
            if key in self._entries:
                expires = _utc(self._entries[key])
                if expires is None or expires > now:
                    return True
        return False

    async def refresh(self) -> None:
        if self._db is None:
            self._loaded_at = time.monotonic()
            return
        started = self._seq
        async with self._db.sessions() as session:
            rows = (await session.execute(select(Revocation))).scalars().all()
        entries: dict[tuple[str, str], datetime | None] = {
            (row.kind, row.value): _utc(row.expires_at) for row in rows
        }
        # Local revocations made while the read ran may be missing from it: keep them.
        for key, (expires, seq) in list(self._local.items()):
            if seq > started:
                entries[key] = expires
            else:
                del self._local[key]
        self._entries = entries
        self._loaded_at = time.monotonic()

    async def run(self, interval: float = 0.5) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # keep polling; is_revoked fails closed once stale
                log.warning("revocation refresh failed: %s", type(error).__name__)
            if not await self.pauses.pause(interval):
                return


def _rejected(detail: str) -> problems.TokenInvalid:
    return problems.TokenInvalid(detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


_CLAIM_ERRORS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token has expired"),
    (jwt.ImmatureSignatureError, "token is not yet valid (nbf or iat in the future)"),
    (jwt.InvalidAudienceError, "token audience is not this gateway"),
    (jwt.InvalidIssuerError, "token issuer does not match"),
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.InvalidAlgorithmError, "token algorithm is not allowed"),
)


class TokenVerifier:
    """Verifies role JWTs against the configured issuers (contract §2)."""

    def __init__(
        self,
        issuers: Sequence[Issuer],
        audience: str,
        keys_dir: Path,
        revocations: Revocations,
        *,
        base_dir: Path = Path("."),
        cooldown: float = 30.0,
    ) -> None:
        self.audience = audience
        self.revocations = revocations
        self._issuers: dict[str, tuple[Issuer, KeySet]] = {}
        self._cache: OrderedDict[str, tuple[Principal, float, float, float]] = OrderedDict()
        for issuer in issuers or [Issuer(iss=DEV_ISSUER, keys=[])]:
            if issuer.iss in self._issuers:
                raise ConfigError(f"issuers: duplicate iss {issuer.iss!r}")
            files = [path if Path(path).is_absolute() else Path(base_dir) / path for path in issuer.keys]
            patterns = [(Path(keys_dir), "issuer*.pub.pem")] if issuer.iss == DEV_ISSUER else []
            try:
                keyset = KeySet(files=files, patterns=patterns, jwks_url=issuer.jwks_url, cooldown=cooldown)
            except KeyLoadError as error:
                raise ConfigError(f"issuers: {issuer.iss!r}: {error}") from None
            self._issuers[issuer.iss] = (issuer, keyset)

    async def verify(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _rejected("missing bearer token in Authorization header")
        cached = self._cache.get(token)
        if cached is not None:
            principal, not_before, not_after, verified_at = cached
            now = time.time()
            if not_before <= now < not_after and now - verified_at < CACHE_SECONDS:
                if self.revocations.is_revoked(principal.jti, principal.sub):
                    raise _rejected("token has been revoked")
                return principal
            self._cache.pop(token, None)
        principal = await self._verify_uncached(token)
        claims = principal.claims
        leeway = min(self._issuers[principal.iss][0].leeway, 60)
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.popitem(last=False)
        self._cache[token] = (principal, claims["nbf"] - leeway, claims["exp"] + leeway, time.time())
        return principal

    async def _verify_uncached(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise _rejected("bearer token is not a compact JWS")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _rejected("bearer token is malformed") from None
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in (TOKEN_TYPE, "application/" + TOKEN_TYPE):
            raise _rejected(f"token header typ must be {TOKEN_TYPE!r}")
        if "iss" not in unverified:
            raise _rejected("token is missing required claim 'iss'")
        found = self._issuers.get(unverified["iss"]) if isinstance(unverified["iss"], str) else None
        if found is None:
            raise _rejected("token issuer is not trusted")
        issuer, keyset = found
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise _rejected("token algorithm is not allowed for this issuer")
        key = await keyset.key_for(header.get("kid"))
        if key is None:
            raise _rejected("token signing key (kid) is unknown")
        if algorithm_for(key) != alg:
            raise _rejected("token algorithm does not match the key type")
        claims = self._decode(token, key, alg, issuer)
        if claims["exp"] - claims["iat"] > issuer.max_lifetime:
            raise _rejected(f"token lifetime exceeds the issuer maximum of {issuer.max_lifetime} s")
        for name in ("sub", "role", "jti"):
            if not isinstance(claims[name], str) or not claims[name]:
                raise _rejected(f"token claim {name!r} must be a non-empty string")
        if self.revocations.is_revoked(claims["jti"], claims["sub"]):
            raise _rejected("token has been revoked")
        return Principal(
            sub=claims["sub"],
            role=claims["role"],
            iss=issuer.iss,
            jti=claims["jti"],
            exp=int(claims["exp"]),
            claims=claims,
        )

    def _decode(self, token: str, key: PublicKey, alg: str, issuer: Issuer) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=issuer.iss,
                leeway=min(issuer.leeway, 60),
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
            )
        except jwt.MissingRequiredClaimError as error:
            raise _rejected(f"token is missing required claim {error.claim!r}") from None
        except jwt.PyJWTError as error:
            for kind, detail in _CLAIM_ERRORS:
                if isinstance(error, kind):
                    raise _rejected(detail) from None
            raise _rejected("token is invalid") from None
