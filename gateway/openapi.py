"""`GET /openapi.json`: the HTTP contract as OpenAPI 3.1, maintained by hand next to the routes.

tests/test_openapi.py keeps it true: every route the app serves must be documented
here, and a bounded schemathesis run checks the running app against it (no 5xx;
every error a problem document). Adding a route means adding its operation below.
The document served lists only the operations this app serves.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from gateway.problems import PROBLEM_CONTENT_TYPE

if TYPE_CHECKING:
    from gateway.state import Gateway

JSON = "application/json"
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _problems(*statuses: int) -> dict[str, Any]:
    return {str(status): _ref("responses", "Problem") for status in statuses}


def _path_param(name: str, description: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    tags: list[str],
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "tags": tags, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if public:
        operation["security"] = []
    return operation


def _page(
    summary: str, approval: bool = False, parameters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An HTML page of the approvals UI (cookie sign-in, not the bearer token)."""
    return _operation(
        summary,
        {
            "default": {"description": "An HTML page or a redirect.", "content": {"text/html": {}}},
            **_problems(400, 403, 404),
        },
        tags=["ui"],
        parameters=[*([APPROVAL_ID] if approval else []), *(parameters or [])],
        public=True,
    )


AUTH_ERRORS = (400, 401, 403, 404, 413, 422, 503)
INTENT_ID = _path_param("intent_id", "The intent: `in_` + base32 of its content hash.")
APPROVAL_ID = _path_param("approval_id", "The approval.")
IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
IF_NONE_MATCH = {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}}
TOOL = _path_param("tool", "A configured tool name.", r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
REST = _path_param("rest", "Sub-path appended to the tool's upstream URL.")
HANDOFF = _ref("parameters", "AgentHandoff")
IDEMPOTENCY_KEY = _ref("parameters", "IdempotencyKey")
TRACEPARENT = _ref("parameters", "Traceparent")


def _tool_operations(with_rest: bool) -> dict[str, Any]:
    parameters = [TOOL, *([REST] if with_rest else []), HANDOFF, TRACEPARENT]
    responses = {
        "default": {
            "description": "The tool's own answer, with `Gateway-Decision-Id` (and `RateLimit` "
            "fields for rate-limited tools).",
            "content": {"*/*": {}},
        },
        **_problems(400, 401, 403, 404, 413, 422, 429, 502, 503, 504),
    }
    operations = {}
    for method in ("get", "post", "put", "patch", "delete"):
        operation = _operation(
            "Call a read-only tool directly (any other effect answers 403 commit-required)",
            responses,
            tags=["tools"],
            parameters=parameters,
        )
        if method in ("post", "put", "patch"):
            operation["requestBody"] = {"required": False, "content": {JSON: {"schema": {}}, "*/*": {}}}
        operations[method] = operation
    return operations


INTENT_VIEW: dict[str, Any] = {
    "type": "object",
    "required": ["intent_id", "task_id", "tool", "status"],
    "properties": {
        "intent_id": {"type": "string"},
        "task_id": {"type": "string"},
        "tool": {"type": "string"},
        "arguments": {},
        "status": {"type": "string"},
        "history": {"type": "array", "items": ANY_OBJECT},
        "result": {},
    },
}
PROPOSAL: dict[str, Any] = {
    "type": "object",
    "required": ["task_id", "tool"],
    "additionalProperties": False,
    "properties": {
        "task_id": {"type": "string", "minLength": 1, "maxLength": 255},
        "tool": {"type": "string"},
        "arguments": {},
        "compensation": {
            "type": "object",
            "required": ["tool"],
            "properties": {"tool": {"type": "string"}, "arguments": {}},
        },
        "depends_on": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["namespace", "key", "revision"],
                "properties": {
                    "namespace": {"type": "string"},
                    "key": {"type": "string"},
                    "revision": {"type": "integer"},
                },
            },
        },
        "memory_writes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["namespace", "key", "value"],
                "properties": {
                    "namespace": {"type": "string"},
                    "key": {"type": "string"},
                    "value": {},
                    "if_revision": {"type": "integer"},
                },
            },
        },
    },
}
VERDICT: dict[str, Any] = {
    "type": "object",
    "required": ["verdict", "reason"],
    "properties": {
        "verdict": {"enum": ["accept", "reject"]},
        "reason": {"type": "string"},
        "checks": {},
    },
}
COMMIT_RESULT: dict[str, Any] = {
    "type": "object",
    "properties": {"intent_id": {"type": "string"}, "status": {"type": "string"}, "result": {}},
}
PENDING_APPROVAL: dict[str, Any] = {
    "type": "object",
    "required": ["status", "approval_id", "intent_id"],
    "properties": {
        "status": {"const": "pending_approval"},
        "approval_id": {"type": "string"},
        "intent_id": {"type": "string"},
    },
}
SEQ = {"type": "integer", "minimum": 0}

PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {
        "get": _operation(
            "Liveness", {"200": _json(ANY_OBJECT, "The process is up.")}, tags=["admin"], public=True
        )
    },
    "/readyz": {
        "get": _operation(
            "Readiness: database reachable, a policy loaded, not draining",
            {
                "200": _json(ANY_OBJECT, "Ready, with the checks."),
                "503": _json(ANY_OBJECT, "Not ready (or draining), with the checks."),
            },
            tags=["admin"],
            public=True,
        )
    },
    "/metrics": {
        "get": _operation(
            "Prometheus metrics (text exposition format)",
            {"200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            tags=["admin"],
            public=True,
        )
    },
    "/openapi.json": {
        "get": _operation(
            "This document", {"200": _json(ANY_OBJECT, "OpenAPI 3.1.")}, tags=["admin"], public=True
        )
    },
    "/.well-known/jwks.json": {
        "get": _operation(
            "The gateway's public signing key (verifies Gateway-Assertion and ledger checkpoints)",
            {"200": _json({"type": "object", "required": ["keys"]}, "A JWK Set.")},
            tags=["admin"],
            public=True,
        )
    },
    "/tools/{tool}": _tool_operations(False),
    "/tools/{tool}/{rest}": _tool_operations(True),
    "/intents": {
        "post": _operation(
            "Propose an intent (planner)",
            {
                "201": _json(INTENT_VIEW, "Proposed."),
                "200": _json(INTENT_VIEW, "The same proposal again: the same intent."),
                **_problems(*AUTH_ERRORS),
            },
            tags=["intents"],
            parameters=[HANDOFF, TRACEPARENT],
            body=PROPOSAL,
        )
    },
    "/intents/{intent_id}": {
        "get": _operation(
            "Read an intent: status, history, stored result",
            {"200": _json(INTENT_VIEW, "The intent."), **_problems(401, 404, 503)},
            tags=["intents"],
            parameters=[INTENT_ID],
        )
    },
    "/intents/{intent_id}/verify": {
        "post": _operation(
            "Accept or reject a proposed intent (verifier)",
            {"200": _json(INTENT_VIEW, "Verified or rejected."), **_problems(*AUTH_ERRORS, 409)},
            tags=["intents"],
            parameters=[INTENT_ID, HANDOFF, TRACEPARENT],
            body=VERDICT,
        )
    },
    "/intents/{intent_id}/commit": {
        "post": _operation(
            "Commit a verified intent, exactly once (committer)",
            {
                "200": _json(COMMIT_RESULT, "Committed (or the stored answer of an earlier commit)."),
                "202": _json(PENDING_APPROVAL, "Waiting for approval; `Location` names it."),
                **_problems(*AUTH_ERRORS, 409, 429, 502, 504),
            },
            tags=["intents"],
            parameters=[INTENT_ID, IDEMPOTENCY_KEY, HANDOFF, TRACEPARENT],
        )
    },
    "/tasks/{task_id}/compensate": {
        "post": _operation(
            "Run the compensations of a task's committed intents, in reverse order (committer)",
            {"200": _json(ANY_OBJECT, "What was compensated."), **_problems(*AUTH_ERRORS, 409, 429)},
            tags=["intents"],
            parameters=[
                _path_param("task_id", "The task."),
                IDEMPOTENCY_KEY,
                HANDOFF,
                TRACEPARENT,
            ],
        )
    },
    "/ledger": {
        "get": _operation(
            "Ledger entries in chain order, by task or intent, paged",
            {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["entries"],
                        "properties": {"entries": {"type": "array"}, "next_after": {}},
                    },
                    "Entries.",
                ),
                **_problems(400, 401, 503),
            },
            tags=["ledger"],
            parameters=[
                _query("task_id", {"type": "string"}, "Only this task's entries."),
                _query("intent_id", {"type": "string"}, "Only this intent's entries."),
                _query("after", SEQ, "Entries after this sequence number."),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size."),
            ],
        )
    },
    "/trace/{intent_id}": {
        "get": _operation(
            "The causal chain from the task's goal to the intent's side effect",
            {"200": _json(ANY_OBJECT, "The chain and its links."), **_problems(401, 404, 503)},
            tags=["ledger"],
            parameters=[INTENT_ID],
        )
    },
    "/approvals": {
        "get": _operation(
            "Approvals, newest first (approver)",
            {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["approvals"],
                        "properties": {"approvals": {"type": "array"}},
                    },
                    "Approvals.",
                ),
                **_problems(400, 401, 403, 503),
            },
            tags=["approvals"],
            parameters=[
                _query(
                    "status",
                    {"enum": ["pending", "approved", "denied", "expired", "all"]},
                    "Only approvals in this state.",
                ),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "At most this many."),
            ],
        )
    },
    "/approvals/{approval_id}": {
        "get": _operation(
            "One approval, with its decisions (approver)",
            {"200": _json(ANY_OBJECT, "The approval."), **_problems(401, 403, 404, 503)},
            tags=["approvals"],
            parameters=[APPROVAL_ID],
        )
    },
    "/approvals/{approval_id}/decision": {
        "post": _operation(
            "Approve or deny; the final approval runs the commit (approver)",
            {"200": _json(ANY_OBJECT, "The approval after the decision."), **_problems(*AUTH_ERRORS, 409)},
            tags=["approvals"],
            parameters=[APPROVAL_ID],
            body={
                "type": "object",
                "required": ["decision", "reason"],
                "properties": {"decision": {"enum": ["approve", "deny"]}, "reason": {"type": "string"}},
            },
        )
    },
    "/memory/{namespace}/{key}": {
        "get": _operation(
            "A canonical memory value with its revision and provenance (ETag: the revision)",
            {"200": _json(ANY_OBJECT, "The value."), **_problems(400, 401, 404, 409, 503)},
            tags=["memory"],
            parameters=[
                _path_param("namespace", "A memory namespace."),
                _path_param("key", "A key in it."),
                _query("min_revision", SEQ, "Answer only once this revision is visible (read-after-write)."),
                _query(
                    "wait",
                    {"type": "number", "minimum": 0, "maximum": 30},
                    "Seconds to wait for min_revision.",
                ),
            ],
        )
    },
    "/memory/{namespace}/{key}/history": {
        "get": _operation(
            "A key's revisions in order, with provenance",
            {"200": _json(ANY_OBJECT, "The revisions."), **_problems(400, 401, 404, 503)},
            tags=["memory"],
            parameters=[
                _path_param("namespace", "A memory namespace."),
                _path_param("key", "A key in it."),
                _query("after", SEQ, "Revisions after this one."),
                _query("limit", {"type": "integer", "minimum": 1}, "Page size."),
            ],
        )
    },
    "/memory/scratch/{task_id}/{key}": {
        method: _operation(
            summary,
            {
                "200": _json(ANY_OBJECT, "The scratch entry."),
                **extra,
                **_problems(*AUTH_ERRORS, 409, 412, 428),
            },
            tags=["memory"],
            parameters=[
                _path_param("task_id", "The task."),
                _path_param("key", "A key in the task's scratch space."),
                *([HANDOFF, IF_MATCH, IF_NONE_MATCH] if method != "get" else []),
            ],
            body={"type": "object", "required": ["value"], "properties": {"value": {}}}
            if method == "put"
            else None,
        )
        for method, summary, extra in (
            ("get", "A scratch value (never canonical)", {}),
            (
                "put",
                "Write a scratch value: If-Match or If-None-Match: * required",
                {"201": _json(ANY_OBJECT, "Created.")},
            ),
            ("delete", "Delete a scratch value: If-Match required", {"204": {"description": "Deleted."}}),
        )
    },
    "/ui": {"get": _page("The approvals page's entry (redirects to sign-in or the list)")},
    "/ui/approvals": {"get": _page("Pending approvals, for approvers")},
    "/ui/approvals/{approval_id}": {
        "get": _page("One approval: intent, arguments, reasons, causal chain", True)
    },
    "/ui/approvals/{approval_id}/decision": {
        "post": _page("Approve or deny from the page (CSRF-checked form)", True)
    },
    "/ui/sign-in": {"post": _page("Sign in with an approver token (sets an HttpOnly, SameSite cookie)")},
    "/ui/sign-out": {"post": _page("Sign out")},
    "/ui/static/{path}": {
        "get": _page("The page's static files", parameters=[_path_param("path", "A file name.")])
    },
    "/mcp/{server}": {
        method: _operation(
            f"MCP Streamable HTTP endpoint of a configured server ({method.upper()})",
            {"default": {"description": "JSON-RPC or an event stream.", "content": {"*/*": {}}}},
            tags=["mcp"],
            parameters=[_path_param("server", "A configured MCP server name.")],
        )
        for method in ("get", "post", "delete")
    },
}

COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "roleToken": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT (typ role+jwt)",
            "description": "A role JWT from a configured issuer.",
        }
    },
    "schemas": {
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status"],
            "properties": {
                "type": {"type": "string", "format": "uri"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "decision_id": {"type": "string"},
                "intent_id": {"type": "string"},
                "trace_id": {"type": "string"},
            },
        }
    },
    "responses": {
        "Problem": {
            "description": "RFC 9457 problem details.",
            "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref("schemas", "Problem")}},
        }
    },
    "parameters": {
        "AgentHandoff": {
            "name": "Agent-Handoff",
            "in": "header",
            "required": False,
            "description": "A handoff envelope (compact JWS, typ handoff+jwt); required where policy says.",
            "schema": {"type": "string"},
        },
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": True,
            "description": "A structured-field string (a bare token is accepted), at most 255 characters.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 257},
        },
        "Traceparent": {
            "name": "traceparent",
            "in": "header",
            "required": False,
            "description": "W3C trace context.",
            "schema": {"type": "string"},
        },
    },
}


def document(served: set[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The OpenAPI document; with `served` ((path, method) pairs), only those operations."""
    from gateway import __version__

    paths = PATHS
    if served is not None:
        paths = {
            path: kept
            for path, item in PATHS.items()
            if (kept := {method: op for method, op in item.items() if (path, method) in served})
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "agent-gateway",
            "version": __version__,
            "description": "A policy gateway between AI agents and the tools they call.",
        },
        "security": [{"roleToken": []}],
        "paths": paths,
        "components": COMPONENTS,
    }


def served_operations(routes: list[BaseRoute], prefix: str = "") -> set[tuple[str, str]]:
    """(path, method) of every route, paths in OpenAPI form (`{rest:path}` → `{rest}`)."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Mount):
            inner = list(route.routes)
            if inner:
                found |= served_operations(inner, prefix + route.path)
            else:  # an app such as StaticFiles: anything under the mount
                found.add((prefix + route.path + "/{path}", "get"))
        elif isinstance(route, Route):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", prefix + route.path)
            found |= {(path, method.lower()) for method in route.methods or () if method != "HEAD"}
    return found


async def endpoint(gateway: Gateway, request: Request) -> Response:
    return JSONResponse(document(served_operations(list(request.app.routes))))
