"""Binding MCP sessions to the agent that opened them.

The MCP server issues `Mcp-Session-Id`, but it never sees who the caller is: the
gateway talks to it with its own credential. So the gateway hands the client a
session id that carries a MAC over (server, issuer, subject, upstream id), and
accepts it back only from the same agent. A session id that leaks to another agent
is useless to it, and every replica that shares the gateway key accepts it (the MAC
key is derived from the gateway's signing key), so no session table is needed.

An id that does not verify is answered like an unknown session (404), as the MCP
specification asks, so the client starts a new one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.identity import Principal
from gateway.keys import KeyLoadError, load_private_key
from gateway.problems import NotFound

log = logging.getLogger("gateway.mcp")

MAX_UPSTREAM_ID = 256
_TAG_CHARS = 32  # 192 bits of the HMAC, base64url


class SessionUnknown(NotFound):
    name, title = "mcp-session-unknown", "Unknown MCP session"


def _visible_ascii(value: str) -> bool:
    return bool(value) and all(0x21 <= ord(char) <= 0x7E for char in value)


class SessionBinder:
    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_key_file(cls, path: Path) -> SessionBinder:
        """Derive the MAC key from the gateway's private key; a random one if there is none."""
        try:
            private = load_private_key(path)
        except KeyLoadError:
            log.warning("no gateway key at %s: MCP session ids are valid on this process only", path)
            return cls(secrets.token_bytes(32))
        material = private.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        hkdf = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"agent-gateway mcp session binding")
        return cls(hkdf.derive(material))

    def _tag(self, server: str, principal: Principal, upstream_id: str) -> str:
        message = "\0".join(("mcp-session", server, principal.iss, principal.sub, upstream_id)).encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii")[:_TAG_CHARS]

    def wrap(self, server: str, principal: Principal, upstream_id: str) -> str:
        if len(upstream_id) > MAX_UPSTREAM_ID or not _visible_ascii(upstream_id):
            raise ValueError("the MCP server sent an unusable Mcp-Session-Id")
        return f"{upstream_id}.{self._tag(server, principal, upstream_id)}"

    def unwrap(self, server: str, principal: Principal, presented: str) -> str:
        upstream_id, dot, tag = presented.strip().rpartition(".")
        if (
            not dot
            or not upstream_id
            or not hmac.compare_digest(tag.encode(), self._tag(server, principal, upstream_id).encode())
        ):
            raise SessionUnknown(
                "this MCP session does not exist or belongs to another agent; initialize a new one"
            )
        return upstream_id
