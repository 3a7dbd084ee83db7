"""The broker's /metrics: the standard process_* / python_* collectors, and per-bundle series."""

from __future__ import annotations

import re

import numpy as np
import pytest

from builders import mlp_bundle
from test_cloud_support import Edge, ServeProc

from cloud_server.metrics import Metrics
from edgesplit.bundle import Bundle


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_standard_collectors_on_the_servers_own_registry():
    text = Metrics().render()[0].decode()
    names = {re.split(r"[{ ]", line, 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
            "python_info", "python_gc_objects_collected_total"} <= names
    assert Metrics(enabled=False).render  # off: no prometheus-client needed, nothing collected


def test_per_bundle_series_only_for_bundles_the_broker_knows():
    m = Metrics()
    m.know_bundle("a" * 64, "mlp")
    m.bundle("a" * 64).outcome("ok").inc()
    m.bundle("b" * 64).outcome("ok").inc()        # an id nobody announced: no new label values
    s = _samples(m.render()[0].decode())
    assert s[f'edgesplit_bundle_requests_total{{bundle="{"a" * 64}",name="mlp",outcome="ok"}}'] == 1.0
    assert s[f'edgesplit_bundle_requests_total{{bundle="{"a" * 64}",name="mlp",outcome="deadline"}}'] == 0.0
    assert not any("b" * 64 in k for k in s)


@pytest.mark.slow
def test_metrics_of_a_running_broker(tmp_path):
    mlp_bundle(tmp_path / "repo" / "mlp")
    mlp = Bundle.load(tmp_path / "repo" / "mlp")
    with ServeProc(tmp_path / "repo", workers=1) as server:
        edge = Edge(server.address)
        try:
            for i in range(3):
                edge.send_infer(f"r{i}", mlp.id, 1, {"h": np.ones((1, 32), np.float32)}, deadline_ms=20_000)
                assert edge.recv(timeout_ms=20_000).kind == "result"
            edge.send_infer("late", mlp.id, 1, {"h": np.ones((1, 32), np.float32)}, deadline_ms=0)
            assert edge.recv(timeout_ms=20_000).meta["code"] == "deadline"
            edge.send_infer("nope", "f" * 64, 1, {"h": np.ones((1, 32), np.float32)})
            assert edge.recv(timeout_ms=20_000).meta["code"] == "unknown_bundle"
        finally:
            edge.close()
        s = _samples(server.get("/metrics")[1])
    assert s["process_resident_memory_bytes"] > 10e6
    assert s["process_cpu_seconds_total"] > 0 and s["process_open_fds"] > 0
    labels = f'bundle="{mlp.id}",name="mlp"'
    assert s[f"edgesplit_bundle_requests_total{{{labels},outcome=\"ok\"}}"] == 3.0
    assert s[f"edgesplit_bundle_requests_total{{{labels},outcome=\"deadline\"}}"] == 1.0
    assert s[f"edgesplit_bundle_request_seconds_count{{{labels}}}"] == 3.0
    assert s['edgesplit_requests_total{outcome="ok"}'] == 3.0            # the pool-wide names are unchanged
    assert not any("f" * 64 in k for k in s)                              # unknown ids add no series
