"""The pool's OpenTelemetry spans (ServerConfig.tracing): the broker's queue and the worker's decode, compute, encode.

The edge's `traceparent` (header meta, untrusted: edgesplit.tracing.parse_traceparent) is the
parent of the broker's `queue` span (receipt to dispatch), whose own traceparent travels to the
worker as the last field of the request's control frame; the worker's spans hang under it,
made when it replies, from the stage times it measured (the same ones the reply's meta and
the broker's histograms carry).

The spans go to the process's TracerProvider; `edgesplit serve` and `edgesplit worker` install
none of their own, so with OTEL_TRACES_EXPORTER set the first of these tracers installs one
(edgesplit.tracing.install_from_environment) as service `edgesplit-broker` / `edgesplit-worker`.
"""

from __future__ import annotations

from edgesplit.tracing import Tracer, now_ns, parse_traceparent, traceparent_of

from cloud_server import _wire as W

__all__ = ["BrokerTrace", "WorkerTrace"]


class BrokerTrace:
    def __init__(self):
        self._tracer = Tracer("cloud_server.broker", service="edgesplit-broker")

    @staticmethod
    def accept(value) -> str | None:
        """The edge's traceparent when it is well formed, else None (not traced)."""
        return value if parse_traceparent(value) is not None else None

    def queued(self, parent: str, bundle: str, t0: float, now: float) -> str:
        """The queue span of a request received at broker time t0 and dispatched at `now`; its traceparent."""
        end = now_ns()
        span = self._tracer.span_between("queue", parent, end - int((now - t0) * 1e9), end,
                                         **{"edgesplit.bundle": bundle})
        return traceparent_of(span)


class WorkerTrace:
    def __init__(self, worker: str):
        self._tracer = Tracer("cloud_server.worker", service="edgesplit-worker")
        self._worker = worker
        self.waiting: dict[bytes, str] = {}  # request key -> the broker's traceparent

    def expect(self, rkey: bytes, value) -> None:
        if parse_traceparent(value) is not None and len(self.waiting) < 100_000:
            self.waiting[rkey] = value

    def replied(self, ctl_frame) -> None:
        """A reply leaves: if its request was traced, its decode, compute and encode spans."""
        c = W.parse(ctl_frame)
        if c is not None and c[0] == W.REPLY and len(c) >= 3:
            self.replied_parsed(c[1], c[2])

    def replied_parsed(self, rkey, stats) -> None:
        parent = self.waiting.pop(rkey, None) if type(rkey) is bytes else None
        if parent is None:
            return
        try:
            outcome, times = stats[0], stats[1]
        except (TypeError, IndexError, KeyError):
            return
        end = now_ns()
        attrs = {"edgesplit.worker": self._worker, "edgesplit.outcome": str(outcome)}
        if not (type(times) is list and len(times) >= 4):
            self._tracer.span_between("tail", parent, end, end, **attrs)
            return
        dec, comp, enc = (int(max(0.0, float(t)) * 1e6) for t in times[1:4])
        t_enc = end - enc
        t_comp = t_enc - comp
        self._tracer.span_between("decode", parent, t_comp - dec, t_comp, **attrs)
        self._tracer.span_between("compute", parent, t_comp, t_enc, **attrs)
        self._tracer.span_between("encode", parent, t_enc, end, **attrs)
