"""Each MCP server's tools as the server lists them: the input schemas calls are checked against.

The catalog learns from every `tools/list` answer relayed to an agent, and fetches
the list itself (over its own session) when a call names a tool it has not seen or
last saw more than `schema_ttl` seconds ago; `notifications/tools/list_changed`
empties it. A miss refetches at most once per `refetch_interval`, so calls naming
tools that do not exist cannot make the gateway hammer the server.

Schemas are compiled as the gateway compiles its own (`gateway.schemas`): the
declared dialect or Draft 2020-12, formats asserted, no coercion, and `$ref`
resolved only inside the schema, so a server's schema cannot make the gateway fetch
a URL. A schema that does not compile fails every call to its tool: closed, not open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from referencing import Registry

from gateway.schemas import MAX_ERRORS, InputInvalid, describe

Fetch = Callable[[], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True)
class ListedTool:
    name: str
    definition: dict[str, Any]
    validator: Validator | None
    unusable: str | None = None  # why the schema cannot be used

    @property
    def annotations(self) -> dict[str, Any] | None:
        """The server's hints (`readOnlyHint`, ...): shown to policy, never trusted as the effect."""
        value = self.definition.get("annotations")
        return value if isinstance(value, dict) else None


def compile_tool(definition: dict[str, Any]) -> ListedTool:
    name = str(definition.get("name", ""))
    schema = definition.get("inputSchema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return ListedTool(
            name, definition, None, 'inputSchema must be an object schema with "type": "object"'
        )
    cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as error:
        return ListedTool(name, definition, None, f"invalid inputSchema: {' '.join(error.message.split())}")
    validator = cls(schema, registry=Registry(), format_checker=cls.FORMAT_CHECKER)
    return ListedTool(name, definition, validator)


def validate_arguments(tool_name: str, listed: ListedTool, arguments: Any) -> None:
    """Raise `InputInvalid` (422) listing every failing path, as for HTTP tools."""
    if listed.validator is None:
        raise InputInvalid(f"tool {tool_name!r} cannot be called: {listed.unusable}", errors=[])
    try:
        failures = list(listed.validator.iter_errors(arguments))
    except Exception as error:  # an unresolvable $ref and the like: fail closed, never skip
        raise InputInvalid(
            f"the input schema of tool {tool_name!r} cannot be evaluated ({type(error).__name__})", errors=[]
        ) from None
    if not failures:
        return
    errors = sorted((entry for failure in failures for entry in describe(failure)), key=lambda e: e["path"])
    summary = "; ".join(f"{entry['path']}: {entry['message']}" for entry in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    raise InputInvalid(
        f"arguments of tool {tool_name!r} do not match its input schema: {summary}{more}",
        errors=errors[:MAX_ERRORS],
        truncated=True if len(errors) > MAX_ERRORS else None,
    )


class ToolCatalog:
    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl: float,
        refetch_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._refetch_interval = refetch_interval
        self._clock = clock
        self._tools: dict[str, tuple[ListedTool, float]] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    def remember(self, definitions: Iterable[Any]) -> None:
        """Learn from a `tools/list` page (one page: tools missing from it are kept)."""
        now = self._clock()
        for definition in definitions:
            if isinstance(definition, dict) and isinstance(definition.get("name"), str):
                self._tools[definition["name"]] = (compile_tool(definition), now)

    def invalidate(self) -> None:
        self._tools.clear()
        self._fetched_at = None

    def _fresh(self, name: str) -> ListedTool | None:
        found = self._tools.get(name)
        if found is not None and self._clock() - found[1] <= self._ttl:
            return found[0]
        return None

    async def lookup(self, name: str) -> ListedTool | None:
        """The tool as the server lists it now, or None if the server does not list it."""
        if (listed := self._fresh(name)) is not None:
            return listed
        async with self._lock:
            if (listed := self._fresh(name)) is not None:
                return listed
            recently = (
                self._fetched_at is not None and self._clock() - self._fetched_at < self._refetch_interval
            )
            if recently:  # the list was just fetched: trust it, whatever the ttl
                found = self._tools.get(name)
                return found[0] if found else None
            definitions = await self._fetch()
            self._tools.clear()
            self._fetched_at = self._clock()
            self.remember(definitions)
            found = self._tools.get(name)
            return found[0] if found else None
