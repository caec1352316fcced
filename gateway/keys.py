"""Signing keys on disk: dev key generation, issuer rotation, JWK thumbprints and JWKS.

Layout of `keys/` (never committed):

    issuer.key.pem / issuer.pub.pem      dev role-JWT issuer (current)
    issuer-<kid>.pub.pem                 retired issuer keys, kept so old tokens verify
    gateway.key.pem / gateway.pub.pem    the gateway's own key (checkpoints, upstream assertions)
    agents/<id>.key.pem / .pub.pem       dev agents that sign handoff envelopes

Key material never appears in an exception message or a log line: errors name the
file, not its content, and are raised `from None` so a library message cannot leak it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

DEV_AGENTS: tuple[str, ...] = ("planner", "worker", "verifier", "committer", "approver")
ISSUER = "issuer"
GATEWAY = "gateway"
MIN_RSA_BITS = 2048
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class KeyLoadError(Exception):
    """A key file or JWK cannot be used. The message names the source, never the key."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not isinstance(text, str) or not _BASE64URL.fullmatch(text):
        raise ValueError("not base64url")  # urlsafe_b64decode alone skips stray characters
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int, length: int | None = None) -> bytes:
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


def algorithm_for(key: PrivateKey | PublicKey) -> str:
    """The one JWS algorithm a key may be used with; a token's `alg` must equal it."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        raise KeyLoadError(f"unsupported EC curve {key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyLoadError(f"RSA key of {key.key_size} bits is too short")
        return "RS256"
    raise KeyLoadError(f"unsupported key type {type(key).__name__}")


def _thumbprint_members(key: PublicKey) -> dict[str, str]:
    """The required JWK members of RFC 7638 §3.2, for the supported key types."""
    algorithm_for(key)
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        return {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64(_int_bytes(numbers.x, 32)),
            "y": _b64(_int_bytes(numbers.y, 32)),
        }
    numbers_rsa = key.public_numbers()
    return {"e": _b64(_int_bytes(numbers_rsa.e)), "kty": "RSA", "n": _b64(_int_bytes(numbers_rsa.n))}


def kid_for(public_key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint: base64url SHA-256 of the canonical required members."""
    members = _thumbprint_members(public_key)
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return _b64(hashlib.sha256(canonical).digest())


def public_jwk(public_key: PublicKey) -> dict[str, str]:
    return {
        **_thumbprint_members(public_key),
        "kid": kid_for(public_key),
        "alg": algorithm_for(public_key),
        "use": "sig",
    }


def key_from_jwk(jwk: dict[str, Any]) -> PublicKey:
    """The public key of a JWK. Only public members are read; errors never echo the JWK."""
    try:
        kty, crv = jwk.get("kty"), jwk.get("crv")
        key: PublicKey
        if kty == "OKP" and crv == "Ed25519":
            key = ed25519.Ed25519PublicKey.from_public_bytes(_unb64(jwk["x"]))
        elif kty == "EC" and crv == "P-256":
            x, y = (int.from_bytes(_unb64(jwk[name]), "big") for name in ("x", "y"))
            key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        elif kty == "RSA":
            e, n = (int.from_bytes(_unb64(jwk[name]), "big") for name in ("e", "n"))
            key = rsa.RSAPublicNumbers(e, n).public_key()
        else:
            raise KeyLoadError("unsupported JWK key type")
        algorithm_for(key)
        return key
    except KeyLoadError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError):
        raise KeyLoadError("malformed JWK") from None


def load_private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as error:
        raise KeyLoadError(f"{path}: cannot read private key ({error.strerror})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyLoadError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KeyLoadError(f"{path}: unsupported private key type")
    algorithm_for(key)
    return key


def load_public_key(path: Path) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as error:
        raise KeyLoadError(f"{path}: cannot read public key ({error.strerror})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyLoadError(f"{path}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise KeyLoadError(f"{path}: unsupported public key type")
    algorithm_for(key)
    return key


def jwks(paths: Iterable[Path]) -> dict[str, list[dict[str, str]]]:
    return {"keys": [public_jwk(load_public_key(path)) for path in paths]}


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL with the final mode: a private key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def _private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _ensure_pair(directory: Path, name: str) -> list[Path]:
    private, public = directory / f"{name}.key.pem", directory / f"{name}.pub.pem"
    created: list[Path] = []
    if not private.exists():
        if public.exists():
            return created  # a registered public key without its private half: leave it alone
        key = ed25519.Ed25519PrivateKey.generate()
        _write(private, _private_pem(key), 0o600)
        created.append(private)
    if not public.exists():
        _write(public, _public_pem(load_private_key(private).public_key()), 0o644)
        created.append(public)
    return created


def generate_dev_keys(keys_dir: Path, agents: Sequence[str] = DEV_AGENTS) -> list[Path]:
    """Create the missing dev key pairs (Ed25519) and return the files created."""
    keys_dir = Path(keys_dir)
    (keys_dir / "agents").mkdir(mode=0o700, parents=True, exist_ok=True)
    created = _ensure_pair(keys_dir, ISSUER) + _ensure_pair(keys_dir, GATEWAY)
    for agent in agents:
        if not agent or "/" in agent or agent.startswith("."):
            raise KeyLoadError(f"agent id {agent!r} cannot be a file name")
        created += _ensure_pair(keys_dir / "agents", agent)
    return created


def rotate_issuer_key(keys_dir: Path) -> str:
    """Replace the dev issuer key and return the new kid.

    The old public key stays as `issuer-<oldkid>.pub.pem`, so tokens it signed keep
    verifying until they expire; the old private key is overwritten and gone.
    """
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private, public = keys_dir / f"{ISSUER}.key.pem", keys_dir / f"{ISSUER}.pub.pem"
    new = ed25519.Ed25519PrivateKey.generate()
    staged_private, staged_public = keys_dir / ".issuer.key.pem.new", keys_dir / ".issuer.pub.pem.new"
    for stale in (staged_private, staged_public):
        stale.unlink(missing_ok=True)
    _write(staged_private, _private_pem(new), 0o600)
    _write(staged_public, _public_pem(new.public_key()), 0o644)
    if public.exists():
        os.replace(public, keys_dir / f"{ISSUER}-{kid_for(load_public_key(public))}.pub.pem")
    os.replace(staged_private, private)
    os.replace(staged_public, public)
    return kid_for(new.public_key())
