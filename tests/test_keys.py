"""Key files, RFC 7638 thumbprints, JWKs, dev key generation and issuer rotation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.keys import (
    DEV_AGENTS,
    KeyLoadError,
    PublicKey,
    algorithm_for,
    generate_dev_keys,
    jwks,
    key_from_jwk,
    kid_for,
    load_private_key,
    load_public_key,
    public_jwk,
    rotate_issuer_key,
)

# RFC 7638 §3.1 (RSA) and RFC 8037 Appendix A.3 (Ed25519): published thumbprints.
RFC7638_RSA = {
    "kty": "RSA",
    "e": "AQAB",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPeb"
    "WKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQ"
    "MicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2N"
    "cRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
}
RFC8037_ED25519 = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}


@pytest.mark.parametrize(
    ("jwk", "thumbprint"),
    [
        (RFC7638_RSA, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"),
        (RFC8037_ED25519, "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"),
    ],
)
def test_kid_is_the_rfc7638_thumbprint(jwk: dict[str, str], thumbprint: str) -> None:
    assert kid_for(key_from_jwk(jwk)) == thumbprint


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (ed25519.Ed25519PrivateKey.generate().public_key(), "EdDSA"),
        (ec.generate_private_key(ec.SECP256R1()).public_key(), "ES256"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(), "RS256"),
    ],
)
def test_public_jwk_round_trips(key: PublicKey, alg: str) -> None:
    jwk = public_jwk(key)
    assert jwk["alg"] == alg and jwk["use"] == "sig" and jwk["kid"] == kid_for(key)
    assert "d" not in jwk
    assert kid_for(key_from_jwk(jwk)) == jwk["kid"]


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(),  # noqa: S505
    ],
)
def test_weak_or_unpinned_key_types_are_refused(key: PublicKey) -> None:
    with pytest.raises(KeyLoadError):
        algorithm_for(key)


def test_generate_dev_keys_creates_missing_pairs_once(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    created = generate_dev_keys(keys_dir)
    expected = {keys_dir / f"{name}.{kind}.pem" for name in ("issuer", "gateway") for kind in ("key", "pub")}
    expected |= {
        keys_dir / "agents" / f"{agent}.{kind}.pem" for agent in DEV_AGENTS for kind in ("key", "pub")
    }
    assert set(created) == expected
    for path in created:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.name.endswith(".key.pem") else 0o644), path
        if path.name.endswith(".key.pem"):
            private = load_private_key(path)
            public = load_public_key(path.with_name(path.name.replace(".key.", ".pub.")))
            assert kid_for(private.public_key()) == kid_for(public)
    before = (keys_dir / "issuer.key.pem").read_bytes()
    assert generate_dev_keys(keys_dir) == []
    assert (keys_dir / "issuer.key.pem").read_bytes() == before


def test_generate_dev_keys_fills_in_only_what_is_missing(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    generate_dev_keys(keys_dir, agents=["planner"])
    (keys_dir / "gateway.pub.pem").unlink()
    assert generate_dev_keys(keys_dir, agents=["planner", "auditor"]) == [
        keys_dir / "gateway.pub.pem",
        keys_dir / "agents" / "auditor.key.pem",
        keys_dir / "agents" / "auditor.pub.pem",
    ]
    gateway_private = load_private_key(keys_dir / "gateway.key.pem")
    assert kid_for(gateway_private.public_key()) == kid_for(load_public_key(keys_dir / "gateway.pub.pem"))


@pytest.mark.parametrize("agent", ["../evil", "", ".hidden"])
def test_agent_ids_cannot_escape_the_key_folder(tmp_path: Path, agent: str) -> None:
    with pytest.raises(KeyLoadError):
        generate_dev_keys(tmp_path / "keys", agents=[agent])


def test_rotate_issuer_key_keeps_the_old_public_key(keys_dir: Path) -> None:
    old_kid = kid_for(load_public_key(keys_dir / "issuer.pub.pem"))
    old_private = (keys_dir / "issuer.key.pem").read_bytes()

    new_kid = rotate_issuer_key(keys_dir)

    assert new_kid != old_kid
    assert kid_for(load_public_key(keys_dir / "issuer.pub.pem")) == new_kid
    assert kid_for(load_private_key(keys_dir / "issuer.key.pem").public_key()) == new_kid
    assert kid_for(load_public_key(keys_dir / f"issuer-{old_kid}.pub.pem")) == old_kid
    assert stat.S_IMODE((keys_dir / "issuer.key.pem").stat().st_mode) == 0o600
    private_files = [path.read_bytes() for path in keys_dir.rglob("*.key.pem")]
    assert old_private not in private_files  # the retired private key is gone
    assert sorted(path.name for path in keys_dir.glob("issuer*")) == sorted(
        ["issuer.key.pem", "issuer.pub.pem", f"issuer-{old_kid}.pub.pem"]
    )


def test_jwks_lists_the_public_keys(keys_dir: Path) -> None:
    paths = [keys_dir / "issuer.pub.pem", keys_dir / "gateway.pub.pem"]
    document = jwks(paths)
    assert [key["kid"] for key in document["keys"]] == [kid_for(load_public_key(path)) for path in paths]
    assert all(set(key) == {"kty", "crv", "x", "kid", "alg", "use"} for key in document["keys"])


def _secret_lines(pem: bytes) -> list[str]:
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


def test_errors_never_contain_key_material(tmp_path: Path) -> None:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    broken = tmp_path / "broken.key.pem"
    broken.write_bytes(pem.replace(b"MC4CAQAw", b"MC4CAQAx"))
    with pytest.raises(KeyLoadError) as private_error:
        load_private_key(broken)
    with pytest.raises(KeyLoadError) as public_error:
        load_public_key(broken)
    secret_jwk = {"kty": "OKP", "crv": "Ed25519", "x": "not*base64", "d": "c2VjcmV0LXNlZWQ"}
    with pytest.raises(KeyLoadError) as jwk_error:
        key_from_jwk(secret_jwk)
    for error in (private_error.value, public_error.value, jwk_error.value):
        message = str(error)
        assert error.__cause__ is None and error.__suppress_context__
        assert not any(line in message for line in _secret_lines(pem))
        assert "c2VjcmV0LXNlZWQ" not in message and "not*base64" not in message
