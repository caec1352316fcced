"""Server-sent events, relayed one event at a time.

An MCP response stream is relayed as it arrives: the gateway holds at most one
incomplete event, never the whole stream, so progress notifications reach the agent
when the server sends them. Each complete event is offered to a hook that may
replace it (the `tools/list` answer is filtered) or just look at it (a
`tools/list_changed` notification drops the schema cache).

Line endings are normalised to LF (the SSE grammar allows CRLF, LF and CR alike).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.problems import UpstreamUnavailable

MAX_EVENT_BYTES = 4 * 1_048_576


@dataclass
class Event:
    """One event: its field lines in order (comments included), without line endings."""

    lines: list[str]

    @property
    def data(self) -> str:
        values = [_value(line) for line in self.lines if _field(line) == "data"]
        return "\n".join(values)

    def message(self) -> dict[str, Any] | None:
        """The JSON-RPC message the event carries, if it carries one."""
        data = self.data
        if not data.strip():
            return None
        try:
            parsed = json.loads(data)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None

    def with_data(self, message: dict[str, Any]) -> Event:
        """The same event (id, event type, retry kept) carrying another message."""
        kept = [line for line in self.lines if _field(line) != "data"]
        return Event([*kept, "data: " + json.dumps(message, separators=(",", ":"))])

    def encode(self) -> bytes:
        return ("\n".join(self.lines) + "\n\n").encode("utf-8")


def _field(line: str) -> str:
    return line.partition(":")[0] if line and not line.startswith(":") else ""


def _value(line: str) -> str:
    value = line.partition(":")[2]
    return value[1:] if value.startswith(" ") else value


class EventSplitter:
    """Bytes in, complete events out; raises when one event grows past `limit`."""

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._lines: list[str] = []
        self._size = 0
        self._limit = limit

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._pending + self._decoder.decode(chunk)
        # A CR at the very end may be the first half of a CRLF: wait for the next chunk.
        self._pending = "\r" if text.endswith("\r") else ""
        if self._pending:
            text = text[:-1]
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        events: list[Event] = []
        *complete, rest = text.split("\n")
        for line in complete:
            if line:
                self._lines.append(line)
                self._size += len(line)
            elif self._lines:
                events.append(Event(self._lines))
                self._lines, self._size = [], 0
        self._pending = rest + self._pending
        if self._size + len(self._pending) > self._limit:
            raise UpstreamUnavailable(f"an MCP server event exceeds {self._limit} bytes")
        return events

    def close(self) -> list[Event]:
        """At end of stream an unterminated event is dropped, as the SSE rules say."""
        return []


Hook = Callable[[Event], Awaitable[Event | None]]


async def relay(source: AsyncIterator[bytes], hook: Hook | None = None) -> AsyncIterator[bytes]:
    """Re-emit `source` event by event; `hook` may replace an event, or drop it (None)."""
    splitter = EventSplitter()
    async for chunk in source:
        for event in splitter.feed(chunk):
            replaced = await hook(event) if hook is not None else event
            if replaced is not None:
                yield replaced.encode()
