"""OpenTelemetry: one request's spans from the agent through the broker and a worker, parented across
the wire by the W3C traceparent in the header meta. In one process (the cloud as broker + worker
threads of an in-process cloud_server.Server: a child process's spans would need an exporter to
collect them), but each hop's parent comes over ZeroMQ, exactly as between processes."""

from __future__ import annotations

import numpy as np
import pytest

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from builders import chain_bundle, reference  # noqa: E402
from test_agent_support import RealCloud  # noqa: E402

from edge_agent import AgentConfig, EdgeAgent  # noqa: E402
from edgesplit.tracing import parse_traceparent  # noqa: E402

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, otel_sdk.TracerProvider):
        provider = otel_sdk.TracerProvider()
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
    assert {("edge_agent", n) for n in ("edgesplit.request", "head", "encode", "uplink")} <= names, names
    assert ("cloud_server.broker", "queue") in names, names
    assert {("cloud_server.worker", n) for n in ("decode", "compute", "encode")} <= names, names
    (root,) = by_scope[("edge_agent", "edgesplit.request")]
    (uplink,) = by_scope[("edge_agent", "uplink")]
    (queue,) = by_scope[("cloud_server.broker", "queue")]
    assert root.parent is None
    trace_id = root.context.trace_id
    assert all(s.context.trace_id == trace_id for s in got)              # one trace
    for n in ("head", "encode", "uplink"):
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
