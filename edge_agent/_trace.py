"""The agent's OpenTelemetry spans (AgentConfig.tracing): request -> head, encode, uplink, downlink.

Made when a request is handed to the I/O thread, from the head and encode times already
measured; `uplink` runs from that hand-off until the reply left the cloud, and the server's
spans (the broker's queue, the worker's decode / compute / encode) hang under it through the
`traceparent` sent in the request's meta. `downlink` runs from then to the answer. Without
synchronised clocks the agent cannot see when the reply left, so the split is an estimate:
the round trip less the server's own time (its reply's timings) is the network's, half of it
the way back, plus the agent's decoding of the reply (`edgesplit.estimated` on the span).
"""

from __future__ import annotations

import threading
import time

from edgesplit.tracing import Tracer, now_ns, traceparent_of

__all__ = ["AgentTrace"]


class AgentTrace:
    """The open spans of the requests in the cloud (request and uplink), closed when each is answered."""

    def __init__(self, bundle_id: str):
        self._tracer = Tracer("edge_agent", service="edgesplit-agent")
        self._bundle = bundle_id
        self._open: dict = {}
        self._lock = threading.Lock()

    def sending(self, req) -> None:
        """`req` goes to the cloud now: its request, head and encode spans, and the uplink span it is sent under."""
        t = self._tracer
        end = now_ns()
        enc_start = end - int(req.timings["encode"] * 1e6)
        head_start = enc_start - int(req.timings["head"] * 1e6)
        start = min(head_start, end - int((time.perf_counter() - req.t0) * 1e9))
        root = t.start("edgesplit.request", None, start, **{"edgesplit.request_id": req.id,
                                                            "edgesplit.bundle": self._bundle,
                                                            "edgesplit.cut": req.cut})
        t.span_between("head", root, head_start, enc_start)
        t.span_between("encode", root, enc_start, end, **{"edgesplit.bytes": req.bytes_up})
        uplink = t.start("uplink", root, end)
        req.meta = {**(req.meta or {}), "traceparent": traceparent_of(uplink)}
        with self._lock:
            self._open[req] = (root, uplink, end)

    def finished(self, req, where: str | None) -> None:
        with self._lock:
            spans = self._open.pop(req, None)
        if spans is None:
            return
        end = now_ns()
        root, uplink, sent = spans
        back = end
        if where == "cloud":  # req.timings["network"]: the answering hop's network time + earlier failed hops
            net_ms = max(0.0, req.timings.get("network", 0.0) - req.waited_ms)
            back = max(sent, end - int((net_ms / 2 + req.timings.get("decode", 0.0)) * 1e6))
        uplink.end(end_time=back)
        if where == "cloud":
            self._tracer.span_between("downlink", root, back, end, **{"edgesplit.estimated": True})
        root.set_attribute("edgesplit.where", where or "error")
        root.end(end_time=end)
