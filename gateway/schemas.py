"""Tool argument schemas (contract §2): compiled once at start, checked on every call.

Each tool may name a JSON Schema (`input_schema`: a path relative to the configuration
file's folder, or an inline table). Schemas declare their dialect with `$schema`;
without one they are Draft 2020-12. Formats are asserted (`"format": "email"` rejects a
non-address), arguments are never coerced ("5" is not a number), and `$ref` resolves
only inside the schema itself: validating a call never makes the gateway fetch a URL.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from referencing import Registry

from gateway.config import Config, ConfigError, Tool
from gateway.problems import Unprocessable

MAX_ERRORS = 50
MAX_MESSAGE = 200


class InputInvalid(Unprocessable):
    name, title = "input-invalid", "Tool arguments do not match the tool's input schema"


def _pointer(parts: Any) -> str:
    """RFC 6901 JSON pointer of a path; the whole document is "/"."""
    escaped = [str(part).replace("~", "~0").replace("/", "~1") for part in parts]
    return "/" + "/".join(escaped)


def _extra_properties(error: ValidationError) -> list[str]:
    schema = error.schema if isinstance(error.schema, dict) else {}
    declared = set(schema.get("properties", {}))
    patterns = list(schema.get("patternProperties", {}))
    instance = error.instance if isinstance(error.instance, dict) else {}
    return sorted(
        name
        for name in instance
        if name not in declared and not any(re.search(pattern, name) for pattern in patterns)
    )


def describe(error: ValidationError) -> list[dict[str, str]]:
    """One entry per failing path; a missing or unexpected member is named by its own path."""
    path = list(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [name for name in error.validator_value if name not in error.instance]
        for name in missing:
            if error.message == f"{name!r} is a required property":
                return [{"path": _pointer([*path, name]), "message": "required property is missing"}]
    if error.validator == "additionalProperties" and error.validator_value is False:
        extras = _extra_properties(error)
        if extras:
            return [
                {"path": _pointer([*path, name]), "message": "property is not allowed"} for name in extras
            ]
    message = error.message if len(error.message) <= MAX_MESSAGE else error.message[:MAX_MESSAGE] + "…"
    return [{"path": _pointer(path), "message": message}]


def _load(config: Config, tool: Tool) -> dict[str, Any]:
    where = f"tools.{tool.name}.input_schema"
    source = tool.input_schema
    if isinstance(source, dict):
        schema: Any = source
    else:
        assert source is not None
        try:
            schema = json.loads(config.path(source).read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"{where}: cannot read {source!r} ({error.strerror})") from None
        except ValueError as error:
            raise ConfigError(f"{where}: {source!r} is not valid JSON ({error})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}: a schema must be a JSON object")
    return schema


def _compile(config: Config, tool: Tool) -> tuple[dict[str, Any], Validator]:
    schema = _load(config, tool)
    cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as error:
        at = _pointer(error.absolute_path)
        raise ConfigError(
            f"tools.{tool.name}.input_schema: invalid schema at {at}: {' '.join(error.message.split())}"
        ) from None
    # An empty registry: a remote `$ref` is unresolvable rather than fetched.
    validator = cls(schema, registry=Registry(), format_checker=cls.FORMAT_CHECKER)
    return schema, validator


class ToolSchemas:
    """Every configured tool's compiled input schema, by tool name."""

    def __init__(self, config: Config) -> None:
        self._schemas: dict[str, tuple[dict[str, Any], Validator]] = {
            tool.name: _compile(config, tool) for tool in config.tools if tool.input_schema is not None
        }

    def schema_for(self, tool_name: str) -> dict[str, Any] | None:
        found = self._schemas.get(tool_name)
        return found[0] if found else None

    def validate(self, tool_name: str, arguments: Any) -> None:
        """Raise `InputInvalid` (422) listing every failing path; tools without a schema accept anything."""
        found = self._schemas.get(tool_name)
        if found is None:
            return
        try:
            failures = list(found[1].iter_errors(arguments))
        except Exception as error:  # an unresolvable $ref and the like: fail closed, never skip
            raise InputInvalid(
                f"the input schema of tool {tool_name!r} cannot be evaluated ({type(error).__name__})",
                errors=[],
            ) from None
        if not failures:
            return
        errors = sorted(
            (entry for failure in failures for entry in describe(failure)), key=lambda e: e["path"]
        )
        shown = errors[:MAX_ERRORS]
        summary = "; ".join(f"{entry['path']}: {entry['message']}" for entry in shown[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InputInvalid(
            f"arguments of tool {tool_name!r} do not match its input schema: {summary}{more}",
            errors=shown,
            truncated=True if len(errors) > MAX_ERRORS else None,
        )
