"""Role JWTs: every attack of contract §2 is refused, keys rotate, JWKS is cached, revocation spreads."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import problems
from gateway.config import Issuer
from gateway.identity import (
    DEV_ISSUER,
    REQUIRED_CLAIMS,
    KeySet,
    Principal,
    Revocations,
    RevocationsUnavailable,
    TokenVerifier,
    mint_role_token,
)
from gateway.keys import kid_for, load_private_key, public_jwk, rotate_issuer_key
from gateway.storage import Database
from gateway.storage.models import Revocation
from tests.conftest import role_token
from tests.servers import run_server

AUD = "agent-gateway"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Attack:
    """One change to an otherwise valid dev-issuer token."""

    claims: dict[str, Any] = field(default_factory=dict)
    times: dict[str, int] = field(default_factory=dict)  # seconds from now
    drop: str | None = None
    header: dict[str, Any] = field(default_factory=dict)  # None removes the member
    signer: str = "issuer"  # issuer | none | hs256-public-pem | stranger | stranger-with-issuer-kid
    tamper: str | None = None  # signature | payload
    revoke: str | None = None  # jti | sub


def forge(keys_dir: Path, attack: Attack) -> str:
    """Build the token by hand, so nothing in the library under test can quietly fix it."""
    issuer = load_private_key(keys_dir / "issuer.key.pem")
    stranger = ed25519.Ed25519PrivateKey.generate()
    now = int(time.time())
    times = {"exp": 600, "nbf": 0, "iat": 0, **attack.times}
    claims: dict[str, Any] = {
        "iss": DEV_ISSUER,
        "sub": "planner-1",
        "aud": AUD,
        **{name: now + offset for name, offset in times.items()},
        "jti": uuid.uuid4().hex,
        "role": "planner",
        **attack.claims,
    }
    if attack.drop:
        del claims[attack.drop]
    kid = kid_for((stranger if attack.signer == "stranger" else issuer).public_key())
    header = {"typ": "role+jwt", "alg": "EdDSA", "kid": kid, **attack.header}
    header = {name: value for name, value in header.items() if value is not None}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}".encode()
    if attack.signer == "none":
        signature = b""
    elif attack.signer == "hs256-public-pem":
        secret = (keys_dir / "issuer.pub.pem").read_bytes()
        signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    elif attack.signer.startswith("stranger"):
        signature = stranger.sign(signing_input)
    else:
        assert isinstance(issuer, ed25519.Ed25519PrivateKey)
        signature = issuer.sign(signing_input)
    token = f"{signing_input.decode()}.{_b64(signature)}"
    if attack.tamper == "signature":
        head, _, sig = token.rpartition(".")
        token = f"{head}.{'B' if sig[0] == 'A' else 'A'}{sig[1:]}"
    if attack.tamper == "payload":
        encoded_header, _, rest = token.partition(".")
        _, _, sig = rest.partition(".")
        forged = _b64(json.dumps({**claims, "role": "approver"}).encode())
        token = f"{encoded_header}.{forged}.{sig}"
    return token


ATTACKS = [
    pytest.param(Attack(header={"alg": "none"}, signer="none"), "algorithm is not allowed", id="alg-none"),
    pytest.param(
        Attack(header={"alg": "HS256"}, signer="hs256-public-pem"),
        "algorithm is not allowed",
        id="hs256-with-public-key-as-secret",
    ),
    pytest.param(Attack(claims={"aud": "another-gateway"}), "audience", id="wrong-aud"),
    pytest.param(Attack(claims={"iss": "https://evil.example"}), "issuer is not trusted", id="wrong-iss"),
    pytest.param(Attack(times={"exp": -120, "nbf": -300, "iat": -300}), "expired", id="expired"),
    pytest.param(Attack(times={"nbf": 120}), "not yet valid", id="nbf-in-future"),
    pytest.param(Attack(times={"iat": 120}), "not yet valid", id="iat-in-future"),
    *[
        pytest.param(Attack(drop=claim), f"missing required claim {claim!r}", id=f"missing-{claim}")
        for claim in REQUIRED_CLAIMS
    ],
    pytest.param(Attack(signer="stranger"), "(kid) is unknown", id="unknown-kid"),
    pytest.param(Attack(header={"kid": None}), "(kid) is unknown", id="no-kid"),
    pytest.param(Attack(signer="stranger-with-issuer-kid"), "signature is invalid", id="wrong-key-real-kid"),
    pytest.param(Attack(tamper="signature"), "signature is invalid", id="tampered-signature"),
    pytest.param(Attack(tamper="payload"), "signature is invalid", id="tampered-payload"),
    pytest.param(Attack(header={"typ": "JWT"}), "typ", id="wrong-typ"),
    pytest.param(Attack(header={"typ": None}), "typ", id="no-typ"),
    pytest.param(Attack(times={"exp": 3600 + 60}), "lifetime exceeds", id="lifetime-over-max"),
    pytest.param(Attack(claims={"sub": 42}), "invalid", id="sub-not-a-string"),
    pytest.param(Attack(claims={"role": ""}), "'role' must be a non-empty string", id="empty-role"),
    pytest.param(Attack(revoke="jti"), "revoked", id="revoked-jti"),
    pytest.param(Attack(revoke="sub"), "revoked", id="revoked-sub"),
]


@pytest.fixture
def revocations() -> Revocations:
    return Revocations(None)


@pytest.fixture
def verifier(keys_dir: Path, revocations: Revocations) -> TokenVerifier:
    return TokenVerifier([], AUD, keys_dir, revocations)


async def test_the_untampered_forgery_is_accepted(keys_dir: Path, verifier: TokenVerifier) -> None:
    """The control for the table below: each attack differs from this token in one way only."""
    principal = await verifier.verify(f"Bearer {forge(keys_dir, Attack())}")
    assert (principal.sub, principal.role, principal.iss) == ("planner-1", "planner", DEV_ISSUER)


@pytest.mark.parametrize(("attack", "reason"), ATTACKS)
async def test_attack_is_refused(
    keys_dir: Path, verifier: TokenVerifier, revocations: Revocations, attack: Attack, reason: str
) -> None:
    token = forge(keys_dir, attack)
    if attack.revoke:
        claims = jwt.decode(token, options={"verify_signature": False})
        await revocations.revoke(attack.revoke, claims[attack.revoke])  # type: ignore[arg-type]
    with pytest.raises(problems.TokenInvalid) as caught:
        await verifier.verify(f"Bearer {token}")
    assert caught.value.status == 401
    assert reason in caught.value.detail
    assert not any(part and part in caught.value.detail for part in token.split("."))
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer   ",
        "Basic cGxhbm5lcjpzZWNyZXQ=",
        "Bearer abc",
        "Bearer a.b.c",
        "Bearer x" * 2000,
    ],
)
async def test_malformed_authorization_is_refused(verifier: TokenVerifier, authorization: str | None) -> None:
    with pytest.raises(problems.TokenInvalid) as caught:
        await verifier.verify(authorization)
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_valid_token_gives_its_principal(keys_dir: Path, verifier: TokenVerifier) -> None:
    token = role_token(keys_dir, "verifier", sub="verifier-7", extra={"team": "blue"})
    principal = await verifier.verify(f"bearer {token}")  # the scheme is case-insensitive
    claims = jwt.decode(token, options={"verify_signature": False})
    assert principal == Principal(
        sub="verifier-7", role="verifier", iss=DEV_ISSUER, jti=claims["jti"], exp=claims["exp"], claims=claims
    )
    assert jwt.get_unverified_header(token) == {
        "typ": "role+jwt",
        "alg": "EdDSA",
        "kid": kid_for(load_private_key(keys_dir / "issuer.key.pem").public_key()),
    }
    assert set(REQUIRED_CLAIMS) <= set(claims) and claims["exp"] - claims["iat"] == 900


@pytest.mark.parametrize(
    ("leeway", "exp_offset", "accepted"),
    [(30, -10, True), (30, -40, False), (0, -10, False), (60, -59, True)],
)
async def test_leeway_is_the_issuers(
    keys_dir: Path, revocations: Revocations, leeway: int, exp_offset: int, accepted: bool
) -> None:
    issuer = Issuer(iss=DEV_ISSUER, leeway=leeway)
    verifier = TokenVerifier([issuer], AUD, keys_dir, revocations)
    token = forge(keys_dir, Attack(times={"exp": exp_offset, "nbf": -100, "iat": -100}))
    if accepted:
        await verifier.verify(f"Bearer {token}")
    else:
        with pytest.raises(problems.TokenInvalid, match="expired"):
            await verifier.verify(f"Bearer {token}")


async def test_the_key_type_must_match_the_algorithm(keys_dir: Path, revocations: Revocations) -> None:
    """Even with RS256 allowed, an RS256 token cannot name the issuer's Ed25519 key."""
    verifier = TokenVerifier(
        [Issuer(iss=DEV_ISSUER, algorithms=["EdDSA", "RS256"])], AUD, keys_dir, revocations
    )
    await verifier.verify(f"Bearer {role_token(keys_dir, 'planner')}")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer_kid = kid_for(load_private_key(keys_dir / "issuer.key.pem").public_key())
    token = mint_role_token(
        rsa_key, iss=DEV_ISSUER, sub="planner-1", role="planner", audience=AUD, kid=issuer_kid
    )
    with pytest.raises(problems.TokenInvalid, match="does not match the key type"):
        await verifier.verify(f"Bearer {token}")


async def test_configured_issuer_with_pem_file_and_es256(
    tmp_path: Path, keys_dir: Path, revocations: Revocations
) -> None:
    from cryptography.hazmat.primitives import serialization

    corp_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "corp.pub.pem").write_bytes(
        corp_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    corp = Issuer(iss="https://corp.example", algorithms=["ES256"], keys=["corp.pub.pem"], max_lifetime=600)
    verifier = TokenVerifier([corp], AUD, keys_dir, revocations, base_dir=tmp_path)
    token = mint_role_token(corp_key, iss=corp.iss, sub="worker-1", role="worker", audience=AUD, ttl=600)
    assert (await verifier.verify(f"Bearer {token}")).iss == corp.iss
    too_long = mint_role_token(corp_key, iss=corp.iss, sub="worker-1", role="worker", audience=AUD, ttl=601)
    dev_token = role_token(keys_dir, "planner")
    dev_key_claiming_corp = mint_role_token(
        load_private_key(keys_dir / "issuer.key.pem"), iss=corp.iss, sub="w", role="worker", audience=AUD
    )
    for bad, reason in [
        (too_long, "lifetime exceeds"),
        (dev_token, "issuer is not trusted"),  # configured issuers replace the dev issuer
        (dev_key_claiming_corp, "algorithm is not allowed"),
    ]:
        with pytest.raises(problems.TokenInvalid, match=reason):
            await verifier.verify(f"Bearer {bad}")


async def test_rotation_keeps_old_tokens_valid(keys_dir: Path, verifier: TokenVerifier) -> None:
    old = role_token(keys_dir, "planner")
    await verifier.verify(f"Bearer {old}")

    new_kid = rotate_issuer_key(keys_dir)
    new = role_token(keys_dir, "planner")

    assert jwt.get_unverified_header(new)["kid"] == new_kid != jwt.get_unverified_header(old)["kid"]
    restarted = TokenVerifier([], AUD, keys_dir, Revocations(None))
    for running in (verifier, restarted):  # the running one picks the new key up from disk
        await running.verify(f"Bearer {old}")
        await running.verify(f"Bearer {new}")


# --- JWKS over a real loopback HTTP server ----------------------------------------------


class JwksServer:
    def __init__(self) -> None:
        self.document: Any = {"keys": []}
        self.status = 200
        self.hits = 0
        self._lock = threading.Lock()
        self.url = ""

    async def endpoint(self, request: Request) -> Response:
        with self._lock:
            self.hits += 1
        if not isinstance(self.document, dict):
            return Response(str(self.document), status_code=self.status)
        return JSONResponse(self.document, status_code=self.status)


@pytest.fixture(scope="module")
def _jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    app = Starlette(routes=[Route("/jwks.json", server.endpoint)])
    with run_server(app) as base:
        server.url = f"{base}/jwks.json"
        yield server


@pytest.fixture
def jwks_server(_jwks_server: JwksServer) -> JwksServer:
    _jwks_server.document, _jwks_server.status, _jwks_server.hits = {"keys": []}, 200, 0
    return _jwks_server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_jwks_refetch_on_unknown_kid_respects_cooldown(jwks_server: JwksServer) -> None:
    first, second = (ed25519.Ed25519PrivateKey.generate().public_key() for _ in range(2))
    jwks_server.document = {"keys": [public_jwk(first)]}
    clock = FakeClock()
    keyset = KeySet(jwks_url=jwks_server.url, cooldown=30, clock=clock)

    assert await keyset.key_for(kid_for(first)) is not None
    assert await keyset.key_for(kid_for(first)) is not None
    assert jwks_server.hits == 1  # cached

    jwks_server.document = {"keys": [public_jwk(first), public_jwk(second)]}
    clock.now += 10
    for _ in range(20):  # a flood of unknown kids inside the cooldown fetches nothing
        assert await keyset.key_for(uuid.uuid4().hex) is None
    assert await keyset.key_for(kid_for(second)) is None
    assert jwks_server.hits == 1

    clock.now += 20
    assert await keyset.key_for(kid_for(second)) is not None
    assert jwks_server.hits == 2


@pytest.mark.parametrize(
    ("status", "document"),
    [(500, {"keys": []}), (200, "not json"), (200, {"keys": "nope"}), (200, {"no": "keys"})],
)
async def test_jwks_failure_fails_closed_then_recovers(
    jwks_server: JwksServer, status: int, document: Any
) -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    jwks_server.status, jwks_server.document = status, document
    clock = FakeClock()
    keyset = KeySet(jwks_url=jwks_server.url, cooldown=30, clock=clock)
    assert await keyset.key_for(kid_for(key)) is None

    jwks_server.status, jwks_server.document = 200, {"keys": [public_jwk(key)]}
    clock.now += 30
    assert await keyset.key_for(kid_for(key)) is not None


async def test_jwks_unreachable_fails_closed() -> None:
    keyset = KeySet(jwks_url="http://127.0.0.1:9/jwks.json", timeout=1.0)
    assert await keyset.key_for("any") is None


async def test_jwks_ignores_private_and_mislabelled_keys(jwks_server: JwksServer) -> None:
    leaked, mislabelled, good = (ed25519.Ed25519PrivateKey.generate().public_key() for _ in range(3))
    jwks_server.document = {
        "keys": [
            {**public_jwk(leaked), "d": _b64(b"\x01" * 32)},
            {**public_jwk(mislabelled), "alg": "RS256"},
            {**public_jwk(good), "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        ]
    }
    keyset = KeySet(jwks_url=jwks_server.url)
    for key in (leaked, mislabelled, good):
        assert await keyset.key_for(kid_for(key)) is None
    assert await keyset.key_for("hmac") is None


async def test_jwks_keys_removed_upstream_stop_verifying(jwks_server: JwksServer) -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    jwks_server.document = {"keys": [public_jwk(key)]}
    clock = FakeClock()
    keyset = KeySet(jwks_url=jwks_server.url, max_age=300, clock=clock)
    assert await keyset.key_for(kid_for(key)) is not None
    jwks_server.document = {"keys": []}
    clock.now += 300
    assert await keyset.key_for(kid_for(key)) is None


async def test_issuer_with_jwks_url(
    jwks_server: JwksServer, keys_dir: Path, revocations: Revocations
) -> None:
    signing = ed25519.Ed25519PrivateKey.generate()
    jwks_server.document = {"keys": [public_jwk(signing.public_key())]}
    idp = Issuer(iss="https://idp.example", jwks_url=jwks_server.url)
    verifier = TokenVerifier([idp], AUD, keys_dir, revocations)
    token = mint_role_token(signing, iss=idp.iss, sub="committer-1", role="committer", audience=AUD)
    assert (await verifier.verify(f"Bearer {token}")).role == "committer"
    stranger = mint_role_token(
        ed25519.Ed25519PrivateKey.generate(), iss=idp.iss, sub="committer-1", role="committer", audience=AUD
    )
    with pytest.raises(problems.TokenInvalid, match="unknown"):
        await verifier.verify(f"Bearer {stranger}")
    assert jwks_server.hits == 1  # the unknown kid fell inside the cooldown


# --- Revocations ------------------------------------------------------------------------


async def test_in_memory_revocations_honour_expiry() -> None:
    revocations = Revocations(None)
    past, future = datetime.now(UTC) - timedelta(seconds=1), datetime.now(UTC) + timedelta(hours=1)
    await revocations.revoke("jti", "old", expires_at=past)
    await revocations.revoke("sub", "suspended", expires_at=future)
    assert not revocations.is_revoked("old", "someone")
    assert revocations.is_revoked("other", "suspended")
    await revocations.revoke("jti", "old")  # revoking again only extends: now permanent
    await revocations.revoke("jti", "old", expires_at=past)
    assert revocations.is_revoked("old", "someone")
    with pytest.raises(ValueError):
        await revocations.revoke("kid", "x")  # type: ignore[arg-type]


async def _rows(database: Database) -> list[tuple[str, str, datetime | None]]:
    async with database.sessions() as session:
        rows = (await session.execute(select(Revocation))).scalars().all()
    return sorted((row.kind, row.value, row.expires_at) for row in rows)


async def test_revoke_is_idempotent_and_only_extends(database: Database) -> None:
    revocations = Revocations(database)
    soon = datetime.now(UTC) + timedelta(minutes=5)
    later = soon + timedelta(hours=1)
    await revocations.revoke("sub", "worker-1", reason="compromised", expires_at=soon)
    await revocations.revoke("sub", "worker-1", expires_at=later)
    await revocations.revoke("sub", "worker-1", expires_at=soon)
    rows = await _rows(database)
    assert len(rows) == 1 and rows[0][2] is not None
    assert abs(rows[0][2].replace(tzinfo=UTC) - later) < timedelta(seconds=1)
    await revocations.revoke("sub", "worker-1")
    await revocations.revoke("sub", "worker-1", expires_at=soon)
    assert await _rows(database) == [("sub", "worker-1", None)]
    await revocations.refresh()
    assert revocations.is_revoked("any-jti", "worker-1")


async def test_expired_rows_do_not_revoke(database: Database) -> None:
    writer = Revocations(database)
    await writer.revoke("jti", "gone", expires_at=datetime.now(UTC) - timedelta(seconds=5))
    reader = Revocations(database)
    await reader.refresh()
    assert not reader.is_revoked("gone", "planner-1")
    async with database.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Revocation)) == 1


async def test_a_refresh_racing_a_local_revoke_keeps_it(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh whose read predates a local revoke must not drop that revoke from the snapshot."""
    revocations = Revocations(database)
    await revocations.refresh()
    real_sessions = database.sessions
    read_done, release = asyncio.Event(), asyncio.Event()

    @asynccontextmanager
    async def slow_sessions() -> AsyncIterator[Any]:
        async with real_sessions() as session:
            execute = session.execute

            async def execute_then_wait(*args: Any, **kwargs: Any) -> Any:
                result = await execute(*args, **kwargs)
                read_done.set()
                await release.wait()
                return result

            session.execute = execute_then_wait  # type: ignore[method-assign]
            yield session

    monkeypatch.setattr(database, "sessions", slow_sessions)
    refreshing = asyncio.create_task(revocations.refresh())
    await read_done.wait()
    monkeypatch.setattr(database, "sessions", real_sessions)
    await revocations.revoke("jti", "stolen")
    release.set()
    await refreshing
    assert revocations.is_revoked("stolen", "planner-1")


async def test_a_stale_snapshot_fails_closed(database: Database) -> None:
    revocations = Revocations(database, max_staleness=0.2)
    with pytest.raises(RevocationsUnavailable):
        revocations.is_revoked("jti", "sub")  # never loaded: no answer is better than a wrong one
    await revocations.refresh()
    assert revocations.is_revoked("jti", "sub") is False
    await asyncio.sleep(0.3)
    with pytest.raises(RevocationsUnavailable) as caught:
        revocations.is_revoked("jti", "sub")
    assert caught.value.status == 503


async def test_revocation_reaches_another_replica_within_a_second(database_url: str, keys_dir: Path) -> None:
    replica_a, replica_b = Database(database_url), Database(database_url)
    revocations_a, revocations_b = Revocations(replica_a), Revocations(replica_b)
    verifier_b = TokenVerifier([], AUD, keys_dir, revocations_b)
    await revocations_a.refresh()
    await revocations_b.refresh()
    poller = asyncio.create_task(revocations_b.run(interval=0.5))
    try:
        token = role_token(keys_dir, "worker", sub="worker-9")
        await verifier_b.verify(f"Bearer {token}")

        await revocations_a.revoke("sub", "worker-9", reason="key leaked")
        started = time.monotonic()
        assert revocations_a.is_revoked("unrelated", "worker-9")  # the writer knows at once
        while True:
            try:
                await verifier_b.verify(f"Bearer {token}")
            except problems.TokenInvalid as error:
                assert "revoked" in error.detail
                break
            assert time.monotonic() - started < 1.0, "replica B still accepts the revoked agent"
            await asyncio.sleep(0.02)
    finally:
        poller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poller
        await replica_a.close()
        await replica_b.close()


async def test_a_cached_token_is_still_checked_for_revocation_and_expiry(
    keys_dir: Path, revocations: Revocations
) -> None:
    """Verified tokens are remembered (the signature check dominates a call's cost);
    revocation and the time window must still apply to every later use."""
    verifier = TokenVerifier([Issuer(iss=DEV_ISSUER, leeway=0)], AUD, keys_dir, revocations)
    key = load_private_key(keys_dir / "issuer.key.pem")
    short = f"Bearer {mint_role_token(key, iss=DEV_ISSUER, sub='w-8', role='worker', audience=AUD, ttl=1)}"
    await verifier.verify(short)
    await asyncio.sleep(1.1)
    with pytest.raises(problems.TokenInvalid, match="expired"):
        await verifier.verify(short)

    header = f"Bearer {mint_role_token(key, iss=DEV_ISSUER, sub='w-9', role='worker', audience=AUD, ttl=120)}"
    first = await verifier.verify(header)
    assert (await verifier.verify(header)) is first  # served from the cache
    await revocations.revoke("sub", "w-9")
    with pytest.raises(problems.TokenInvalid, match="revoked"):
        await verifier.verify(header)
