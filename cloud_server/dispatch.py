"""The broker's requests: admission and backpressure, the waiting queue, dispatch to workers, re-dispatch.

The `Dispatcher` owns every request from admission until it is answered (`forget`): exactly
one answer goes out, from a worker's reply or from `fail`. It reaches workers through the
registry and answers edges through the `reply_error(ident, rid, code, message)` it is given.

A bundle served in pipeline stages (cloud_server.placement) goes hop by hop: each stage's
answer is the next hop's request (`hop_done`), which is dispatched like a new one but keeps
its place, its deadline and its edge; a lost stage worker costs only the hop it held.
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from typing import TYPE_CHECKING, Callable

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.metrics import Metrics
from cloud_server.registry import WorkerRecord, WorkerRegistry
from cloud_server.sticky import SessionRoutes

if TYPE_CHECKING:
    from cloud_server.placement import Pipelines

__all__ = ["Request", "Dispatcher"]


class Request:
    """One edge request the broker holds."""

    __slots__ = ("rkey", "ident", "rid", "bundle", "cut", "deadline", "frames", "t0", "worker", "attempts",
                 "nbytes", "session", "trace", "at", "hop")

    def __init__(self, rkey, ident, rid, bundle, cut, deadline, frames, t0, nbytes, session=None, trace=None):
        self.rkey = rkey
        self.ident = ident
        self.rid = rid
        self.bundle = bundle
        self.cut = cut
        self.deadline = deadline  # broker monotonic seconds
        self.frames = frames  # the edge's frames, header first: forwarded as they came
        self.t0 = t0
        self.worker: WorkerRecord | None = None
        self.attempts = 0
        self.nbytes = nbytes
        self.session = session  # a stateful session's id: sticky to the worker holding it
        self.trace = trace  # the edge's traceparent when the broker traces (cloud_server.traces)
        self.at = cut  # where its next hop starts: the cut, then each stage's end (pipeline stages)
        self.hop = None  # the cloud_server.placement.Stage computing its hop now


class Dispatcher:
    """Admission, the bounded queue, dispatch and re-dispatch.

    Args:
        config: the ServerConfig (queue and byte bounds, attempts, deadlines).
        registry: the workers to dispatch to.
        metrics: re-dispatches are counted here.
        reply_error: answers an edge with an error (ident, rid, code, message, **meta).
    """

    def __init__(self, config: ServerConfig, registry: WorkerRegistry, metrics: Metrics,
                 reply_error: Callable[..., None]):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.trace = None  # a cloud_server.traces.BrokerTrace when ServerConfig.tracing
        self.reply_error = reply_error
        self.reqs: dict[bytes, Request] = {}  # every request not yet answered, by rkey
        self.by_client: dict[tuple[bytes, str], Request] = {}
        self.pending: deque[Request] = deque()
        self.held_bytes = 0  # payload bytes of every request not yet answered
        self.svc_ms = 0.0  # EWMA of a request's time in a worker, for est_wait_ms
        self._keys = itertools.count(1)
        self.sessions = SessionRoutes(config, registry, metrics)
        self.pipelines: Pipelines | None = None  # staged bundles (the broker sets it)

    # -- admission ----------------------------------------------------------------------------
    def in_flight(self, ident: bytes, rid: str) -> bool:
        return (ident, rid) in self.by_client

    def over_budget(self, nbytes: int) -> bool:
        """Holding `nbytes` more would pass max_held_bytes."""
        return self.held_bytes + nbytes > self.config.max_held_bytes

    def submit(self, ident: bytes, rid: str, bundle: str, cut: int, deadline: float, frames: list, now: float,
               nbytes: int, session: str | None = None, trace: str | None = None) -> bool:
        """Take a request: dispatch it, or queue it; False when the queue is full (nothing kept)."""
        req = Request(struct.pack("<Q", next(self._keys)), ident, rid, bundle, cut, deadline, frames, now, nbytes,
                      session, trace)
        self.reqs[req.rkey] = req
        self.by_client[(ident, rid)] = req
        self.held_bytes += nbytes
        if self.pending or not self.dispatch(req, now):
            if len(self.pending) >= self.config.max_pending:
                self.forget(req)
                return False
            self.pending.append(req)
            if not self.registry.serves(bundle):
                self.ask_to_load(bundle)
            self.dispatch_pending(now)
        return True

    def cancel(self, ident: bytes, rid: str) -> bool:
        """Drop a request still waiting here (never computed, never answered); True when it was."""
        req = self.by_client.get((ident, rid))
        if req is None or req.worker is not None:
            return False
        try:
            self.pending.remove(req)
        except ValueError:
            return False
        self.forget(req)
        return True

    # -- dispatch -----------------------------------------------------------------------------
    def dispatch(self, req: Request, now: float) -> bool:
        if req.session is not None:
            w = self.sessions.holder(req.session)
            if w is not None and not w.has_room:
                return False  # its state is there: wait for room rather than start over elsewhere
            if w is None:
                w = self.registry.pick(req.bundle)
                if w is None:
                    return False
            self.sessions.bind(req.session, w, now)
        else:
            plan = self.pipelines.plan(req.bundle) if self.pipelines is not None else None
            if plan is not None:
                return self._dispatch_hop(req, plan, now)
            w = self.registry.pick(req.bundle)
        if w is None:
            return False
        self._send(req, w, now)
        return True

    def _send(self, req: Request, w: WorkerRecord, now: float, hop=None) -> None:
        """Hand `req` to `w` (only the hop of stage `hop`, a cloud_server.placement.Stage, when given)."""
        # the worker maps broker times onto its own clock (see _wire.ClockMap): time a request
        # spends in the worker's socket buffer counts against its deadline too
        fields = [req.rkey, req.deadline, req.t0, now]
        if req.trace is not None or hop is not None:
            # the broker's queue span is the parent of the worker's spans
            fields.append(self.trace.queued(req.trace, req.bundle, req.t0, now) if req.trace is not None else None)
        if hop is not None:
            fields.append(hop.stop)
        w.send([W.ctl(W.REQUEST, *fields), *req.frames], small=2)
        req.worker, req.hop = w, hop
        req.attempts += 1
        w.inflight[req.rkey] = req

    def _dispatch_hop(self, req: Request, plan, now: float) -> bool:
        """Send the request's next hop to the least-loaded ready worker of the stage holding segment req.at."""
        st = plan.stage_at(req.at)
        if st is None:
            return False
        w = min((w for w in st.ready(req.bundle) if w.has_room), key=lambda w: len(w.inflight), default=None)
        if w is None:
            return False
        self._send(req, w, now, st)
        return True

    def hop_done(self, w: WorkerRecord, rkey, frames: list, passed_on: bool, now: float) -> None:
        """A stage's answer that is not for the edge: the next hop's request (`passed_on`), or "this
        worker does not hold the stage" (the hop goes to another worker). A stale key is dropped."""
        req = w.inflight.pop(rkey, None) if type(rkey) is bytes else None
        if req is None or req.rkey not in self.reqs:
            return
        st, req.worker, req.hop = req.hop, None, None
        if passed_on and st is not None:
            nbytes = 0
            for f in frames:
                nbytes += len(f)
            self.held_bytes += nbytes - req.nbytes
            req.frames, req.nbytes, req.at, req.attempts = frames, nbytes, st.stop, 0
            self.pipelines.hop(req.bundle, st)
        else:
            if self.pipelines is not None:
                self.pipelines.not_held(w, req.bundle)
            if req.attempts >= self.config.max_attempts:
                self.fail(req, "worker_lost", f"no worker of the stage holding segment {req.at} took the request")
                return
        if self.pending or not self.dispatch(req, now):
            self.pending.appendleft(req)  # it was in service: it goes first

    def dispatch_pending(self, now: float) -> None:
        if not self.pending:
            return
        keep: deque[Request] = deque()
        pending = self.pending
        while pending:
            req = pending.popleft()
            if now >= req.deadline:
                why = self.pipelines.why_not.get(req.bundle) if self.pipelines is not None else None
                self.fail(req, "deadline", "the deadline passed while the request waited for a worker"
                          + (f" (its bundle cannot be placed in pipeline stages: {why})" if why else ""))
            elif not self.dispatch(req, now):
                keep.append(req)
                if not self.registry.any_room():
                    break  # every worker is full: the rest waits too
        keep.extend(pending)
        self.pending = keep

    def expire_pending(self, now: float) -> None:
        if any(now >= r.deadline for r in self.pending):
            self.dispatch_pending(now)

    def ask_to_load(self, bundle: str) -> None:
        """Have the least-loaded worker load (or look for) `bundle` before requests need it
        (a staged bundle: place its stages)."""
        if self.pipelines is not None and self.pipelines.plan(bundle) is not None:
            return
        live = self.registry.live()
        if not live:
            return
        having = [w for w in live if bundle in w.available] or live
        w = min(having, key=lambda w: len(w.inflight))
        w.send([W.ctl(W.LOAD, bundle)])

    def requeue(self, orphans: list[Request]) -> None:
        """The requests of a lost worker go first in line again (or fail after max_attempts)."""
        for req in orphans:
            req.worker = req.hop = None
            if req.attempts >= self.config.max_attempts:
                self.fail(req, "worker_lost", f"{req.attempts} workers were lost while computing this request")
            else:
                self.metrics.redispatched.inc()
                self.pending.appendleft(req)
        self.pending = deque(sorted(self.pending, key=lambda r: r.t0))

    # -- answers ------------------------------------------------------------------------------
    def replied(self, w: WorkerRecord, rkey) -> Request | None:
        """The request a worker's reply answers, now forgotten; None when answered already."""
        req = w.inflight.pop(rkey, None) if type(rkey) is bytes else None
        if req is not None:
            if req.hop is not None:  # the last stage of a pipeline answered
                self.pipelines.hop(req.bundle, req.hop)
            self.forget(req)
        return req

    def observe_service(self, svc_ms: float) -> None:
        self.svc_ms = svc_ms if self.svc_ms == 0 else self.svc_ms + 0.1 * (svc_ms - self.svc_ms)

    def forget(self, req: Request) -> None:
        if self.reqs.pop(req.rkey, None) is not None:
            self.held_bytes -= req.nbytes
        if self.by_client.get((req.ident, req.rid)) is req:
            del self.by_client[(req.ident, req.rid)]

    def fail(self, req: Request, code: str, message: str) -> None:
        """Answer `req` with an error and forget it."""
        self.forget(req)
        if req.worker is not None:
            req.worker.inflight.pop(req.rkey, None)
        self.metrics.bundle(req.bundle).outcome(code).inc()
        self.reply_error(req.ident, req.rid, code, message)

    def fail_overdue(self, now: float) -> None:
        """Answer "deadline" for requests a worker holds long past their deadline (alive but stuck)."""
        grace = self.config.deadline_grace_ms / 1e3
        for req in [r for r in self.reqs.values() if r.worker is not None and now > r.deadline + grace]:
            self.fail(req, "deadline", "no answer from the worker within the deadline")

    def fail_all(self, code: str, message: str) -> None:
        for req in list(self.reqs.values()):
            self.fail(req, code, message)
        self.pending.clear()

    # -- load ---------------------------------------------------------------------------------
    def retry_after_ms(self) -> float:
        return max(self.config.min_retry_after_ms, self.est_wait_ms())

    def est_wait_ms(self) -> float:
        live = len(self.registry.live()) or 1
        return len(self.pending) * self.svc_ms / live

    def load(self) -> dict:
        return {"workers": len(self.registry.live()), "queued": len(self.pending),
                "inflight": len(self.reqs) - len(self.pending), "est_wait_ms": round(self.est_wait_ms(), 3)}
