"""MCP through the gateway (issue 6): the official SDK on both sides, real servers on loopback.

An SDK client (role JWT in its HTTP headers) talks to an SDK `MCPServer` through the
gateway's `/mcp/{server}`; the gateway and the tool server each run on uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import mcp.client.session
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, ToolAnnotations

from tests.conftest import REPO, gateway_config, role_token
from tests.protocol import Agents, new_task, propose_and_verify
from tests.servers import run_server

PROBLEMS = "https://agent-gateway.dev/problems/"
TOKEN_ENV = "AGW_TEST_MCP_TOKEN"
UPSTREAM_TOKEN = "gateway-credential-for-docs"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# Which revision the SDK client speaks: "legacy" mode is the initialize handshake at
# the version below; "auto" discovers 2026-07-28 (the per-request envelope).
PROTOCOLS = {"2025-06-18": "legacy", "2025-11-25": "legacy", "2026-07-28": "auto"}


# --- the MCP tool server --------------------------------------------------------------


@dataclass
class ToolServer:
    url: str
    json_url: str
    effects: list[tuple[str, Any]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    keys: list[tuple[str, str | None]] = field(default_factory=list)  # (Idempotency-Key header, _meta key)
    keyed_requests: int = 0  # HTTP requests that carried an Idempotency-Key


def build_server(state: ToolServer) -> MCPServer:
    server = MCPServer("docs")

    @server.tool()
    def search(q: str) -> str:
        """Search the documentation."""
        state.calls.append("search")
        return f"result for {q}"

    @server.tool()
    def secret(q: str) -> str:
        """A read tool the worker role is not granted."""
        state.calls.append("secret")
        return "classified"

    @server.tool()
    async def countdown(n: int, ctx: Context) -> str:
        """A long read: one progress notification every 0.3 s."""
        state.calls.append("countdown")
        for step in range(n):
            await ctx.report_progress(step + 1, n, f"step {step + 1}")
            await asyncio.sleep(0.3)
        return "liftoff"

    @server.tool()
    def inspect(ctx: Context) -> str:
        """What the server saw: the request's _meta and HTTP headers."""
        state.calls.append("inspect")
        request = ctx.request_context.request
        headers = dict(request.headers) if request is not None else {}
        return json.dumps({"meta": dict(ctx.request_context.meta or {}), "headers": headers})

    # The server calls it read-only; the gateway's configuration says otherwise.
    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def publish(title: str, body: str, ctx: Context) -> str:
        """Publish a page (a side effect)."""
        state.effects.append(("publish", title))
        request = ctx.request_context.request
        header = request.headers.get("idempotency-key") if request is not None else None
        state.keys.append((header, (ctx.request_context.meta or {}).get("agent-gateway/idempotency_key")))
        return f"published {title}"

    @server.tool()
    def wire(to: str, amount: int) -> str:
        """Move money (irreversible, high risk: needs an approval)."""
        state.effects.append(("wire", amount))
        return f"sent {amount} to {to}"

    @server.tool()
    def cleanup() -> str:
        """Not listed in the gateway's configuration: treated as irreversible."""
        state.effects.append(("cleanup", None))
        return "cleaned"

    return server


def require_credential(app: Any, state: ToolServer) -> Any:
    """The tool server accepts only the gateway's own credential (ASGI middleware)."""

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and any(name == b"idempotency-key" for name, _ in scope["headers"]):
            state.keyed_requests += 1
        if (
            scope["type"] == "http"
            and (b"authorization", f"Bearer {UPSTREAM_TOKEN}".encode()) not in scope["headers"]
        ):
            await send(
                {"type": "http.response.start", "status": 401, "headers": [(b"www-authenticate", b"Bearer")]}
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)

    return guarded


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ToolServer]:
    state = ToolServer("", "")
    sse_app = build_server(state).streamable_http_app()
    json_app = build_server(state).streamable_http_app(json_response=True)
    with (
        run_server(require_credential(sse_app, state)) as sse_url,
        run_server(require_credential(json_app, state)) as json_url,
    ):
        state.url, state.json_url = f"{sse_url}/mcp", f"{json_url}/mcp"
        yield state


@pytest.fixture
def upstream_state(tool_server: ToolServer) -> ToolServer:
    tool_server.effects.clear()
    tool_server.calls.clear()
    tool_server.keys.clear()
    tool_server.keyed_requests = 0
    return tool_server


# --- the gateway ------------------------------------------------------------------------


def mcp_servers(tool_server: ToolServer) -> list[dict[str, Any]]:
    tools = {
        "search": {"effect": "read", "risk": "low"},
        "secret": {"effect": "read", "risk": "low"},
        "countdown": {"effect": "read", "risk": "low"},
        "inspect": {"effect": "read", "risk": "low"},
        "publish": {"effect": "write", "risk": "medium"},
        "wire": {"effect": "irreversible", "risk": "high"},
    }
    credential = {"header": "Authorization", "prefix": "Bearer ", "value_env": TOKEN_ENV}
    return [
        {
            "name": "docs",
            "url": tool_server.url,
            "credential": credential,
            "tools": tools,
            "read_timeout": 10,
        },
        {"name": "docsjson", "url": tool_server.json_url, "credential": credential, "tools": tools},
        {"name": "down", "url": "http://127.0.0.1:9/mcp", "tools": tools},
    ]


def policy_dir(tmp_path: Path) -> Path:
    """The shipped policy, with the worker granted every docs tool but `secret`."""
    folder = tmp_path / "policies"
    folder.mkdir()
    for source in (REPO / "policies").glob("*.rego"):
        if not source.name.endswith("_test.rego"):
            shutil.copy(source, folder / source.name)
    data = json.loads((REPO / "policies" / "data.json").read_text())
    granted = [
        f"mcp:{server}/{tool}"
        for server in ("docs", "docsjson")
        for tool in ("search", "countdown", "inspect")
    ]
    data["roles"]["worker"]["tools"] = ["docs.*", *granted]
    (folder / "data.json").write_text(json.dumps(data))
    return folder


@dataclass
class Gateway:
    url: str
    http: httpx.AsyncClient
    agents: Agents
    keys_dir: Path

    def mcp_url(self, server: str = "docs") -> str:
        return f"{self.url}/mcp/{server}"


@pytest.fixture
async def gateway(
    tmp_path: Path,
    database_url: str,
    upstream: tuple[str, Any],
    keys_dir: Path,
    upstream_state: ToolServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Gateway]:
    from gateway.app import create_app

    monkeypatch.setenv(TOKEN_ENV, UPSTREAM_TOKEN)
    config = gateway_config(
        tmp_path,
        database_url,
        upstream[0],
        keys_dir=keys_dir,
        mcp_servers=mcp_servers(upstream_state),
        policy={"dir": str(policy_dir(tmp_path))},
    )
    app = create_app(config)
    app.state.gateway.commit_wait = 5.0
    with run_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield Gateway(url, http, Agents(keys_dir), keys_dir)


@asynccontextmanager
async def mcp_client(
    url: str,
    headers: dict[str, str],
    protocol: str = "2025-11-25",
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> AsyncIterator[Client]:
    """An SDK client through the gateway, speaking `protocol`."""
    if protocol == "2025-06-18":
        assert monkeypatch is not None
        monkeypatch.setattr(mcp.client.session, "LATEST_HANDSHAKE_VERSION", "2025-06-18")
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=30)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=PROTOCOLS[protocol], cache=None, read_timeout_seconds=30) as client:
            assert client.protocol_version == protocol
            yield client


def bearer(gw: Gateway, role: str, sub: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {role_token(gw.keys_dir, role, sub, ttl=3600)}"}


def text(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if block.type == "text")


def mcp_error(error: BaseException) -> MCPError:
    """The MCPError inside what the SDK raised (connecting wraps it in exception groups)."""
    if isinstance(error, MCPError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            with contextlib.suppress(LookupError):
                return mcp_error(inner)
    raise LookupError(f"no MCPError in {error!r}")


def problem(error: MCPError, name: str) -> dict[str, Any]:
    data = error.error.data
    assert isinstance(data, dict), error
    assert data["type"] == PROBLEMS + name, data
    return data


# --- listing and calling ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
async def test_role_lists_only_the_tools_it_may_use(
    gateway: Gateway, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with mcp_client(gateway.mcp_url(), bearer(gateway, "worker"), protocol, monkeypatch) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert names == {"search", "countdown", "inspect"}  # not secret (ungranted), not the effectful ones

    async with mcp_client(gateway.mcp_url(), bearer(gateway, "committer"), protocol, monkeypatch) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert names == {"publish", "wire", "cleanup"}  # effectful only: the committer has no "call"


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
async def test_read_tool_is_relayed(
    gateway: Gateway, upstream_state: ToolServer, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with mcp_client(gateway.mcp_url(), bearer(gateway, "worker"), protocol, monkeypatch) as client:
        result = await client.call_tool("search", {"q": "refunds"})
    assert not result.is_error
    assert text(result) == "result for refunds"
    assert upstream_state.calls == ["search"]


async def test_json_response_server(gateway: Gateway, upstream_state: ToolServer) -> None:
    async with mcp_client(gateway.mcp_url("docsjson"), bearer(gateway, "worker")) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("search", {"q": "json"})
    assert names == {"search", "countdown", "inspect"}
    assert text(result) == "result for json"


async def test_callers_token_never_reaches_the_server_and_trace_is_propagated(gateway: Gateway) -> None:
    caller = bearer(gateway, "worker")
    async with mcp_client(gateway.mcp_url(), {**caller, "traceparent": TRACEPARENT}) as client:
        seen = json.loads(text(await client.call_tool("inspect", {}, meta={"traceparent": TRACEPARENT})))
    headers, meta = seen["headers"], seen["meta"]
    assert headers["authorization"] == f"Bearer {UPSTREAM_TOKEN}"  # the gateway's own credential
    assert caller["Authorization"] not in json.dumps(seen)
    trace_id = TRACEPARENT.split("-")[1]
    for carried in (headers["traceparent"], meta["traceparent"]):
        assert carried.split("-")[1] == trace_id  # same trace ...
        assert carried != TRACEPARENT  # ... with the gateway's span as the parent
    assert headers["traceparent"] == meta["traceparent"]
    assert not any(key.startswith("agent-gateway/") for key in meta)


@pytest.mark.parametrize("protocol", ["2025-11-25", "2026-07-28"])
async def test_denied_tool_fails_with_the_reason(
    gateway: Gateway, upstream_state: ToolServer, protocol: str
) -> None:
    async with mcp_client(gateway.mcp_url(), bearer(gateway, "worker"), protocol) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("secret", {"q": "x"})
    assert raised.value.error.code == -32010
    data = problem(raised.value, "policy-denied")
    assert data["reasons"] == ['role "worker" may not use tool "mcp:docs/secret"']
    assert data["decision_id"]
    assert "may not use tool" in raised.value.error.message
    assert upstream_state.calls == []


async def test_unknown_role_cannot_use_the_server(gateway: Gateway) -> None:
    with pytest.raises(BaseException) as raised:
        async with mcp_client(gateway.mcp_url(), bearer(gateway, "intruder")):
            pass
    error = mcp_error(raised.value)
    assert error.error.code == -32010
    assert problem(error, "policy-denied")["reasons"] == ['role "intruder" is not defined in the policy']


async def test_no_token_is_refused(gateway: Gateway) -> None:
    with pytest.raises(BaseException) as raised:
        async with mcp_client(gateway.mcp_url(), {}):
            pass
    error = mcp_error(raised.value)
    assert error.error.code == -32011
    problem(error, "token-invalid")


async def test_invalid_arguments_and_unknown_tools(gateway: Gateway, upstream_state: ToolServer) -> None:
    async with mcp_client(gateway.mcp_url(), bearer(gateway, "worker")) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("search", {"q": 5})
        assert raised.value.error.code == -32602
        assert problem(raised.value, "input-invalid")["errors"] == [
            {"path": "/q", "message": "5 is not of type 'string'"}
        ]
        with pytest.raises(MCPError) as raised:
            await client.call_tool("nope", {})
        assert raised.value.error.code == -32602
        problem(raised.value, "unknown-tool")
    assert upstream_state.calls == []


@pytest.mark.parametrize("tool", ["publish", "cleanup"])
async def test_effectful_tool_is_never_called_directly(
    gateway: Gateway, upstream_state: ToolServer, tool: str
) -> None:
    """`publish` claims readOnlyHint; `cleanup` is not configured: both need a commit."""
    arguments = {"title": "t", "body": "b"} if tool == "publish" else {}
    async with mcp_client(gateway.mcp_url(), bearer(gateway, "planner")) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool(tool, arguments)
    assert raised.value.error.code == -32010
    assert problem(raised.value, "commit-required")["tool"] == f"mcp:docs/{tool}"
    assert upstream_state.effects == []


# --- streaming --------------------------------------------------------------------------


async def test_progress_arrives_while_the_tool_runs(gateway: Gateway) -> None:
    arrivals: list[float] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        arrivals.append(time.monotonic())

    async with mcp_client(gateway.mcp_url(), bearer(gateway, "worker")) as client:
        await client.list_tools()
        result = await client.call_tool("countdown", {"n": 4}, progress_callback=progress)
        finished = time.monotonic()
    assert text(result) == "liftoff"
    assert len(arrivals) == 4
    # Relayed as sent, not buffered: spread over the tool's run (3 pauses of 0.3 s),
    # and the first long before the answer.
    assert arrivals[-1] - arrivals[0] > 0.6
    assert finished - arrivals[0] > 0.6


# --- the commit protocol --------------------------------------------------------------------


def commit_meta(intent_id: str, key: str) -> dict[str, Any]:
    return {"agent-gateway/intent_id": intent_id, "agent-gateway/idempotency_key": key}


@pytest.mark.parametrize("protocol", ["2025-11-25", "2026-07-28"])
async def test_effectful_tool_is_committed_exactly_once(
    gateway: Gateway, upstream_state: ToolServer, protocol: str
) -> None:
    task = new_task()
    arguments = {"title": "Release notes", "body": "v2"}
    intent_id = await propose_and_verify(gateway.http, gateway.agents, task, "mcp:docs/publish", arguments)
    committer = gateway.agents.headers("committer", task)
    async with mcp_client(gateway.mcp_url(), committer, protocol) as client:
        first = await client.call_tool("publish", arguments, meta=commit_meta(intent_id, "k-1"))
        again = await client.call_tool("publish", arguments, meta=commit_meta(intent_id, "k-1"))
        other_key = await client.call_tool("publish", arguments, meta=commit_meta(intent_id, "k-2"))
        with pytest.raises(MCPError) as raised:
            await client.call_tool("publish", {**arguments, "body": "v3"}, meta=commit_meta(intent_id, "k-3"))
    problem(raised.value, "intent-mismatch")
    for result in (first, again, other_key):
        assert not result.is_error
        assert text(result) == "published Release notes"
        assert result.meta is not None
        assert result.meta["agent-gateway/intent_id"] == intent_id
        assert result.meta["agent-gateway/status"] == "committed"
    assert again.meta is not None and again.meta["agent-gateway/replayed"] is True
    assert upstream_state.effects == [("publish", "Release notes")]
    # The server can dedupe too: the intent-derived key rides on the tools/call, and only there.
    assert upstream_state.keys == [(f'"{intent_id}"', intent_id)]
    assert upstream_state.keyed_requests == 1

    intent = (await gateway.http.get(f"/intents/{intent_id}", headers=committer)).json()
    assert intent["status"] == "committed"
    assert intent["result"]["body"]["result"]["body"]["content"][0]["text"] == "published Release notes"
    assert [entry["event"] for entry in intent["history"]][-2:] == ["commit_started", "committed"]


async def test_commit_needs_the_committer_and_an_intent(gateway: Gateway, upstream_state: ToolServer) -> None:
    task = new_task()
    arguments = {"title": "x", "body": "y"}
    intent_id = await propose_and_verify(gateway.http, gateway.agents, task, "mcp:docs/publish", arguments)
    async with mcp_client(gateway.mcp_url(), gateway.agents.headers("planner", task)) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("publish", arguments, meta=commit_meta(intent_id, "k"))
    problem(raised.value, "forbidden")
    async with mcp_client(gateway.mcp_url(), gateway.agents.headers("committer", task)) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("publish", arguments, meta={"agent-gateway/intent_id": intent_id})
        problem(raised.value, "idempotency-key-missing")
        with pytest.raises(MCPError) as raised:
            await client.call_tool("publish", arguments, meta=commit_meta("in_nope", "k"))
        problem(raised.value, "not-found")
    assert upstream_state.effects == []


async def test_handoff_envelope_may_travel_in_meta(gateway: Gateway, upstream_state: ToolServer) -> None:
    task = new_task()
    arguments = {"title": "Via meta", "body": "b"}
    intent_id = await propose_and_verify(gateway.http, gateway.agents, task, "mcp:docs/publish", arguments)
    headers = gateway.agents.headers("committer", task)
    envelope = headers.pop("Agent-Handoff")
    async with mcp_client(gateway.mcp_url(), headers) as client:
        with pytest.raises(MCPError) as raised:  # the commit policy wants an envelope
            await client.call_tool("publish", arguments, meta=commit_meta(intent_id, "k-1"))
        assert problem(raised.value, "policy-denied")["reasons"] == ["handoff envelope required"]
        meta = {**commit_meta(intent_id, "k-2"), "agent-gateway/handoff": envelope}
        result = await client.call_tool("publish", arguments, meta=meta)
        with pytest.raises(MCPError) as raised:  # an envelope must verify
            await client.call_tool(
                "search", {"q": "x"}, meta={"agent-gateway/handoff": envelope[:-4] + "AAAA"}
            )
        problem(raised.value, "envelope-signature-invalid")
    assert text(result) == "published Via meta"
    assert upstream_state.effects == [("publish", "Via meta")]


async def test_mcp_intent_committed_over_http(gateway: Gateway, upstream_state: ToolServer) -> None:
    """`POST /intents/{id}/commit` runs an MCP tool too, over the gateway's own MCP session."""
    task = new_task()
    arguments = {"title": "Over HTTP", "body": "b"}
    intent_id = await propose_and_verify(gateway.http, gateway.agents, task, "mcp:docs/publish", arguments)
    for _ in range(2):
        response = await gateway.http.post(
            f"/intents/{intent_id}/commit", headers=gateway.agents.headers("committer", task, key="h-1")
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "committed"
        assert body["result"]["body"]["content"][0]["text"] == "published Over HTTP"
    assert upstream_state.effects == [("publish", "Over HTTP")]


async def test_unreachable_server_fails_the_commit_without_a_call(gateway: Gateway) -> None:
    task = new_task()
    intent_id = await propose_and_verify(
        gateway.http, gateway.agents, task, "mcp:down/publish", {"title": "t"}
    )
    response = await gateway.http.post(
        f"/intents/{intent_id}/commit", headers=gateway.agents.headers("committer", task, key="d-1")
    )
    assert response.status_code == 502, response.text
    assert response.json()["type"] == PROBLEMS + "upstream-unavailable"
    assert "nothing was sent" in response.json()["detail"]
    intent = await gateway.http.get(
        f"/intents/{intent_id}", headers=gateway.agents.headers("committer", task)
    )
    assert intent.json()["status"] == "failed"


async def test_high_risk_commit_waits_for_approval(gateway: Gateway, upstream_state: ToolServer) -> None:
    task = new_task()
    arguments = {"to": "acct-9", "amount": 250}
    intent_id = await propose_and_verify(gateway.http, gateway.agents, task, "mcp:docs/wire", arguments)
    async with mcp_client(gateway.mcp_url(), gateway.agents.headers("committer", task)) as client:
        for _ in range(2):
            with pytest.raises(MCPError) as raised:
                await client.call_tool("wire", arguments, meta=commit_meta(intent_id, "k-1"))
            assert raised.value.error.code == -32012
            data = problem(raised.value, "approval-pending")
            assert data["intent_id"] == intent_id
            assert data["approval_id"].startswith("ap_")
            assert data["location"] == f"/approvals/{data['approval_id']}"
    assert upstream_state.effects == []


async def test_commit_after_approval_runs_once(gateway: Gateway, upstream_state: ToolServer) -> None:
    task = new_task()
    arguments = {"to": "acct-7", "amount": 90}
    intent_id = await propose_and_verify(gateway.http, gateway.agents, task, "mcp:docs/wire", arguments)
    committer = gateway.agents.headers("committer", task)
    async with mcp_client(gateway.mcp_url(), committer) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("wire", arguments, meta=commit_meta(intent_id, "k-1"))
    approval_id = problem(raised.value, "approval-pending")["approval_id"]
    decided = await gateway.http.post(
        f"/approvals/{approval_id}/decision",
        json={"decision": "approve", "reason": "checked the account"},
        headers=bearer(gateway, "approver", "approver-1"),
    )
    assert decided.status_code == 200, decided.text
    async with mcp_client(gateway.mcp_url(), committer) as client:
        first = await client.call_tool("wire", arguments, meta=commit_meta(intent_id, "k-1"))
        again = await client.call_tool("wire", arguments, meta=commit_meta(intent_id, "k-1"))
    for result in (first, again):
        assert text(result) == "sent 90 to acct-7"
        assert result.meta is not None and result.meta["agent-gateway/status"] == "committed"
    assert upstream_state.effects == [("wire", 90)]


# --- the exchange: sessions, headers, the gateway's credential --------------------------------


def recording_client(headers: dict[str, str], seen: list[httpx2.Response]) -> httpx2.AsyncClient:
    async def record(response: httpx2.Response) -> None:
        seen.append(response)

    return httpx2.AsyncClient(headers=headers, timeout=30, event_hooks={"response": [record]})


async def test_session_belongs_to_the_agent_that_opened_it(gateway: Gateway) -> None:
    seen: list[httpx2.Response] = []
    async with recording_client(bearer(gateway, "worker", "worker-1"), seen) as http:
        transport = streamable_http_client(gateway.mcp_url(), http_client=http, terminate_on_close=False)
        async with Client(transport, mode="legacy", cache=None) as client:
            await client.list_tools()
    session_id = next(r.headers["mcp-session-id"] for r in seen if "mcp-session-id" in r.headers)
    upstream_id, _, tag = session_id.rpartition(".")
    assert upstream_id and tag

    other = await gateway.http.delete(
        gateway.mcp_url(), headers={**bearer(gateway, "worker", "worker-2"), "mcp-session-id": session_id}
    )
    assert other.status_code == 404
    assert other.json()["error"]["data"]["type"] == PROBLEMS + "mcp-session-unknown"
    bare = await gateway.http.delete(
        gateway.mcp_url(), headers={**bearer(gateway, "worker", "worker-1"), "mcp-session-id": upstream_id}
    )
    assert bare.status_code == 404
    own = await gateway.http.delete(
        gateway.mcp_url(), headers={**bearer(gateway, "worker", "worker-1"), "mcp-session-id": session_id}
    )
    assert own.status_code == 200


async def test_read_call_answers_carry_the_decision_id(gateway: Gateway) -> None:
    seen: list[httpx2.Response] = []
    async with recording_client(bearer(gateway, "worker"), seen) as http:
        transport = streamable_http_client(gateway.mcp_url(), http_client=http)
        async with Client(transport, mode="auto", cache=None) as client:
            await client.call_tool("search", {"q": "x"})
    calls = [r for r in seen if r.request.headers.get("mcp-method") == "tools/call"]
    assert calls and calls[0].headers["gateway-decision-id"]


async def test_mcp_name_header_must_match_the_body(gateway: Gateway, upstream_state: ToolServer) -> None:
    """A client (or a proxy before the gateway) cannot make the server run another tool than policy saw."""

    async def tamper(request: httpx2.Request) -> None:
        if request.headers.get("mcp-name") == "search":
            request.headers["mcp-name"] = "secret"

    headers = bearer(gateway, "worker")
    async with httpx2.AsyncClient(headers=headers, timeout=30, event_hooks={"request": [tamper]}) as http:
        async with Client(streamable_http_client(gateway.mcp_url(), http_client=http), mode="auto") as client:
            with pytest.raises(MCPError) as raised:
                await client.call_tool("search", {"q": "x"})
    assert raised.value.error.code == -32020
    assert upstream_state.calls == []


async def test_unknown_server(gateway: Gateway) -> None:
    response = await gateway.http.delete(gateway.mcp_url("nope"), headers=bearer(gateway, "worker"))
    assert response.status_code == 404
    assert response.json()["error"]["data"]["type"] == PROBLEMS + "not-found"


async def test_server_refusing_the_gateway_credential_is_a_502(
    gateway: Gateway,
    upstream_state: ToolServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database_url: str,
    upstream: Any,
) -> None:
    from gateway.app import create_app

    monkeypatch.setenv(TOKEN_ENV, "a-wrong-credential")
    (tmp_path / "other").mkdir()
    config = gateway_config(
        tmp_path / "other",
        database_url,
        upstream[0],
        keys_dir=gateway.keys_dir,
        mcp_servers=mcp_servers(upstream_state),
        policy={"dir": str(REPO / "policies")},
    )
    with run_server(create_app(config)) as url:
        with pytest.raises(BaseException) as raised:
            async with mcp_client(f"{url}/mcp/docs", bearer(gateway, "worker")):
                pass
    error = mcp_error(raised.value)
    assert error.error.code == -32014
    assert "refused the gateway's credential" in problem(error, "upstream-unavailable")["detail"]


# --- units ----------------------------------------------------------------------------------


def test_unlisted_tools_fail_safe_and_names_are_namespaced() -> None:
    from gateway.config import McpToolRef, parse_config

    config = parse_config(
        {
            "mcp_servers": [
                {
                    "name": "docs",
                    "url": "http://x/mcp",
                    "tools": {"search": {"effect": "read", "risk": "low"}},
                }
            ]
        }
    )
    search, other = config.tool("mcp:docs/search"), config.tool("mcp:docs/anything/at.all")
    assert isinstance(search, McpToolRef) and (search.effect, search.risk) == ("read", "low")
    assert isinstance(other, McpToolRef) and (other.effect, other.risk) == ("irreversible", "high")
    assert other.mcp_name == "anything/at.all"
    assert config.tool("mcp:nope/search") is None
    assert config.tool("mcp:docs/") is None
    assert config.tool("docs.search") is None


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"name": "d", "url": "ftp://x"}, "mcp_servers.0.url"),
        (
            {"name": "d", "url": "http://x", "tools": {"t": {"effect": "maybe"}}},
            "mcp_servers.0.tools.t.effect",
        ),
        ({"name": "d", "url": "http://x", "tools": {"t": {"compensation": "nope"}}}, "no tool named 'nope'"),
        ({"name": "d/x", "url": "http://x"}, "mcp_servers.0.name"),
    ],
)
def test_bad_mcp_configuration(server: dict[str, Any], message: str) -> None:
    from gateway.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config({"mcp_servers": [server]})
    with pytest.raises(ConfigError, match="duplicate server name"):
        parse_config({"mcp_servers": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]})


def test_the_server_credential_is_read_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import ConfigError, parse_config
    from gateway.credentials import Credentials
    from gateway.mcp.servers import McpServers

    credential = {"prefix": "Bearer ", "value_env": TOKEN_ENV, "roles": {"committer": {"value_env": "AGW_C"}}}
    config = parse_config({"mcp_servers": [{"name": "d", "url": "http://x/mcp", "credential": credential}]})
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"mcp_servers.d.credential: environment variable {TOKEN_ENV}"):
        Credentials(config)
    monkeypatch.setenv(TOKEN_ENV, "s3")
    monkeypatch.setenv("AGW_C", "c0")
    servers = McpServers(config, Credentials(config))
    assert servers.credentials("d", "worker") == {"Authorization": "Bearer s3"}
    assert servers.credentials("d", "committer") == {"Authorization": "Bearer c0"}
    with pytest.raises(ConfigError, match="set by the gateway itself"):
        parse_config(
            {
                "mcp_servers": [
                    {"name": "d", "url": "http://x", "credential": {"header": "Host", "value_env": "X"}}
                ]
            }
        )


def test_only_mcp_headers_travel() -> None:
    from gateway.mcp.upstream import request_headers, response_headers

    sent = request_headers(
        {
            "Authorization": "Bearer caller",
            "Cookie": "c=1",
            "Agent-Handoff": "jws",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2025-11-25",
            "Mcp-Param-Region": "eu",
            "Accept-Encoding": "gzip",
        }
    )
    assert sent == {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
        "Mcp-Param-Region": "eu",
    }
    back = response_headers(
        {"Content-Type": "text/event-stream", "Set-Cookie": "x", "WWW-Authenticate": "Bearer"}
    )
    assert back == {"content-type": "text/event-stream"}


def test_session_ids_are_bound_to_server_and_agent(keys_dir: Path) -> None:
    from gateway.identity import Principal
    from gateway.mcp.sessions import SessionBinder, SessionUnknown

    def agent(sub: str) -> Principal:
        return Principal(sub=sub, role="worker", iss="agent-gateway-dev", jti="j", exp=0, claims={})

    binder = SessionBinder.from_key_file(keys_dir / "gateway.key.pem")
    wrapped = binder.wrap("docs", agent("a"), "upstream-1")
    assert binder.unwrap("docs", agent("a"), wrapped) == "upstream-1"
    # Another replica with the same gateway key accepts it too.
    assert SessionBinder.from_key_file(keys_dir / "gateway.key.pem").unwrap("docs", agent("a"), wrapped)
    for server, sub, presented in [
        ("docs", "b", wrapped),
        ("other", "a", wrapped),
        ("docs", "a", "upstream-1"),
        ("docs", "a", wrapped[:-1] + ("A" if wrapped[-1] != "A" else "B")),
    ]:
        with pytest.raises(SessionUnknown):
            binder.unwrap(server, agent(sub), presented)
    with pytest.raises(ValueError):
        binder.wrap("docs", agent("a"), "has space")


def test_events_are_split_across_chunks_and_line_endings() -> None:
    from gateway.mcp.sse import EventSplitter
    from gateway.problems import UpstreamUnavailable

    splitter = EventSplitter(limit=64)
    assert splitter.feed(b"id: 1\r") == []
    assert splitter.feed(b'\ndata: {"a":\r\ndata: 1}\r\n') == []
    first, ping = splitter.feed(b"\r\n: ping\n\n")
    assert first.data == '{"a":\n1}'
    assert first.message() == {"a": 1}
    assert first.with_data({"b": 2}).encode() == b'id: 1\ndata: {"b":2}\n\n'
    assert ping.message() is None and ping.encode() == b": ping\n\n"
    (third,) = splitter.feed(b"event: message\rdata: x\r\rdata:")
    assert third.data == "x" and third.message() is None
    with pytest.raises(UpstreamUnavailable):
        splitter.feed(b"x" * 80)


def test_gateway_meta_never_reaches_the_server() -> None:
    from gateway.mcp.meta import for_upstream

    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": "t",
            "_meta": {"agent-gateway/handoff": "jws", "progressToken": 7, "traceparent": TRACEPARENT},
        },
    }
    sent = for_upstream(message, "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert sent["params"]["_meta"] == {
        "progressToken": 7,
        "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
    }
    assert message["params"]["_meta"]["agent-gateway/handoff"] == "jws"  # the original is untouched
    assert for_upstream({"jsonrpc": "2.0", "id": 2, "method": "ping"}, "tp")["params"] == {
        "_meta": {"traceparent": "tp"}
    }


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", -32700),
        (b"[]", -32600),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "x"}', -32600),
        (b'{"jsonrpc": "2.0", "id": true, "method": "x"}', -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "x", "params": []}', -32600),
        (b'{"jsonrpc": "2.0", "id": 1}', -32600),
    ],
)
def test_not_one_jsonrpc_message(body: bytes, code: int) -> None:
    from gateway.mcp.jsonrpc import ProtocolError, error_code, parse_message

    with pytest.raises(ProtocolError) as raised:
        parse_message(body)
    assert error_code(raised.value) == code


def test_problem_statuses_map_to_jsonrpc_codes() -> None:
    from gateway.mcp.jsonrpc import ApprovalPending, error_code, error_object
    from gateway.problems import (
        CommitRequired,
        Conflict,
        GatewayError,
        PolicyUnavailable,
        TokenInvalid,
        UpstreamUnavailable,
    )
    from gateway.schemas import InputInvalid

    assert error_code(InputInvalid("x")) == -32602
    assert error_code(TokenInvalid("x")) == -32011
    assert error_code(CommitRequired("x")) == -32010
    assert error_code(ApprovalPending("x")) == -32012
    assert error_code(Conflict("x")) == -32013
    assert error_code(PolicyUnavailable("x")) == -32014
    assert error_code(UpstreamUnavailable("x", status=504)) == -32014
    assert error_code(GatewayError("x")) == -32603
    shown = error_object(CommitRequired("propose first", tool="mcp:d/t"), trace_id="abc")
    assert shown["message"] == f"{CommitRequired.title}: propose first"
    assert shown["data"]["type"] == PROBLEMS + "commit-required"
    assert shown["data"]["tool"] == "mcp:d/t" and shown["data"]["trace_id"] == "abc"


async def test_catalog_fetches_on_a_miss_at_most_once_per_interval() -> None:
    from gateway.mcp.catalog import ToolCatalog, validate_arguments
    from gateway.schemas import InputInvalid

    now = [0.0]
    fetched: list[int] = []
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}

    async def fetch() -> list[dict[str, Any]]:
        fetched.append(1)
        return [
            {"name": "search", "inputSchema": schema},
            {"name": "broken", "inputSchema": {"type": "array"}},
        ]

    catalog = ToolCatalog(fetch, ttl=60, refetch_interval=5, clock=lambda: now[0])
    search = await catalog.lookup("search")
    assert search is not None and len(fetched) == 1
    validate_arguments("mcp:d/search", search, {"q": "x"})
    with pytest.raises(InputInvalid) as raised:
        validate_arguments("mcp:d/search", search, {})
    assert raised.value.extra["errors"] == [{"path": "/q", "message": "required property is missing"}]
    broken = await catalog.lookup("broken")
    assert broken is not None
    with pytest.raises(InputInvalid, match="cannot be called"):
        validate_arguments("mcp:d/broken", broken, {})
    assert await catalog.lookup("missing") is None and len(fetched) == 1  # just fetched: trusted
    now[0] = 10
    assert await catalog.lookup("missing") is None and len(fetched) == 2
    assert await catalog.lookup("missing") is None and len(fetched) == 2
    catalog.remember([{"name": "missing", "inputSchema": schema}])  # a relayed tools/list page
    assert await catalog.lookup("missing") is not None and len(fetched) == 2
    catalog.invalidate()  # notifications/tools/list_changed
    assert await catalog.lookup("search") is not None and len(fetched) == 3
    now[0] = 100  # past the ttl: fetched again
    assert await catalog.lookup("search") is not None and len(fetched) == 4
