"""Spans to and from OTLP/JSON lines files: the server processes' traces, collected without a collector.

Each line is one OTLP `ExportTraceServiceRequest` in the protobuf JSON mapping of the OTLP
specification (`{"resourceSpans": [{"resource": ..., "scopeSpans": [{"scope": ..., "spans":
[...]}]}]}`; ids in hex, enums as integers, 64-bit integers as strings): the format the
OpenTelemetry Collector's `file` exporter writes and its `otlpjsonfile` receiver reads, so a
directory of these files can also be replayed into any tracing backend. A span's `flags` carry
its trace flags and whether its parent is remote (bits 8 and 9), so a parent that came over the
wire stays one when read back.

Every process writes its own file, `<service.name>-<pid>.jsonl`, appending one line per export
and flushing it: no two processes share a file, and a reader sees whole lines (a process killed
mid-write leaves at most one partial last line, which `read_spans` skips).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path

from edgesplit.deps import require
from edgesplit.errors import ConfigError, UserError

__all__ = ["FileSpanExporter", "read_spans"]

log = logging.getLogger(__name__)

DIR_VARIABLE = "EDGESPLIT_TRACES_DIR"
_NEED = "trace files (pip install 'edgesplit[otel]')"
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # OTLP SpanFlags: the parent's (a link's) context is remote


class FileSpanExporter:
    """An OpenTelemetry SDK span exporter (export / shutdown / force_flush) writing OTLP/JSON lines.

    Args:
        directory: where this process's file goes (default: the EDGESPLIT_TRACES_DIR variable);
            made if missing.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        directory = directory if directory is not None else os.environ.get(DIR_VARIABLE)
        if not directory:
            raise ConfigError(f"the edgesplit_file span exporter writes under {DIR_VARIABLE}, which is not set")
        self.directory = Path(directory)
        self.path: Path | None = None  # named by the first span's resource (service.name, and the pid)
        self._result = require("opentelemetry.sdk.trace.export", _NEED).SpanExportResult
        self._file = None
        self._lock = threading.Lock()
        self._failed = False

    def export(self, spans):
        if not spans:
            return self._result.SUCCESS
        line = json.dumps(encode_spans(spans), separators=(",", ":")) + "\n"
        with self._lock:
            try:
                if self._file is None:
                    service = str(spans[0].resource.attributes.get("service.name", "unknown_service"))
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self.path = self.directory / f"{re.sub(r'[^A-Za-z0-9._-]', '_', service)}-{os.getpid()}.jsonl"
                    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open until shutdown()
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                if not self._failed:  # once: a full disk must not flood the log of a serving process
                    log.warning("tracing: cannot write spans to %s: %s", self.path or self.directory, exc)
                self._failed = True
                return self._result.FAILURE
        return self._result.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # every export is flushed already


# --- encoding


def _value(v) -> dict:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, (bytes, bytearray)):
        return {"bytesValue": base64.b64encode(v).decode("ascii")}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [_value(x) for x in v]}}
    if isinstance(v, Mapping):
        return {"kvlistValue": {"values": _attributes(v)}}
    return {"stringValue": str(v)}


def _attributes(attrs) -> list:
    return [{"key": str(k), "value": _value(v)} for k, v in (attrs or {}).items()]


def _span(s) -> dict:
    ctx, parent = s.context, s.parent
    flags = int(ctx.trace_flags) | _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    d = {"traceId": f"{ctx.trace_id:032x}", "spanId": f"{ctx.span_id:016x}", "flags": flags, "name": s.name,
         "kind": s.kind.value + 1,  # OTLP counts from SPAN_KIND_UNSPECIFIED = 0
         "startTimeUnixNano": str(s.start_time), "endTimeUnixNano": str(s.end_time),
         "attributes": _attributes(s.attributes),
         "status": {"code": s.status.status_code.value, **({"message": s.status.description}
                                                             if s.status.description else {})}}
    if parent is not None:
        d["parentSpanId"] = f"{parent.span_id:016x}"
    if ctx.trace_state:
        d["traceState"] = ctx.trace_state.to_header()
    if s.events:
        d["events"] = [{"timeUnixNano": str(e.timestamp), "name": e.name, "attributes": _attributes(e.attributes)}
                       for e in s.events]
    if s.links:
        d["links"] = [{"traceId": f"{link.context.trace_id:032x}", "spanId": f"{link.context.span_id:016x}",
                       "flags": int(link.context.trace_flags) | _HAS_IS_REMOTE
                       | (_IS_REMOTE if link.context.is_remote else 0),
                       "attributes": _attributes(link.attributes)} for link in s.links]
    return d


def encode_spans(spans) -> dict:
    """An OTLP ExportTraceServiceRequest (JSON mapping) of SDK ReadableSpans, grouped by resource and scope."""
    by_resource: dict[int, tuple] = {}
    for s in spans:
        r = s.resource
        scopes = by_resource.setdefault(id(r), (r, {}))[1]
        sc = s.instrumentation_scope
        key = (sc.name, sc.version, sc.schema_url) if sc is not None else ("", None, None)
        scopes.setdefault(key, []).append(_span(s))
    out = []
    for r, scopes in by_resource.values():
        rs = {"resource": {"attributes": _attributes(r.attributes if r is not None else {})}, "scopeSpans": [
            {"scope": {"name": name, **({"version": version} if version else {})}, "spans": items,
             **({"schemaUrl": schema} if schema else {})}
            for (name, version, schema), items in scopes.items()]}
        if r is not None and r.schema_url:
            rs["schemaUrl"] = r.schema_url
        out.append(rs)
    return {"resourceSpans": out}


# --- decoding


def _from_value(v: dict):
    (kind, x), = v.items()
    if kind == "intValue":
        return int(x)
    if kind == "arrayValue":
        return tuple(_from_value(e) for e in x.get("values", []))
    if kind == "bytesValue":
        return base64.b64decode(x)
    if kind == "kvlistValue":
        return {kv["key"]: _from_value(kv["value"]) for kv in x.get("values", [])}
    if kind in ("stringValue", "boolValue", "doubleValue"):
        return x
    raise ValueError(f"unknown attribute value {kind!r}")


def _from_attributes(items) -> dict:
    return {a["key"]: _from_value(a["value"]) for a in items or ()}


class _Decoder:
    def __init__(self):
        self.api = require("opentelemetry.trace", _NEED)
        self.sdk = require("opentelemetry.sdk.trace", _NEED)
        self.resources = require("opentelemetry.sdk.resources", _NEED)
        self.scope = require("opentelemetry.sdk.util.instrumentation", _NEED).InstrumentationScope

    def context(self, trace_id: str, span_id: str, flags: int, remote: bool, state: str | None = None):
        t = self.api
        ts = t.TraceState.from_header([state]) if state else None
        return t.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=remote,
                             trace_flags=t.TraceFlags(flags & 0xFF), trace_state=ts)

    def link(self, d: dict):
        flags = int(d.get("flags", 1))
        return self.api.Link(self.context(d["traceId"], d["spanId"], flags, bool(flags & _IS_REMOTE)),
                             _from_attributes(d.get("attributes")))

    def spans(self, request: dict) -> list:
        t, sdk = self.api, self.sdk
        out = []
        for rs in request.get("resourceSpans", []):
            resource = self.resources.Resource(_from_attributes(rs.get("resource", {}).get("attributes")),
                                               rs.get("schemaUrl"))
            for ss in rs.get("scopeSpans", []):
                sc = ss.get("scope", {})
                scope = self.scope(sc.get("name", ""), sc.get("version"), ss.get("schemaUrl"))
                for s in ss.get("spans", []):
                    flags = int(s.get("flags", 1))
                    parent = (self.context(s["traceId"], s["parentSpanId"], flags, bool(flags & _IS_REMOTE))
                              if s.get("parentSpanId") else None)
                    status = s.get("status", {})
                    out.append(sdk.ReadableSpan(
                        s["name"], context=self.context(s["traceId"], s["spanId"], flags, False, s.get("traceState")),
                        parent=parent, resource=resource, attributes=_from_attributes(s.get("attributes")),
                        events=[sdk.Event(e["name"], _from_attributes(e.get("attributes")), int(e["timeUnixNano"]))
                                for e in s.get("events", [])],
                        links=[self.link(link) for link in s.get("links", [])],
                        kind=t.SpanKind(max(0, int(s.get("kind", 1)) - 1)),
                        status=t.Status(t.StatusCode(int(status.get("code", 0))), status.get("message")),
                        start_time=int(s["startTimeUnixNano"]), end_time=int(s["endTimeUnixNano"]),
                        instrumentation_scope=scope))
        return out


def read_spans(path: str | os.PathLike) -> list:
    """The spans of an OTLP/JSON lines file, or of every `*.jsonl` in a directory, as SDK ReadableSpans.

    A last line without its newline (a writer killed mid-line, or still writing) is skipped.

    Raises:
        UserError: a complete line that is not an OTLP/JSON trace export (naming the file and line).
    """
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    decoder = _Decoder()
    spans = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(keepends=True), 1):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                spans += decoder.spans(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UserError(f"{f}:{n}: not an OTLP/JSON trace export ({type(exc).__name__}: {exc})") from None
    return spans
