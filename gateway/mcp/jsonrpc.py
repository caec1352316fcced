"""JSON-RPC 2.0 framing for the MCP endpoint, and the gateway's errors as JSON-RPC errors.

A gateway refusal keeps its RFC 9457 problem details: they are the error's `data`, so
an MCP client sees the same `type`, `detail`, `decision_id` and `reasons` an HTTP
client would. Codes:

    problem status      JSON-RPC code
    400, 404, 422       -32602 invalid params (bad arguments, unknown tool or intent)
    401                 -32011 unauthenticated
    403                 -32010 forbidden (policy-denied, commit-required, ...)
    202 (approval)      -32012 approval pending (data carries approval_id)
    409, 412, 428       -32013 conflict (commit-in-progress, stale-goal, ...)
    413                 -32600 invalid request
    429, 5xx            -32014 unavailable (policy engine, MCP server)
    anything else       -32603 internal error

The gateway's own codes sit in -32010..-32014, inside the band the 2026-07-28
specification leaves to implementations (-32000..-32019) and clear of the SDK's
-32000/-32001.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from starlette.responses import Response

from gateway.problems import BadRequest, GatewayError

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020  # 2026-07-28: the Mcp-* headers disagree with the body
FORBIDDEN = -32010
UNAUTHENTICATED = -32011
APPROVAL_PENDING = -32012
CONFLICT = -32013
UNAVAILABLE = -32014

_BY_STATUS = {
    400: INVALID_PARAMS,
    404: INVALID_PARAMS,
    422: INVALID_PARAMS,
    401: UNAUTHENTICATED,
    403: FORBIDDEN,
    202: APPROVAL_PENDING,
    409: CONFLICT,
    412: CONFLICT,
    428: CONFLICT,
    413: INVALID_REQUEST,
    429: UNAVAILABLE,
}

RequestId = int | str
Kind = Literal["request", "notification", "response"]


class ProtocolError(BadRequest):
    """The POST body is not one JSON-RPC message; answered with HTTP 400 and `code`."""

    name, title = "jsonrpc-invalid", "Not a JSON-RPC 2.0 message"

    def __init__(self, detail: str, *, code: int = INVALID_REQUEST) -> None:
        super().__init__(detail)
        self.code = code


class ApprovalPending(GatewayError):
    """A commit is waiting for approval: not a failure, so retry later with the same key."""

    status, name, title = 202, "approval-pending", "The commit is waiting for approval"


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message from the client, as parsed (the raw object is kept to forward)."""

    raw: dict[str, Any]

    @property
    def kind(self) -> Kind:
        if "method" in self.raw:
            return "request" if "id" in self.raw else "notification"
        return "response"

    @property
    def id(self) -> RequestId | None:
        return self.raw.get("id")

    @property
    def method(self) -> str:
        return str(self.raw.get("method", ""))

    @property
    def params(self) -> dict[str, Any]:
        params = self.raw.get("params")
        return params if isinstance(params, dict) else {}

    @property
    def meta(self) -> dict[str, Any]:
        meta = self.params.get("_meta")
        return meta if isinstance(meta, dict) else {}


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def parse_message(body: bytes) -> Message:
    """One JSON-RPC message. Batches are refused: every message must face policy alone."""
    try:
        data = json.loads(body)
    except ValueError as error:
        raise ProtocolError(f"the body is not valid JSON: {error}", code=PARSE_ERROR) from None
    if isinstance(data, list):
        raise ProtocolError("JSON-RPC batches are not supported; send one message per request")
    if not isinstance(data, dict) or data.get("jsonrpc") != "2.0":
        raise ProtocolError('the body must be a JSON-RPC 2.0 object ("jsonrpc": "2.0")')
    if "id" in data and not _valid_id(data["id"]):
        raise ProtocolError("a JSON-RPC id must be a string or an integer")
    if "method" in data:
        if not isinstance(data["method"], str) or not data["method"]:
            raise ProtocolError("method must be a non-empty string")
        if "params" in data and not isinstance(data["params"], dict):
            raise ProtocolError("params must be an object")
    elif "id" not in data or ("result" in data) == ("error" in data):
        raise ProtocolError("a response needs an id and exactly one of result or error")
    return Message(data)


def error_code(error: GatewayError) -> int:
    if isinstance(error, ProtocolError):
        return error.code
    if error.status in _BY_STATUS:
        return _BY_STATUS[error.status]
    return UNAVAILABLE if error.status > 500 else INTERNAL_ERROR


def error_object(error: GatewayError, **context: Any) -> dict[str, Any]:
    return {
        "code": error_code(error),
        "message": f"{error.title}: {error.detail}",
        "data": error.to_problem(**context),
    }


def error_message(request_id: RequestId | None, error: GatewayError, **context: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error_object(error, **context)}


def result_message(request_id: RequestId | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def json_response(
    message: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(message, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
