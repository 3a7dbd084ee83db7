"""OpenTelemetry tracing of one request across agent, broker and worker (`pip install 'edgesplit[otel]'`).

Off unless a config asks for it (AgentConfig.tracing, ServerConfig.tracing); then OpenTelemetry is
imported through edgesplit.deps on first use and spans go to whatever TracerProvider the
application installed. When it installed none and OTEL_TRACES_EXPORTER names exporters, the
first Tracer of the process installs one for them (`install_from_environment`), with a
`service.name` per component and the process's pid, so `edgesplit serve` and its worker
processes export their spans too; `edgesplit_file` (FileSpanExporter) writes OTLP/JSON lines,
one file per process, that `read_spans` reads back.

The W3C `traceparent` of the sending span travels in the wire header's meta (agent -> broker ->
worker), so spans made in three processes join one trace. Spans are made with explicit start and
end times (`span_between`): each side already times its stages, and a span made after the fact
costs nothing while the request is in flight.

A traceparent from the wire is untrusted: anything but `00-<32 hex>-<16 hex>-<2 hex>` with
non-zero ids is ignored (the request is traced as a new trace, or not at all).
"""

from __future__ import annotations

import re
import time
from typing import Any

from edgesplit.deps import require
from edgesplit.tracing._file import FileSpanExporter, read_spans
from edgesplit.tracing._setup import install_from_environment, provider_from_environment

__all__ = ["Tracer", "parse_traceparent", "traceparent_of", "now_ns", "FileSpanExporter", "read_spans",
           "install_from_environment", "provider_from_environment"]

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")


def now_ns() -> int:
    """Wall-clock nanoseconds (what span times are in); pair with perf_counter() to date a stage."""
    return time.time_ns()


def parse_traceparent(value: Any) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a well-formed W3C traceparent, else None."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    trace_id, span_id, flags = int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, flags


def traceparent_of(span) -> str:
    """The W3C traceparent naming `span` as the parent."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class Tracer:
    """One component's tracer (imports OpenTelemetry when made).

    Args:
        name: the instrumentation scope ("edge_agent", "cloud_server.broker", ...).
        service: the `service.name` of this process's spans if this tracer is the one that
            installs a TracerProvider from OTEL_TRACES_EXPORTER (install_from_environment).
    """

    def __init__(self, name: str, service: str = "edgesplit"):
        self._trace = require("opentelemetry.trace", "tracing (AgentConfig.tracing / ServerConfig.tracing)")
        install_from_environment(service)
        self._tracer = self._trace.get_tracer(name)

    def context(self, parent: Any = None):
        """An OpenTelemetry context whose parent is `parent`: a span, a traceparent string, or None (a new trace)."""
        t = self._trace
        if parent is None:
            return None
        if isinstance(parent, str):
            ids = parse_traceparent(parent)
            if ids is None:
                return None
            sc = t.SpanContext(ids[0], ids[1], is_remote=True, trace_flags=t.TraceFlags(ids[2]))
            return t.set_span_in_context(t.NonRecordingSpan(sc))
        return t.set_span_in_context(parent)

    def start(self, name: str, parent: Any = None, start_ns: int | None = None, **attributes: Any):
        """A span begun at `start_ns` (default now) under `parent`; end it with span.end(end_time=...)."""
        return self._tracer.start_span(name, context=self.context(parent), start_time=start_ns,
                                       attributes=attributes or None)

    def span_between(self, name: str, parent: Any, start_ns: int, end_ns: int, **attributes: Any):
        """A span that began and ended at the given times (a stage timed already)."""
        span = self.start(name, parent, start_ns, **attributes)
        span.end(end_time=max(start_ns, end_ns))
        return span
