"""What the gateway presents to a tool's upstream: its own credential, never the agent's.

    [[tools]]
    name = "payments.transfer"
    assertion = true                           # also send a signed Gateway-Assertion
    [tools.credential]
    header = "Authorization"                   # the default
    prefix = "Bearer "
    value_env = "PAYMENTS_TOKEN"               # or value_file = "/run/secrets/payments"
    [tools.credential.roles.committer]         # optional per-role overrides
    value_file = "/run/secrets/payments-committer"

Values are read when the gateway starts: a variable that is not set or a file that
cannot be read is a ConfigError, so a replica never serves half-configured. Files are
re-read when they change (a rotated Kubernetes Secret), checked at most once a second;
a file that becomes unreadable keeps its last value. Values are held as `Secret`,
whose repr and str are masked, so a stray log line or error message cannot show one.

The assertion (`Gateway-Assertion`, a JWT signed with the gateway key, published at
/.well-known/jwks.json) tells the tool which agent and role the call is for, which
intent it commits and a digest of its arguments, valid for at most 60 seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt

from gateway import canonical
from gateway.config import Config, ConfigError, CredentialSource, GatewaySection, Tool
from gateway.keys import KeyLoadError, PrivateKey, algorithm_for, kid_for, load_private_key, public_jwk

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("gateway.credentials")

ASSERTION_HEADER = "Gateway-Assertion"
ASSERTION_TYPE = "gateway-assertion+jwt"
ASSERTION_TTL = 60  # seconds; the contract's maximum
RECHECK_FILES_EVERY = 1.0


class Secret:
    """A credential value: shown only by `reveal()`, masked everywhere else."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


def _clean(value: str, where: str) -> str:
    value = value.strip()
    if not value:
        raise ConfigError(f"{where}: the credential is empty")
    if any(char in value for char in "\r\n\0"):
        raise ConfigError(f"{where}: the credential contains a line break or NUL")
    return value


class _Value:
    """One credential value from an environment variable (read once) or a file (re-read on change)."""

    def __init__(self, source: CredentialSource, prefix: str, config: Config, where: str) -> None:
        self.where, self.prefix = where, prefix
        self.path = config.path(source.value_file) if source.value_file else None
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        if source.value_env is not None:
            raw = os.environ.get(source.value_env)
            if raw is None:
                raise ConfigError(f"{where}: environment variable {source.value_env} is not set")
            self._secret = Secret(prefix + _clean(raw, where))
        else:
            self._secret = self._read()

    def _read(self) -> Secret:
        assert self.path is not None
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ConfigError(f"{self.where}: cannot read {self.path} ({reason})") from None
        self._stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        self._checked = time.monotonic()
        return Secret(self.prefix + _clean(text, self.where))

    def get(self) -> Secret:
        if self.path is not None and time.monotonic() - self._checked >= RECHECK_FILES_EVERY:
            self._checked = time.monotonic()
            try:
                stat = self.path.stat()
                if (stat.st_ino, stat.st_mtime_ns, stat.st_size) != self._stamp:
                    self._secret = self._read()
                    log.info("%s: credential file changed; new value in use", self.where)
            except (OSError, ConfigError) as error:
                log.warning("%s: keeping the last credential value (%s)", self.where, error)
        return self._secret


class Credentials:
    """Each tool's upstream credential, by role."""

    def __init__(self, config: Config) -> None:
        self._tools: dict[str, tuple[str, _Value, dict[str, _Value]]] = {}
        # MCP servers' credentials are kept under "mcp:<server>" (gateway.mcp).
        specs = [(tool.name, tool.credential, f"tools.{tool.name}.credential") for tool in config.tools] + [
            (f"mcp:{server.name}", server.credential, f"mcp_servers.{server.name}.credential")
            for server in config.mcp_servers
        ]
        for name, spec, where in specs:
            if spec is None:
                continue
            default = _Value(spec, spec.prefix or "", config, where)
            roles = {
                role: _Value(
                    override,
                    (spec.prefix or "") if override.prefix is None else override.prefix,
                    config,
                    f"{where}.roles.{role}",
                )
                for role, override in spec.roles.items()
            }
            self._tools[name] = (spec.header, default, roles)

    def header(self, tool: str, role: str | None) -> tuple[str, Secret] | None:
        found = self._tools.get(tool)
        if found is None:
            return None
        name, default, roles = found
        value = roles.get(role, default) if role is not None else default
        return name, value.get()


def signing_key_path(config: Config) -> Path:
    """The gateway key; the default name follows `keys_dir` when only that was configured."""
    if config.gateway.signing_key == GatewaySection().signing_key:
        return config.path(config.gateway.keys_dir) / "gateway.key.pem"
    return config.path(config.gateway.signing_key)


def arguments_digest(arguments: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical.dumps(arguments)).hexdigest()


class AssertionSigner:
    """Signs `Gateway-Assertion` JWTs with the gateway key (loaded lazily unless required)."""

    def __init__(self, config: Config) -> None:
        self.path = signing_key_path(config)
        self.issuer = config.gateway.audience
        self._key: PrivateKey | None = None
        self._kid = self._alg = ""
        self.required = any(tool.assertion for tool in config.tools)
        # A tool needs the key: a missing one is a start-up error, unless the gateway runs
        # on dev defaults and creates its keys when it starts (Gateway.start loads it then).
        if self.required and (config.issuers or self.path.exists()):
            self.load()

    def load(self) -> PrivateKey:
        if self._key is None:
            try:
                key = load_private_key(self.path)
            except KeyLoadError as error:
                raise ConfigError(f"gateway.signing_key: {error}") from None
            self._kid, self._alg = kid_for(key.public_key()), algorithm_for(key)
            self._key = key
        return self._key

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public half, for tools to verify assertions; empty when there is no key."""
        try:
            key = self.load()
        except ConfigError:
            return {"keys": []}
        return {"keys": [public_jwk(key.public_key())]}

    def sign(self, *, tool: str, sub: str, role: str, arguments: Any, intent_id: str | None = None) -> str:
        key = self.load()
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": tool,
            "sub": sub,
            "role": role,
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_TTL,
            "jti": uuid.uuid4().hex,
            "args_digest": arguments_digest(arguments),
        }
        if intent_id is not None:
            claims["intent_id"] = intent_id
        return jwt.encode(claims, key, algorithm=self._alg, headers={"typ": ASSERTION_TYPE, "kid": self._kid})


def _caller(principal: Any) -> tuple[str, str]:
    if isinstance(principal, Mapping):
        return str(principal.get("sub", "")), str(principal.get("role", ""))
    return str(getattr(principal, "sub", "")), str(getattr(principal, "role", ""))


def upstream_headers(
    gateway: Gateway, tool: Tool, principal: Any, *, arguments: Any = None, intent_id: str | None = None
) -> dict[str, str]:
    """The headers the gateway adds for `tool`'s upstream: its credential and assertion.

    `principal` is the caller (a Principal, or an actor mapping with `sub` and `role`).
    Callers set these last, over whatever else they send, so no header the agent sent
    can stand in for the gateway's credential.
    """
    headers: dict[str, str] = {}
    if tool.credential is None and not tool.assertion:
        return headers
    sub, role = _caller(principal)
    found = gateway.credentials.header(tool.name, role)
    if found is not None:
        headers[found[0]] = found[1].reveal()
    if tool.assertion:
        headers[ASSERTION_HEADER] = gateway.assertions.sign(
            tool=tool.name, sub=sub, role=role, arguments=arguments, intent_id=intent_id
        )
    return headers


def merge(headers: dict[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """`headers` with `extra` set over any same-named header, whatever its case."""
    if not extra:
        return headers
    replaced = {name.lower() for name in extra}
    merged = {name: value for name, value in headers.items() if name.lower() not in replaced}
    merged.update(extra)
    return merged
