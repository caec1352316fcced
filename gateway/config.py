"""The gateway's configuration: one TOML file, validated once at start.

Every problem in the file becomes one `ConfigError` whose message names the
offending key, so `agent-gateway serve` can print a single line instead of a
traceback.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = "gateway.toml"
CONFIG_ENV = "AGENT_GATEWAY_CONFIG"


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line naming the key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Model):
    connect: Annotated[float, Field(gt=0, le=60)] = 2.0
    read: Annotated[float, Field(gt=0, le=600)] = 30.0


class GatewaySection(_Model):
    audience: str = "agent-gateway"
    database: str = "sqlite+aiosqlite:///var/gateway.db"
    # Per replica; keep replicas x (pool + overflow + statement pool) under PostgreSQL's
    # max_connections (100 by default), or put PgBouncer in front.
    # SQLAlchemy's pool: transactions of several statements, background work.
    db_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    db_max_overflow: Annotated[int, Field(ge=0, le=200)] = 10
    # PostgreSQL only, asyncpg's own pool: the commit protocol's one-statement steps (the hot
    # path), opened on first use and closed again after 5 idle minutes.
    db_statement_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    keys_dir: str = "keys"
    var_dir: str = "var"
    decision_log: str | None = "var/decisions.jsonl"
    max_body_bytes: Annotated[int, Field(gt=0)] = 1_048_576
    timeouts: Timeouts = Timeouts()
    # Gateway's own Ed25519 key: signs ledger checkpoints and upstream assertions.
    signing_key: str = "keys/gateway.key.pem"
    idempotency_ttl_seconds: Annotated[int, Field(ge=86_400)] = 86_400
    approval_ttl_seconds: Annotated[int, Field(gt=0)] = 3_600
    supported_schema_versions: list[str] = ["1"]
    # Shared state of the replicas besides the database: rate-limit counters.
    redis_url: str | None = None
    # On SIGTERM: /readyz answers 503 at once, new connections are still taken for
    # `drain_seconds` (while the balancer notices), then in-flight requests get
    # `shutdown_timeout` seconds to finish. Commits already executing always finish.
    drain_seconds: Annotated[float, Field(ge=0, le=300)] = 5.0
    shutdown_timeout: Annotated[float, Field(gt=0, le=600)] = 10.0

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(REDIS_SCHEMES):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value


REDIS_SCHEMES = ("redis://", "rediss://", "redis+unix://")


class RateLimitsSection(_Model):
    """Where rate-limit counters live: this process (`memory`) or Redis, shared by replicas."""

    # Default: [gateway] redis_url when set, else memory.
    storage: str | None = None
    # fixed-window: one Redis round trip per limit, but up to twice the rate across a window
    # boundary; moving-window: never more than the rate in any window, two round trips.
    strategy: Literal["fixed-window", "moving-window"] = "fixed-window"
    # Seconds the counter updates of one call may take; past it the call fails closed (503).
    timeout: Annotated[float, Field(gt=0, le=5)] = 1.0
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]+$")] = "agent-gateway"

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        if value is None or value in ("memory", "memory://"):
            return value
        if not value.removeprefix("async+").startswith(REDIS_SCHEMES):
            raise ValueError('must be "memory" or a redis:// or rediss:// URL')
        return value


class LimitMatch(_Model):
    """Which calls a limit counts; keys left out match everything. `tool` is a glob."""

    sub: str | None = None
    role: str | None = None
    tool: str | None = None


class Limit(_Model):
    """`[[limits]] match = {role = "worker", tool = "email.*"} rate = "30/minute"`."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")] | None = None
    match: LimitMatch = LimitMatch()
    rate: str  # the `limits` library's notation: "30/minute", "1000 per day"
    # What gets its own counter: by default each agent has its own budget.
    per: list[Literal["sub", "role", "tool"]] = ["sub"]

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        from limits import parse_many

        try:
            items = parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate such as '30/minute'") from None
        if len(items) != 1:
            raise ValueError("one rate per [[limits]] entry; add another entry for a second window")
        return value


class CredentialSource(_Model):
    """Where a credential's value comes from: an environment variable or a file (a mounted Secret)."""

    value_env: str | None = None
    value_file: str | None = None
    prefix: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CredentialSource:
        if (self.value_env is None) == (self.value_file is None):
            raise ValueError("set exactly one of value_env and value_file")
        return self


class Credential(CredentialSource):
    """What the gateway presents to a tool's upstream; never anything the agent sent."""

    header: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]+$")] = "Authorization"
    prefix: str | None = ""
    roles: dict[str, CredentialSource] = {}  # per-role overrides

    @field_validator("header")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() in RESERVED_UPSTREAM_HEADERS:
            raise ValueError(f"{value!r} is set by the gateway itself")
        return value


# Headers a credential may not replace: framing, and what the gateway sets on every call.
RESERVED_UPSTREAM_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "traceparent", "idempotency-key"}
    | {"gateway-assertion", "gateway-intent-id", "content-type"}
)


class ApprovalsSection(_Model):
    """Human approval (contract §5): the webhook told of new pending approvals, the page's sessions."""

    # POSTed a JSON body signed `X-Signature: sha256=<hex HMAC-SHA256(secret, body)>`.
    webhook_url: str | None = None
    # The environment variable holding the HMAC secret; required with webhook_url.
    webhook_secret_env: str | None = None
    webhook_max_attempts: Annotated[int, Field(ge=1, le=20)] = 6
    # Attempt n waits backoff * 2^(n-1) seconds after attempt n-1 failed.
    webhook_backoff_seconds: Annotated[float, Field(gt=0, le=3600)] = 2.0
    webhook_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    # Absolute base URL of the gateway for links in webhook bodies, e.g. https://gw.example.com.
    public_url: str | None = None
    # Seconds between sweeps that expire overdue approvals and send queued webhooks.
    sweep_interval: Annotated[float, Field(gt=0, le=3600)] = 2.0
    # An approvals-page session ends at this age or when its sign-in token expires.
    session_seconds: Annotated[int, Field(ge=60, le=86_400)] = 28_800

    @field_validator("webhook_url", "public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _secret_with_url(self) -> ApprovalsSection:
        if self.webhook_url and not self.webhook_secret_env:
            raise ValueError("webhook_url needs webhook_secret_env: webhooks are always signed")
        return self


class PolicySection(_Model):
    engine: Literal["embedded", "opa"] = "embedded"
    dir: str = "policies"
    opa_url: str = "http://127.0.0.1:8181"
    reload: bool = True
    reload_interval: Annotated[float, Field(gt=0)] = 1.0
    memo_size: Annotated[int, Field(ge=0)] = 4096  # embedded engine's decision memo; 0 turns it off


class Issuer(_Model):
    """Who may mint role JWTs, with which keys and algorithms."""

    iss: str
    algorithms: list[Literal["EdDSA", "ES256", "RS256"]] = ["EdDSA"]
    keys: list[str] = []
    jwks_url: str | None = None
    max_lifetime: Annotated[int, Field(gt=0, le=86_400)] = 3_600
    leeway: Annotated[int, Field(ge=0, le=60)] = 30


class Agent(_Model):
    """An agent whose signature on handoff envelopes the gateway accepts."""

    id: str
    algorithms: list[Literal["EdDSA", "ES256", "RS256"]] = ["EdDSA"]
    keys: list[str] = []
    jwks_url: str | None = None


class Tool(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
    upstream: str
    effect: Literal["read", "write", "irreversible"] = "read"
    risk: Literal["low", "medium", "high"] = "low"
    input_schema: str | dict[str, Any] | None = None
    compensation: str | None = None
    description: str = ""
    credential: Credential | None = None
    # Send a short-lived `Gateway-Assertion` JWT (signed with the gateway key) upstream.
    assertion: bool = False

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


Effect = Literal["read", "write", "irreversible"]
Risk = Literal["low", "medium", "high"]
MCP_TOOL_PREFIX = "mcp:"


class McpTool(_Model):
    """How the gateway treats one tool of an MCP server.

    The server's own annotations (`readOnlyHint`, ...) are hints from the server, never
    trusted: the effect comes from here, and a tool not listed here gets the server's
    defaults, which are effectful until an operator says otherwise.
    """

    effect: Effect = "irreversible"
    risk: Risk = "high"
    compensation: str | None = None  # "mcp:<server>/<tool>" or an HTTP tool name
    description: str = ""


class McpServer(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")]
    url: str
    # The gateway's own credential for the server, as for [[tools]] (gateway.credentials).
    # The agent's token is never forwarded: MCP forbids token passthrough.
    credential: Credential | None = None
    tools: dict[str, McpTool] = {}
    # Unlisted tools fail safe: they need a commit, and policy sees them as high risk.
    default_effect: Effect = "irreversible"
    default_risk: Risk = "high"
    # Seconds of silence tolerated on an MCP response stream (SSE streams are long-lived).
    read_timeout: Annotated[float, Field(gt=0, le=3600)] = 300.0
    # Seconds a tools/list answer is trusted as the source of input schemas.
    schema_ttl: Annotated[float, Field(ge=0, le=86_400)] = 300.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def tool(self, mcp_name: str) -> McpToolRef:
        listed = self.tools.get(mcp_name)
        return McpToolRef(
            name=f"{MCP_TOOL_PREFIX}{self.name}/{mcp_name}",
            upstream=self.url,
            effect=listed.effect if listed else self.default_effect,
            risk=listed.risk if listed else self.default_risk,
            compensation=listed.compensation if listed else None,
            description=listed.description if listed else "",
            server=self.name,
            mcp_name=mcp_name,
        )


class McpToolRef(Tool):
    """A tool of an MCP server, named `mcp:<server>/<tool>` wherever the gateway names tools.

    HTTP tool names cannot contain ':' or '/', so the two namespaces never collide.
    """

    name: Annotated[str, Field(pattern=r"^mcp:[A-Za-z0-9][A-Za-z0-9_\-]*/.+$")]
    server: str
    mcp_name: Annotated[str, Field(min_length=1)]


# Built in: a commit of `memory.set` calls no upstream; its effect is the intent's
# memory_writes (gateway.memory). The URL is never used (.invalid never resolves).
MEMORY_TOOL = Tool(
    name="memory.set",
    upstream="http://memory.invalid/",
    effect="write",
    risk="low",
    description="Write canonical memory (memory_writes) through a commit; no upstream is called.",
)


class Config(_Model):
    gateway: GatewaySection = GatewaySection()
    policy: PolicySection = PolicySection()
    issuers: list[Issuer] = []
    agents: list[Agent] = []
    tools: list[Tool] = []
    mcp_servers: list[McpServer] = []
    limits: list[Limit] = []
    rate_limits: RateLimitsSection = RateLimitsSection()
    approvals: ApprovalsSection = ApprovalsSection()
    base_dir: str = "."

    def tool(self, name: str) -> Tool | None:
        for tool in self.tools:
            if tool.name == name:
                return tool
        if name == MEMORY_TOOL.name:
            return MEMORY_TOOL
        return self.mcp_tool(name)

    def mcp_server(self, name: str) -> McpServer | None:
        return next((server for server in self.mcp_servers if server.name == name), None)

    def mcp_tool(self, name: str) -> McpToolRef | None:
        """`mcp:<server>/<tool>` on a configured server; any tool name resolves (unlisted: defaults)."""
        if not name.startswith(MCP_TOOL_PREFIX):
            return None
        server_name, _, mcp_name = name[len(MCP_TOOL_PREFIX) :].partition("/")
        server = self.mcp_server(server_name)
        return server.tool(mcp_name) if server is not None and mcp_name else None

    def path(self, relative: str) -> Path:
        """Resolve a path from the file against the file's folder."""
        candidate = Path(relative)
        return candidate if candidate.is_absolute() else Path(self.base_dir) / candidate

    @property
    def rate_limit_storage(self) -> str:
        """The `limits` storage URI: `memory://` or `async+redis://…`."""
        storage = self.rate_limits.storage or self.gateway.redis_url or "memory://"
        if storage in ("memory", "memory://"):
            return "memory://"
        return storage if storage.startswith("async+") else "async+" + storage

    @property
    def database_url(self) -> str:
        url = self.gateway.database
        prefix = "sqlite+aiosqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.path(url[len(prefix) :]).resolve())
        return url


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    return f"{where}: {first['msg']}"


def parse_config(data: dict[str, Any], base_dir: str | Path = ".") -> Config:
    try:
        config = Config.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    names = [tool.name for tool in config.tools]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ConfigError(f"tools: duplicate tool name {duplicated[0]!r}")
    if MEMORY_TOOL.name in names:
        raise ConfigError(f"tools: {MEMORY_TOOL.name!r} is built in; choose another name")
    for tool in config.tools:
        if tool.compensation and tool.compensation not in names:
            raise ConfigError(f"tools.{tool.name}.compensation: no tool named {tool.compensation!r}")
    servers = [server.name for server in config.mcp_servers]
    duplicated = sorted({name for name in servers if servers.count(name) > 1})
    if duplicated:
        raise ConfigError(f"mcp_servers: duplicate server name {duplicated[0]!r}")
    for server in config.mcp_servers:
        for name, mcp_tool in server.tools.items():
            if mcp_tool.compensation and config.tool(mcp_tool.compensation) is None:
                where = f"mcp_servers.{server.name}.tools.{name}.compensation"
                raise ConfigError(f"{where}: no tool named {mcp_tool.compensation!r}")
    limit_names = [limit_name(index, limit) for index, limit in enumerate(config.limits)]
    duplicated = sorted({name for name in limit_names if limit_names.count(name) > 1})
    if duplicated:
        raise ConfigError(f"limits: duplicate limit name {duplicated[0]!r}")
    return config


def limit_name(index: int, limit: Limit) -> str:
    """A limit's name in headers and metrics: its own, or `limit-<n>` (1-based)."""
    return limit.name or f"limit-{index + 1}"


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate the TOML file; a missing default file means embedded defaults."""
    explicit = path or os.environ.get(CONFIG_ENV)
    file = Path(explicit or DEFAULT_CONFIG)
    if not file.exists():
        if explicit:
            raise ConfigError(f"{file}: no such configuration file")
        return parse_config({}, Path.cwd())
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file}: {error}") from None
    try:
        return parse_config(data, file.resolve().parent)
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from None
