"""Tool input schemas (contract §2): compiled once, every failing path listed, nothing coerced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.schemas import MAX_ERRORS, InputInvalid, ToolSchemas

REPO = Path(__file__).resolve().parent.parent
TRANSFER = {"from_account": "a", "to_account": "b", "amount": 5, "currency": "EUR"}


def schemas_for(tmp_path: Path, **tool: Any) -> ToolSchemas:
    config = parse_config({"tools": [{"name": "t", "upstream": "http://127.0.0.1:1/", **tool}]}, tmp_path)
    return ToolSchemas(config)


@pytest.fixture
def shipped() -> ToolSchemas:
    """The repository's gateway.toml tools, with their schemas relative to the file."""
    tools = [
        {
            "name": "payments.transfer",
            "upstream": "http://x/",
            "input_schema": "schemas/payments.transfer.json",
        },
        {"name": "email.send", "upstream": "http://x/", "input_schema": "schemas/email.send.json"},
        {"name": "docs.search", "upstream": "http://x/"},
    ]
    return ToolSchemas(parse_config({"tools": tools}, REPO))


def failing_paths(schemas: ToolSchemas, tool: str, arguments: Any) -> list[str]:
    with pytest.raises(InputInvalid) as caught:
        schemas.validate(tool, arguments)
    body = caught.value.to_problem()
    assert body["status"] == 422 and body["type"].endswith("/input-invalid")
    assert all(entry["message"] for entry in body["errors"])
    return [entry["path"] for entry in body["errors"]]


def test_valid_arguments_pass(shipped: ToolSchemas) -> None:
    shipped.validate("payments.transfer", TRANSFER)
    shipped.validate("email.send", {"to": "a@example.com", "subject": "s", "body": "b"})


def test_tools_without_a_schema_accept_anything(shipped: ToolSchemas) -> None:
    for arguments in (None, "text", [1, 2], {"any": {"thing": True}}):
        shipped.validate("docs.search", arguments)
    assert shipped.schema_for("docs.search") is None
    assert shipped.schema_for("payments.transfer")["required"] == list(TRANSFER)  # type: ignore[index]


@pytest.mark.parametrize(
    ("arguments", "paths"),
    [
        ({**TRANSFER, "amount": "5"}, ["/amount"]),  # no coercion of "5"
        ({**TRANSFER, "amount": True}, ["/amount"]),
        ({**TRANSFER, "amount": 0}, ["/amount"]),
        ({**TRANSFER, "currency": "eur", "memo": 7}, ["/currency", "/memo"]),
        ({"amount": -1}, ["/amount", "/currency", "/from_account", "/to_account"]),
        ({**TRANSFER, "to_account~x/y": "z"}, ["/to_account~0x~1y"]),
        (None, ["/"]),
        ([TRANSFER], ["/"]),
    ],
)
def test_every_failing_path_is_listed(shipped: ToolSchemas, arguments: Any, paths: list[str]) -> None:
    assert failing_paths(shipped, "payments.transfer", arguments) == paths


def test_formats_are_asserted(shipped: ToolSchemas) -> None:
    assert failing_paths(shipped, "email.send", {"to": "not-an-address", "subject": "s", "body": "b"}) == [
        "/to"
    ]


def test_nested_paths_and_the_error_cap(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}}}}
    schemas = schemas_for(tmp_path, input_schema=schema)
    assert failing_paths(schemas, "t", {"items": [1, "2", 3, "4"]}) == ["/items/1", "/items/3"]
    with pytest.raises(InputInvalid) as caught:
        schemas.validate("t", {"items": ["x"] * (MAX_ERRORS + 10)})
    assert len(caught.value.extra["errors"]) == MAX_ERRORS and caught.value.extra["truncated"] is True


def test_remote_refs_are_never_fetched(tmp_path: Path) -> None:
    schema = {"$ref": "http://127.0.0.1:9/elsewhere.json"}
    with pytest.raises(InputInvalid):
        schemas_for(tmp_path, input_schema=schema).validate("t", {})


def test_older_dialects_are_honoured(tmp_path: Path) -> None:
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "string"}]}
    schemas = schemas_for(tmp_path, input_schema=schema)
    schemas.validate("t", ["a", 1])
    assert failing_paths(schemas, "t", [1]) == ["/0"]


@pytest.mark.parametrize(
    ("source", "content", "expected"),
    [
        ("missing.json", None, "cannot read 'missing.json'"),
        ("bad.json", "{not json", "'bad.json' is not valid JSON"),
        ("list.json", "[]", "a schema must be a JSON object"),
        ("wrong.json", json.dumps({"type": "banana"}), "invalid schema at /type"),
    ],
)
def test_bad_schema_files_are_one_line_config_errors(
    tmp_path: Path, source: str, content: str | None, expected: str
) -> None:
    if content is not None:
        (tmp_path / source).write_text(content)
    with pytest.raises(ConfigError) as caught:
        schemas_for(tmp_path, input_schema=source)
    message = str(caught.value)
    assert message.startswith("tools.t.input_schema: ") and expected in message and "\n" not in message
