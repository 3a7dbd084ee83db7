"""The broker's edge-facing desk: read each edge message's header, route it, and send every answer to edges.

Only the header is read (`edgesplit.protocol.decode_header`, the same checks `decode` starts
with); the tensor frames go on to a worker untouched, which decodes and checks them. Anything
malformed is answered with an error (or dropped when it is itself an answer); nothing an edge
sends raises out of here.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from edgesplit import protocol as P

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.dispatch import Dispatcher, Request
from cloud_server.metrics import REFUSALS, STAGES, Metrics
from cloud_server.registry import BundleCatalog, WorkerRegistry

__all__ = ["EdgeDesk"]

_FLOAT = (int, float)
_ANSWERS = frozenset({"result", "error", "pong", "welcome"})  # never answered: no ping-pong storms
_OUTCOMES = frozenset(P.ERROR_CODES | {"ok", "cancelled"})  # label values of request outcomes


def _outcome_label(outcome: Any) -> str:
    """An outcome as a label value: ok, cancelled or an error code; anything else is "other"."""
    return outcome if isinstance(outcome, str) and outcome in _OUTCOMES else "other"


class EdgeDesk:
    """Handles what edges send on the front socket and sends what they get back.

    Args:
        config: the ServerConfig (limits, deadlines, retry hints).
        metrics: request, byte, latency and stage metrics.
        catalog / registry / dispatcher: the broker's other rooms.
        draining: True once the broker is shutting down (new requests get "shutdown").
    """

    def __init__(self, config: ServerConfig, metrics: Metrics, catalog: BundleCatalog, registry: WorkerRegistry,
                 dispatcher: Dispatcher, draining: Callable[[], bool]):
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.catalog, self.registry, self.dispatcher = catalog, registry, dispatcher
        self._draining = draining
        self.sock = None  # the front ROUTER, set when the broker has bound it
        self._outcomes: dict[Any, Any] = {}
        self._stage_children = [metrics.stage.labels(s) for s in STAGES]

    # -- answers ------------------------------------------------------------------------------
    def reply(self, ident: bytes, msg: P.Message) -> None:
        frames = P.encode(msg)
        self.metrics.bytes_out.inc(sum(len(f) for f in frames))
        P.send_frames(self.sock, [ident, *frames], 2)

    def error(self, ident: bytes, rid: str, code: str, message: str, **meta: Any) -> None:
        self.outcome(code).inc()
        self.reply(ident, P.error(rid, code, message, **meta))

    def outcome(self, outcome: Any):
        """The requests counter for one outcome (label children cached: this runs per request)."""
        if not isinstance(outcome, str):
            outcome = "other"
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.metrics.requests.labels(_outcome_label(outcome))
        return child

    def forward_reply(self, req: Request, out: list, stats: Any, now: float) -> None:
        """A worker's answer to `req`: its frames go to the edge as they came; its stats to metrics."""
        nbytes = 0
        for f in out:
            nbytes += len(f)
        P.send_frames(self.sock, [req.ident, *out], 2)
        m = self.metrics
        m.bytes_out.inc(nbytes)
        m.latency.observe(now - req.t0)
        per_bundle = m.bundle(req.bundle)
        per_bundle.latency.observe(now - req.t0)
        try:
            outcome, times, batch = stats[0], stats[1], stats[2]
            if times is not None and not (type(times) is list and all(type(t) is float for t in times)):
                times = None
            batch = batch if type(batch) is int else 0
            reason = stats[3] if len(stats) > 3 else None  # why a worker refused it (REFUSALS)
        except (TypeError, IndexError, KeyError):
            outcome, times, batch, reason = "ok", None, 0, None
        self.outcome(outcome).inc()
        per_bundle.outcome(_outcome_label(outcome)).inc()
        if type(reason) is str and reason in REFUSALS:
            m.refused.labels(reason).inc()
        if times:
            # queue time = broker receipt to the worker starting to decode (both queues)
            for child, ms in zip(self._stage_children, times):
                child.observe(ms / 1e3)
            svc = sum(times[1:]) if outcome == "ok" else 0.0
            if svc > 0:
                self.dispatcher.observe_service(svc)
        if batch:
            m.batch.observe(batch)

    # -- questions ----------------------------------------------------------------------------
    def on_message(self, frames: list) -> None:
        """[ident, header, *payloads] from the front socket."""
        ident = frames[0]
        n = len(frames)
        if n < 2:
            return  # an empty message: nobody to answer
        total = 0
        for f in frames[1:]:
            total += len(f)
        self.metrics.bytes_in.inc(total)
        try:
            h = P.decode_header(frames[1:], self.limits)
        except P.MessageError as exc:
            self.error(ident, exc.request_id or "", exc.code, str(exc))
            return
        rid = h.get("id", "")
        if type(rid) is not str or len(rid) > self.limits.max_name_length:
            self.error(ident, "", "bad_request", "id must be a string")
            return
        kind = h.get("kind")
        if kind == "infer":
            self._on_infer(ident, rid, h, frames, total)
        elif kind == "ping":
            self.reply(ident, P.pong(rid, load=self.dispatcher.load()))
        elif kind == "hello":
            self._on_hello(ident, rid, h)
        elif kind == "session_end":
            self._on_session_end(h, frames)
        elif kind == "cancel":
            if self.dispatcher.cancel(ident, rid):
                self.outcome("cancelled").inc()
        elif kind in _ANSWERS:
            return
        else:
            self.error(ident, rid, "bad_request", f"unknown message kind {str(kind)[:40]!r}")

    def _on_infer(self, ident: bytes, rid: str, h: dict, frames: list, total: int) -> None:
        bundle, cut, dl = h.get("bundle"), h.get("cut"), h.get("deadline_ms")
        if type(bundle) is not str or not bundle or len(bundle) > self.limits.max_name_length:
            self.error(ident, rid, "bad_request", "an infer message needs a bundle id")
            return
        if type(cut) is not int or cut < 0:
            self.error(ident, rid, "bad_request", "an infer message needs an integer cut >= 0")
            return
        if dl is not None and (type(dl) not in _FLOAT or not math.isfinite(dl)):
            self.error(ident, rid, "bad_request", "deadline_ms must be a finite number")
            return
        try:
            session = P.session_fields(h)
        except P.MessageError as exc:
            self.error(ident, rid, "bad_request", str(exc))
            return
        if self._draining():
            self.error(ident, rid, "shutdown", "the server is shutting down",
                       retry_after_ms=self.config.min_retry_after_ms)
            return
        d = self.dispatcher
        if d.in_flight(ident, rid):
            self.error(ident, rid, "bad_request", f"request id {rid!r} is already in flight")
            return
        info = self.catalog.get(bundle)
        if info is None:
            self.error(ident, rid, "unknown_bundle", f"this server holds no bundle {bundle[:64]!r}")
            return
        if cut >= info["segments"]:
            self.error(ident, rid, "bad_cut",
                       f"cut {cut} leaves nothing to run: bundle {info['name']} has cuts 0..{info['segments'] - 1}")
            return
        now = time.monotonic()
        budget = self.config.default_deadline_ms if dl is None else dl
        if budget <= 0:
            self.metrics.bundle(bundle).outcome("deadline").inc()
            self.error(ident, rid, "deadline", "the request's deadline had passed when it arrived")
            return
        if d.over_budget(total):
            self.metrics.bundle(bundle).outcome("busy").inc()
            self.error(ident, rid, "busy", f"the server holds {d.held_bytes} bytes of requests already",
                       retry_after_ms=d.retry_after_ms())
            return
        trace = d.trace.accept(h.get("traceparent")) if d.trace is not None else None
        if not d.submit(ident, rid, bundle, cut, now + budget / 1e3, frames[1:], now, total,
                        session[0] if session else None, trace):
            self.metrics.bundle(bundle).outcome("busy").inc()
            self.error(ident, rid, "busy", f"{len(d.pending)} requests are already waiting",
                       retry_after_ms=d.retry_after_ms())

    def _on_session_end(self, h: dict, frames: list) -> None:
        """Pass a session_end to the worker holding the session (never answered; the worker checks the client)."""
        try:
            fields = P.session_fields(h, "session_end")
        except P.MessageError:
            return
        w = self.dispatcher.sessions.end(fields[0])
        if w is not None:
            now = time.monotonic()
            # a request control frame whose key no request holds: any answer would be dropped
            w.send([W.ctl(W.REQUEST, b"", now, now, now), *frames[1:]], small=2)

    def _on_hello(self, ident: bytes, rid: str, h: dict) -> None:
        bundle = h.get("bundle")
        if type(bundle) is not str:
            self.error(ident, rid, "bad_request", "hello needs a bundle id")
            return
        held = self.catalog.get(bundle) is not None
        if held and not self.registry.has_loaded(bundle):
            self.dispatcher.ask_to_load(bundle)
        self.reply(ident, P.welcome(rid, bundle=bundle, profile=self.catalog.profiles.get(bundle), held=held,
                                    load=self.dispatcher.load()))
