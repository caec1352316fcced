"""W3C Trace Context: the gateway's span becomes the parent of what it calls."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        """The header to send onward: this gateway span as the parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        return TraceContext(self.trace_id, secrets.token_hex(8), self.span_id, self.flags)


def from_traceparent(header: str | None) -> TraceContext:
    """Continue the caller's trace, or start one when the header is absent or malformed."""
    match = _TRACEPARENT.match(header.strip().lower()) if header else None
    if match and set(match[1]) != {"0"} and set(match[2]) != {"0"}:
        return TraceContext(match[1], secrets.token_hex(8), match[2], match[3])
    return TraceContext(secrets.token_hex(16), secrets.token_hex(8))
