"""OpenTelemetry: one request's spans from the agent through the broker and a worker, parented across
the wire by the W3C traceparent in the header meta.

Twice: with the cloud as broker + worker threads of an in-process cloud_server.Server (one
provider sees every span), and with `edgesplit serve` and its worker process as separate
processes that export their own spans to OTLP/JSON files (OTEL_TRACES_EXPORTER=edgesplit_file),
read back into the test's in-memory exporter beside the agent's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from builders import chain_bundle, reference  # noqa: E402
from test_agent_support import RealCloud  # noqa: E402

from edge_agent import AgentConfig, EdgeAgent  # noqa: E402
from edge_agent.local_cloud import LocalCloud  # noqa: E402
from edgesplit.errors import ConfigError, UserError  # noqa: E402
from edgesplit.tracing import FileSpanExporter, parse_traceparent, provider_from_environment, read_spans  # noqa: E402

EXPORTER = InMemorySpanExporter()
WORKER_SPANS = ("decode", "compute", "encode")


@pytest.fixture(scope="module")
def spans():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, otel_sdk.TracerProvider):
        provider = otel_sdk.TracerProvider(resource=Resource.create({"service.name": "edgesplit-agent",
                                                                     "process.pid": os.getpid()}))
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    return EXPORTER


def test_one_request_traced_agent_broker_worker(tmp_path, spans):
    bundle, full = chain_bundle(tmp_path / "repo")
    cloud = RealCloud(tmp_path / "repo", tracing=True)
    try:
        cfg = AgentConfig(tracing=True, profile_runs=1, connect_timeout_ms=20_000, deadline_ms=10_000)
        x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
        with EdgeAgent(bundle, [cloud.address], cut=1, codec="fp16", config=cfg) as agent:
            spans.clear()
            r = agent.infer({"x": x})
    finally:
        cloud.close()
    assert r.where == "cloud"
    np.testing.assert_allclose(r.outputs["y"], reference(full, x), rtol=2e-2, atol=2e-2)
    got = spans.get_finished_spans()
    by_scope = {}
    for s in got:
        by_scope.setdefault((s.instrumentation_scope.name, s.name), []).append(s)
    names = set(by_scope)
    assert {("edge_agent", n) for n in ("edgesplit.request", "head", "encode", "uplink", "downlink")} <= names, names
    assert ("cloud_server.broker", "queue") in names, names
    assert {("cloud_server.worker", n) for n in ("decode", "compute", "encode")} <= names, names
    (root,) = by_scope[("edge_agent", "edgesplit.request")]
    (uplink,) = by_scope[("edge_agent", "uplink")]
    (queue,) = by_scope[("cloud_server.broker", "queue")]
    assert root.parent is None
    trace_id = root.context.trace_id
    assert all(s.context.trace_id == trace_id for s in got)              # one trace
    for n in ("head", "encode", "uplink", "downlink"):
        assert by_scope[("edge_agent", n)][0].parent.span_id == root.context.span_id
    assert queue.parent.span_id == uplink.context.span_id and queue.parent.is_remote  # over the wire
    for n in ("decode", "compute", "encode"):
        (s,) = by_scope[("cloud_server.worker", n)]
        assert s.parent.span_id == queue.context.span_id and s.parent.is_remote
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time + 5_000_000
    assert root.attributes["edgesplit.where"] == "cloud"


def test_a_malformed_traceparent_is_ignored():
    assert parse_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01") == (int("a" * 32, 16), int("b" * 16, 16), 1)
    for bad in (None, 5, "", "00-" + "0" * 32 + "-" + "b" * 16 + "-01", "01-" + "a" * 32 + "-" + "b" * 16 + "-01",
                "00-" + "A" * 32 + "-" + "b" * 16 + "-01", "00-" + "a" * 32 + "-" + "b" * 16 + "-01\n",
                "x" * 10_000):
        assert parse_traceparent(bad) is None


def _server_spans(directory, trace_id: int, timeout_s: float = 60.0) -> list:
    """The spans of `trace_id` in the server processes' files, once the queue and the worker's are all there."""
    end = time.monotonic() + timeout_s
    while True:
        got = [s for s in read_spans(directory) if s.context.trace_id == trace_id] if directory.is_dir() else []
        if {"queue", *WORKER_SPANS} <= {s.name for s in got} or time.monotonic() > end:
            return got
        time.sleep(0.05)


def test_one_request_traced_across_three_processes(tmp_path, spans, monkeypatch):
    """The agent here; `edgesplit serve` (the broker) and its worker process export to files, read back here."""
    bundle, full = chain_bundle(tmp_path / "repo")
    traces = tmp_path / "traces"
    # what the server processes inherit: the standard OTel variables, the batch processor's delay
    # cut to 50 ms so the spans are written while the server runs
    for k, v in {"EDGESPLIT_SERVER_TRACING": "1", "OTEL_TRACES_EXPORTER": "edgesplit_file",
                 "EDGESPLIT_TRACES_DIR": str(traces), "OTEL_BSP_SCHEDULE_DELAY": "50"}.items():
        monkeypatch.setenv(k, v)
    for k in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(k, raising=False)
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    with LocalCloud(tmp_path / "repo", workers=1, threads=1) as cloud:
        cfg = AgentConfig(tracing=True, profile_runs=1, connect_timeout_ms=20_000, deadline_ms=20_000)
        with EdgeAgent(bundle, [cloud.address], cut=1, codec="fp16", config=cfg) as agent:
            spans.clear()
            r = agent.infer({"x": x})
        assert r.where == "cloud"
        ours = spans.get_finished_spans()
        (root,) = [s for s in ours if s.name == "edgesplit.request"]
        server = _server_spans(traces, root.context.trace_id)
        broker_pid = cloud.info["pid"]
    np.testing.assert_allclose(r.outputs["y"], reference(full, x), rtol=2e-2, atol=2e-2)
    spans.export(server)  # the SDK's in-memory exporter holds the whole trace now
    got = spans.get_finished_spans()
    assert all(s.context.trace_id == root.context.trace_id for s in got)  # one trace

    def role(s) -> tuple[str, str]:
        return s.resource.attributes.get("service.name"), s.name

    by = {}
    for s in got:
        by.setdefault(role(s), []).append(s)
    assert sorted(by) == sorted([("edgesplit-agent", n) for n in ("edgesplit.request", "head", "encode", "uplink",
                                                                  "downlink")]
                                + [("edgesplit-broker", "queue")]
                                + [("edgesplit-worker", n) for n in WORKER_SPANS]), sorted(by)
    assert all(len(v) == 1 for v in by.values()), by
    one = {k: v[0] for k, v in by.items()}
    agent_span = {n: one[("edgesplit-agent", n)] for n in ("head", "encode", "uplink", "downlink")}
    queue = one[("edgesplit-broker", "queue")]
    worker = [one[("edgesplit-worker", n)] for n in WORKER_SPANS]

    # parents: agent root -> uplink -> (over ZeroMQ) broker queue -> (over ZeroMQ) worker spans
    assert root.parent is None
    assert all(s.parent.span_id == root.context.span_id and not s.parent.is_remote for s in agent_span.values())
    assert queue.parent.span_id == agent_span["uplink"].context.span_id and queue.parent.is_remote
    assert all(s.parent.span_id == queue.context.span_id and s.parent.is_remote for s in worker)
    assert queue.instrumentation_scope.name == "cloud_server.broker"
    assert {s.instrumentation_scope.name for s in worker} == {"cloud_server.worker"}

    # three processes: the agent's (this one), the broker's (the serve process), its child worker's
    pids = {s.resource.attributes["process.pid"] for s in worker}
    assert root.resource.attributes["process.pid"] == os.getpid()
    assert queue.resource.attributes["process.pid"] == broker_pid != os.getpid()
    assert len(pids) == 1 and pids.isdisjoint({os.getpid(), broker_pid}), pids
    assert {s.resource.attributes["process.parent_pid"] for s in worker} == {broker_pid}
    assert sorted(p.name for p in traces.iterdir()) == sorted([f"edgesplit-broker-{broker_pid}.jsonl",
                                                               f"edgesplit-worker-{pids.pop()}.jsonl"])

    # one host, one clock: the cloud's spans lie within the request (slack for a loaded box)
    for s in (queue, *worker):
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time + 1_000_000_000
    assert agent_span["uplink"].end_time == agent_span["downlink"].start_time <= root.end_time
    assert agent_span["downlink"].end_time == root.end_time and root.attributes["edgesplit.where"] == "cloud"


def _local_provider(exporter, service: str = "probe"):
    p = otel_sdk.TracerProvider(resource=Resource.create({"service.name": service, "process.pid": 4321}))
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p


def test_the_file_exporter_writes_otlp_json_lines_that_read_back(tmp_path):
    provider = _local_provider(FileSpanExporter(tmp_path))
    tracer = provider.get_tracer("probe.scope", "1.2")
    remote = trace.SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=trace.TraceFlags(1))
    parent = tracer.start_span("parent", context=trace.set_span_in_context(trace.NonRecordingSpan(remote)),
                               kind=trace.SpanKind.SERVER, start_time=1_000,
                               attributes={"s": "x", "i": 2**40, "f": 0.5, "b": True, "a": ("p", "q")})
    parent.add_event("ev", {"n": 1}, timestamp=1_500)
    child = tracer.start_span("child", context=trace.set_span_in_context(parent), start_time=2_000,
                              links=[trace.Link(remote, {"why": "l"})])
    child.set_status(trace.Status(trace.StatusCode.ERROR, "boom"))
    child.end(end_time=3_000)
    parent.end(end_time=4_000)
    provider.shutdown()
    (f,) = tmp_path.iterdir()
    assert f.name == f"probe-{os.getpid()}.jsonl" and len(f.read_text().splitlines()) == 2
    with f.open("a") as out:
        out.write('{"resourceSpans": [')  # a writer killed mid-line: skipped
    c, p = read_spans(tmp_path)
    assert (c.name, p.name) == ("child", "parent")
    assert p.parent == remote and p.parent.is_remote and p.context.trace_id == 0xABC
    assert c.parent.span_id == p.context.span_id and not c.parent.is_remote
    assert p.kind == trace.SpanKind.SERVER and c.kind == trace.SpanKind.INTERNAL
    assert dict(p.attributes) == {"s": "x", "i": 2**40, "f": 0.5, "b": True, "a": ("p", "q")}
    assert (p.start_time, p.end_time, c.start_time, c.end_time) == (1_000, 4_000, 2_000, 3_000)
    assert [(e.name, dict(e.attributes), e.timestamp) for e in p.events] == [("ev", {"n": 1}, 1_500)]
    assert c.links[0].context == remote and c.links[0].context.is_remote and dict(c.links[0].attributes) == {"why": "l"}
    assert (c.status.status_code, c.status.description) == (trace.StatusCode.ERROR, "boom")
    assert dict(c.resource.attributes)["service.name"] == "probe" and c.resource.attributes["process.pid"] == 4321
    assert (c.instrumentation_scope.name, c.instrumentation_scope.version) == ("probe.scope", "1.2")
    with f.open("a") as out:
        out.write('"}\n')  # the partial line completed into garbage: an error naming the line
    with pytest.raises(UserError, match=rf"{f.name}:3: not an OTLP/JSON"):
        read_spans(f)


def test_otel_traces_exporter_names_the_exporters(tmp_path, monkeypatch):
    for k in ("OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "EDGESPLIT_TRACES_DIR"):
        monkeypatch.delenv(k, raising=False)
    assert provider_from_environment("edgesplit-worker") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert provider_from_environment("edgesplit-worker") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "edgesplit_file")
    with pytest.raises(ConfigError, match="EDGESPLIT_TRACES_DIR"):
        provider_from_environment("edgesplit-worker")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,nonesuch")
    with pytest.raises(ConfigError, match="'nonesuch'.*installed: console, edgesplit_file"):
        provider_from_environment("edgesplit-worker")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", " edgesplit_file ")
    monkeypatch.setenv("EDGESPLIT_TRACES_DIR", str(tmp_path))
    for service_env, expect in ((None, "edgesplit-worker"), ("pool-a", "pool-a")):
        if service_env:
            monkeypatch.setenv("OTEL_SERVICE_NAME", service_env)
        p = provider_from_environment("edgesplit-worker")
        try:
            attrs = p.resource.attributes
            assert (attrs["service.name"], attrs["process.pid"], attrs["process.parent_pid"]) == (
                expect, os.getpid(), os.getppid())
        finally:
            p.shutdown()


def test_an_installed_provider_is_left_alone(tmp_path):
    """The application's provider wins over OTEL_TRACES_EXPORTER; without one, the first Tracer installs it."""
    code = textwrap.dedent("""
        import sys
        from opentelemetry import trace
        from edgesplit.tracing import Tracer
        if sys.argv[1] == "app":
            from opentelemetry.sdk.trace import TracerProvider
            trace.set_tracer_provider(TracerProvider())
        Tracer("probe", service="probe-service").span_between("s", None, 1, 2)
        trace.get_tracer_provider().shutdown()
    """)
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "edgesplit_file", "EDGESPLIT_TRACES_DIR": str(tmp_path)}
    env.pop("OTEL_SERVICE_NAME", None)
    env.pop("OTEL_RESOURCE_ATTRIBUTES", None)
    for who in ("app", "none"):
        proc = subprocess.run([sys.executable, "-c", code, who], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
    (f,) = tmp_path.iterdir()  # only the process without a provider of its own wrote one
    assert f.name.startswith("probe-service-")
    assert [s.name for s in read_spans(f)] == ["s"]
