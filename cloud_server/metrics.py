"""Prometheus metrics of the cloud pool (prometheus-client, imported only when metrics are on)."""

from __future__ import annotations

from typing import Any

from edgesplit.deps import require

__all__ = ["Metrics", "BundleSeries", "STAGES", "REFUSALS"]

STAGES = ("queue", "decode", "compute", "encode")
# Why a worker refused a request before computing it (the `reason` of edgesplit_refused_requests).
REFUSALS = ("oversize", "bad_payload", "non_finite")
# Seconds: 100 us .. 10 s, dense where a split tail lives (1-100 ms).
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class _Null:
    """Stands in for every metric when metrics are off."""

    def labels(self, *a: Any, **k: Any) -> "_Null":
        return self

    def inc(self, *a: Any) -> None:
        pass

    def observe(self, *a: Any) -> None:
        pass

    def set(self, *a: Any) -> None:
        pass

    def remove(self, *a: Any) -> None:
        pass


class BundleSeries:
    """One bundle's series: answered-request latency and outcomes (label children cached: used per request)."""

    def __init__(self, metrics: "Metrics", bundle: str, name: str):
        self._requests = metrics.bundle_requests
        self._labels = (bundle, name)
        self.latency = metrics.bundle_latency.labels(bundle, name)
        self._outcomes: dict[str, Any] = {}
        for outcome in ("ok", "deadline", "busy"):
            self.outcome(outcome)

    def outcome(self, outcome: str):
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self._requests.labels(*self._labels, outcome)
        return child


class Metrics:
    """The broker's metrics in their own registry (several servers may share a process in tests).

    Args:
        enabled: False gives no-op metrics and needs no prometheus-client.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            n = _Null()
            self.registry = None
            self.requests = self.stage = self.latency = self.batch = n
            self.bytes_in = self.bytes_out = self.live_workers = self.queued = self.inflight = n
            self.worker_up = self.worker_inflight = self.redispatched = self.workers_lost = n
            self.refused = self.bundle_load_errors = n
            self.sessions = self.sessions_evicted = n
            self.bundle_requests = self.bundle_latency = n
            self._bundles: dict[str, BundleSeries] = {}
            self._null_series = BundleSeries(self, "", "")
            return
        prom = require("prometheus_client", "the /metrics endpoint")
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("edgesplit_requests", "Requests answered, by outcome (ok or error code)",
                                     ["outcome"], registry=r)
        self.stage = prom.Histogram("edgesplit_stage_seconds", "Time per request in each stage of the tail",
                                    ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = prom.Histogram("edgesplit_request_seconds",
                                      "Broker receive to reply sent, per answered infer request",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.batch = prom.Histogram("edgesplit_batch_size", "Requests run together in one batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.bytes_in = prom.Counter("edgesplit_bytes_in", "Bytes received from edges", registry=r)
        self.bytes_out = prom.Counter("edgesplit_bytes_out", "Bytes sent to edges", registry=r)
        self.live_workers = prom.Gauge("edgesplit_live_workers", "Workers that sent a heartbeat in time",
                                       registry=r)
        self.queued = prom.Gauge("edgesplit_queued_requests", "Requests waiting in the broker for a worker",
                                 registry=r)
        self.inflight = prom.Gauge("edgesplit_inflight_requests", "Requests dispatched to workers, unanswered",
                                   registry=r)
        self.worker_up = prom.Gauge("edgesplit_worker_up", "1 for each live worker", ["worker", "device"],
                                    registry=r)
        self.worker_inflight = prom.Gauge("edgesplit_worker_inflight", "Requests in flight per live worker",
                                          ["worker"], registry=r)
        self.redispatched = prom.Counter("edgesplit_redispatched", "Requests sent again after a worker was lost",
                                         registry=r)
        self.workers_lost = prom.Counter("edgesplit_workers_lost", "Workers dropped after missed heartbeats",
                                         registry=r)
        self.refused = prom.Counter("edgesplit_refused_requests",
                                    "Requests refused unread or undecoded, by reason (a batch or byte count over "
                                    "the limits, a payload that would expand past its shape, non-finite inputs)",
                                    ["reason"], registry=r)
        self.bundle_load_errors = prom.Gauge("edgesplit_bundle_load_errors",
                                             "Workers that reported they cannot load a bundle, per bundle",
                                             ["bundle", "name"], registry=r)
        self.sessions = prom.Gauge("edgesplit_sessions", "Stateful sessions the live workers hold", registry=r)
        self.sessions_evicted = prom.Counter("edgesplit_sessions_evicted",
                                             "Sessions a worker dropped before their end, by reason (memory: "
                                             "the LRU over session_memory_bytes; idle: past session_idle_s)",
                                             ["reason"], registry=r)
        # per bundle, for the bundles the broker knows (ids from its catalogue only: an edge
        # cannot add label values by asking for made-up ids)
        self.bundle_requests = prom.Counter("edgesplit_bundle_requests",
                                            "Requests for a bundle the broker knows, by bundle and outcome",
                                            ["bundle", "name", "outcome"], registry=r)
        self.bundle_latency = prom.Histogram("edgesplit_bundle_request_seconds",
                                             "Broker receive to reply sent, per answered infer request, by bundle",
                                             ["bundle", "name"], buckets=_LATENCY_BUCKETS, registry=r)
        # pipeline stages (cloud_server.placement): a bundle's segments over several workers
        self.stage_workers = prom.Gauge("edgesplit_pipeline_stage_workers",
                                        "Workers given each pipeline stage of a bundle (replicas included)",
                                        ["bundle", "name", "stage"], registry=r)
        self.stage_hops = prom.Counter("edgesplit_pipeline_hops",
                                       "Hops each pipeline stage computed (passed on to the next stage or answered)",
                                       ["bundle", "name", "stage"], registry=r)
        self._bundles = {}
        self._null_series = BundleSeries(Metrics(enabled=False), "", "")
        # the standard process_* (RSS, CPU seconds, open fds; Linux), python_info and python_gc_* series
        prom.ProcessCollector(registry=r)
        prom.PlatformCollector(registry=r)
        prom.GCCollector(registry=r)
        for reason in ("memory", "idle"):
            self.sessions_evicted.labels(reason)
        for stage in STAGES:
            self.stage.labels(stage)
        for reason in REFUSALS:
            self.refused.labels(reason)
        for outcome in ("ok", "busy", "deadline", "bad_request"):
            self.requests.labels(outcome)

    def know_bundle(self, bundle: str, name: Any) -> None:
        """Make the series of a bundle the broker learnt of (they exist, at 0, from then on)."""
        if bundle not in self._bundles:
            self._bundles[bundle] = BundleSeries(self, bundle, str(name or "?")[:64])

    def bundle(self, bundle: str) -> BundleSeries:
        """The series of `bundle`; a stand-in that counts nothing for an id the broker does not know."""
        return self._bundles.get(bundle) or self._null_series

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        prom = require("prometheus_client", "the /metrics endpoint")
        if self.registry is None:
            return b"", prom.CONTENT_TYPE_LATEST
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
