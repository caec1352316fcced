"""OpenTelemetry spans, only when the SDK is installed and an exporter is configured.

The gateway's own W3C trace context (gateway.tracing) is always propagated; this
module merely mirrors the commit's tool execution as an OTel span named
`execute_tool {tool}` (GenAI semantic conventions) under that same trace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from gateway.tracing import TraceContext

try:  # optional dependency: `pip install agent-gateway[otel]`
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
except ImportError:  # pragma: no cover - exercised where opentelemetry is absent
    otel_trace = None  # type: ignore[assignment]

_EXPORTER_VARIABLES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)


def enabled() -> bool:
    if otel_trace is None:
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    return exporter.lower() != "none" and any(os.environ.get(name) for name in _EXPORTER_VARIABLES)


@contextlib.contextmanager
def span(name: str, trace: TraceContext, attributes: dict[str, Any]) -> Iterator[None]:
    if not enabled():
        yield
        return
    parent = SpanContext(
        trace_id=int(trace.trace_id, 16),
        span_id=int(trace.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(trace.flags, 16)),
    )
    context = otel_trace.set_span_in_context(NonRecordingSpan(parent))
    tracer = otel_trace.get_tracer("agent-gateway")
    with tracer.start_as_current_span(
        name, context=context, kind=otel_trace.SpanKind.CLIENT, attributes=attributes
    ):
        yield
