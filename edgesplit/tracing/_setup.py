"""A TracerProvider from the standard OTEL_* variables, for a process whose application installed none.

`edgesplit serve` and `edgesplit worker` have no application code to install a provider (nor
has an agent embedded in a program that never thought of one), so without this their spans are
no-ops. When OTEL_TRACES_EXPORTER is set and the process's provider is still the API's proxy,
the first Tracer installs an SDK TracerProvider with one BatchSpanProcessor (OTEL_BSP_*) per
exporter named:

    edgesplit_file    FileSpanExporter: OTLP/JSON lines under EDGESPLIT_TRACES_DIR, a file per process
    console           the SDK's ConsoleSpanExporter (stdout)
    otlp, zipkin, ... any package's `opentelemetry_traces_exporter` entry point (opentelemetry-exporter-otlp)
    none              nothing

Its resource is OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME, plus `process.pid` and
`process.parent_pid`, and `service.name` = the component's (edgesplit-agent, edgesplit-broker,
edgesplit-worker) unless those variables name one. A provider the application installed, or
one from `opentelemetry-instrument`, is left alone.
"""

from __future__ import annotations

import logging
import os
import threading
from importlib.metadata import entry_points

from edgesplit.deps import require
from edgesplit.errors import ConfigError
from edgesplit.tracing._file import FileSpanExporter

__all__ = ["install_from_environment", "provider_from_environment"]

log = logging.getLogger(__name__)

_NEED = "OTEL_TRACES_EXPORTER (pip install 'edgesplit[otel]')"
# Exporters edgesplit makes itself; any other name is looked up among the installed entry points.
_OWN = {"edgesplit_file": FileSpanExporter}
_lock = threading.Lock()
_done = False


def _exporter(name: str):
    if name in _OWN:
        return _OWN[name]()
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        have = sorted({*_OWN, *(ep.name for ep in entry_points(group="opentelemetry_traces_exporter"))})
        raise ConfigError(f"OTEL_TRACES_EXPORTER names {name!r}, which no installed package provides "
                          f"(installed: {', '.join(have)}, none; otlp comes with opentelemetry-exporter-otlp)")
    return found[0].load()()


def provider_from_environment(service: str):
    """An SDK TracerProvider for the exporters OTEL_TRACES_EXPORTER names, or None when it names none.

    Args:
        service: the `service.name` to use unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES give one.
    """
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names:
        return None
    sdk = require("opentelemetry.sdk.trace", _NEED)
    export = require("opentelemetry.sdk.trace.export", _NEED)
    resources = require("opentelemetry.sdk.resources", _NEED)
    exporters = [_exporter(n) for n in names]
    attrs = {"process.pid": os.getpid(), "process.parent_pid": os.getppid()}
    if not resources.OTELResourceDetector().detect().attributes.get("service.name"):
        attrs["service.name"] = service
    provider = sdk.TracerProvider(resource=resources.Resource.create(attrs))
    for e in exporters:
        provider.add_span_processor(export.BatchSpanProcessor(e))
    return provider


def install_from_environment(service: str) -> bool:
    """Install provider_from_environment(service) as the process's TracerProvider if none is; once per process.

    Returns:
        True if this call installed one.
    """
    global _done
    with _lock:
        if _done:
            return False
        trace = require("opentelemetry.trace", _NEED)
        # an installed provider (the application's, opentelemetry-instrument's) stays; a bad
        # variable raises ConfigError here, and again at the next Tracer (_done stays False)
        provider = (provider_from_environment(service)
                    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) else None)
        _done = True
        if provider is None:
            return False
        trace.set_tracer_provider(provider)
        log.info("tracing: spans of %s (pid %d) to %s", provider.resource.attributes.get("service.name"),
                 os.getpid(), os.environ.get("OTEL_TRACES_EXPORTER"))
        return True
