"""The broker: edges talk to its front ROUTER, tail workers to its back ROUTER (Paranoid Pirate).

The broker parses only the small msgpack header of an edge's message; the tensor frames are
forwarded to a worker, and the worker's reply frames back to the edge, as the same ZeroMQ
messages (no copy, no re-encoding). It owns every request until exactly one reply went out:

- a request goes to the least-loaded live worker that holds its bundle (a worker that only
  has the bundle on disk loads it on demand); when every worker is at capacity it waits in a
  bounded queue, and when that is full the edge gets "busy" with a retry_after_ms hint;
- a worker silent for `heartbeat_liveness` heartbeats is dropped and its requests are sent
  to another worker (at most `max_attempts` dispatches, then "worker_lost");
- a request past its deadline is answered "deadline" instead of being computed;
- anything malformed from an edge is answered with an error (or dropped); it never stops the loop.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import struct
import threading
import time
import uuid
from collections import deque
from typing import Any

import msgpack
import zmq

from edgesplit import protocol as P
from edgesplit.errors import ConfigError

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.metrics import STAGES, Metrics
from cloud_server.repository import Repository, bundle_summary

__all__ = ["Broker"]

log = logging.getLogger(__name__)

_FLOAT = (int, float)
_RECV_BATCH = 64  # messages taken from one socket before looking at the other
_EVENTS, _POLLIN = zmq.EVENTS, zmq.POLLIN
_ZAP_DOMAIN = "edgesplit"  # the ZeroMQ authentication domain of the edge-facing socket


class _Request:
    __slots__ = ("rkey", "ident", "rid", "bundle", "cut", "deadline", "frames", "t0", "worker", "attempts",
                 "nbytes")

    def __init__(self, rkey, ident, rid, bundle, cut, deadline, frames, t0, nbytes):
        self.rkey = rkey
        self.ident = ident
        self.rid = rid
        self.bundle = bundle
        self.cut = cut
        self.deadline = deadline  # broker monotonic seconds
        self.frames = frames  # the edge's frames, header first: forwarded as they came
        self.t0 = t0
        self.worker = None
        self.attempts = 0
        self.nbytes = nbytes


class _Worker:
    __slots__ = ("ident", "name", "device", "runner", "pid", "capacity", "available", "loaded", "inflight",
                 "expiry", "draining", "queued", "joined", "host", "sock")

    def __init__(self, ident: bytes, info: dict, capacity: int, now: float, expiry_s: float):
        self.ident = ident
        self.name = str(info.get("name") or ident.hex())[:128]
        self.device = str(info.get("device") or "?")[:64]
        self.runner = str(info.get("runner") or "?")[:64]
        self.host = str(info.get("host") or "?")[:128]
        self.pid = info.get("pid")
        cap = info.get("capacity")
        self.capacity = cap if isinstance(cap, int) and 0 < cap <= 4096 else capacity
        self.available: set[str] = set()
        self.loaded: set[str] = set()
        self.inflight: dict[bytes, _Request] = {}
        self.expiry = now + expiry_s
        self.draining = False
        self.queued = 0
        self.joined = time.time()
        self.sock = None  # the broker socket this worker talks on (local or remote)


class _InlineSocket:
    """The inline worker's end of the conversation: what the broker sends it lands in a deque."""

    __slots__ = ("inbox",)

    def __init__(self, inbox: deque):
        self.inbox = inbox

    def send_multipart(self, frames: list, flags: int = 0, copy: bool = True, track: bool = False) -> None:
        self.inbox.append(frames[1:])  # [identity, ctl, *frames] -> [ctl, *frames]


def _no_receive(timeout_s: float) -> None:
    return None


def _is_loopback(address: str) -> bool:
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


class Broker:
    """Routes edge requests to tail workers.

    Args:
        config: the ServerConfig.
        front: address edges connect to (e.g. "tcp://127.0.0.1:5555"; port 0 picks a free one).
        back: address workers connect to (default: a free loopback port).
        repository: the bundle directory, so the broker knows bundles before a worker announces them.
        remote_back: a second worker address for workers on other hosts (e.g. "tcp://10.0.0.5:5556");
            with `curve_secret` it uses CURVE and admits only the keys in `allow_workers`.
        curve_secret: a zmq.auth certificate file holding the server's secret key: CURVE on the front.
        allow_clients: directory of allowed client public keys (`*.key`); None admits any client
            that knows the server key.
        allow_workers: directory of allowed worker public keys, for `remote_back` (a device key
            never admits a worker: workers see every device's activations).
        metrics: a Metrics (default: prometheus metrics when prometheus-client is installed).
        context: the zmq.Context to use.
    """

    def __init__(self, config: ServerConfig = ServerConfig(), front: str = "tcp://127.0.0.1:5555",
                 back: str = "tcp://127.0.0.1:0", repository: str | os.PathLike | None = None,
                 curve_secret: str | os.PathLike | None = None, allow_clients: str | os.PathLike | None = None,
                 metrics: Metrics | None = None, context: zmq.Context | None = None,
                 remote_back: str | None = None, allow_workers: str | os.PathLike | None = None):
        self.config = config
        self.limits = config.limits
        self.ctx = context or zmq.Context.instance()
        self.repository = Repository(repository, verify=False) if repository is not None else None
        self.metrics = metrics if metrics is not None else _default_metrics()
        self._front_addr, self._back_addr = front, back
        self._curve_secret, self._allow_clients = curve_secret, allow_clients
        self._remote_addr, self._allow_workers = remote_back, allow_workers
        self.front: zmq.Socket | None = None
        self.back: zmq.Socket | None = None
        self.remote: zmq.Socket | None = None
        self.front_address = self.back_address = self.remote_address = None
        self._auth = None

        self._workers: dict[bytes, _Worker] = {}
        self._reqs: dict[bytes, _Request] = {}  # every request not yet answered, by rkey
        self._by_client: dict[tuple[bytes, str], _Request] = {}
        self._pending: deque[_Request] = deque()
        self._bundles: dict[str, dict] = {}  # id -> summary (repository or a worker's announcement)
        self._profiles: dict[str, dict] = {}  # id -> {"segment_ms": [...], "device": str}
        self._keys = itertools.count(1)
        self._last_scan = -math.inf
        self._held_bytes = 0  # payload bytes of every request not yet answered
        self._outcomes: dict[Any, Any] = {}
        self._stage_children = [self.metrics.stage.labels(s) for s in STAGES]
        self._lost: list[dict] = []  # the last workers dropped for silence (for /v1/models)
        self._svc_ms = 0.0  # EWMA of a request's time in a worker, for est_wait_ms
        self._lock = threading.Lock()
        self._snapshot: dict = {}
        self._shutdown_at: float | None = None
        self._abort = False
        self._draining = False
        self._stopping_since: float | None = None
        self._stopped = threading.Event()
        self._bound = threading.Event()
        self._inproc_address: str | None = None  # set by add_inproc_endpoint
        self._thread: threading.Thread | None = None
        self.exit_reason = ""
        # a tail worker run by this broker's own thread (Server worker_mode "inline")
        self._inline = None
        self._inline_in: deque[list] = deque()  # what the broker sent it: [ctl, *frames]
        self._inline_out: deque[list] = deque()  # what it answered: [ctl, *frames]
        self._inline_sock = _InlineSocket(self._inline_in)
        self._inline_ident = b""
        self._inline_beat_at = -math.inf
        self._inline_version = -1
        self._inline_gone = False

    # -- life cycle ---------------------------------------------------------------------------
    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns (front address, back address) with real port numbers."""
        if self.front is not None:
            return self.front_address, self.back_address
        if self.repository is not None:
            self._rescan(force=True)
        front = self.ctx.socket(zmq.ROUTER)
        back = self.ctx.socket(zmq.ROUTER)
        remote = self.ctx.socket(zmq.ROUTER) if self._remote_addr else None
        socks = [s for s in (front, back, remote) if s is not None]
        for s in socks:
            s.linger = 0
            s.router_mandatory = False
            s.sndhwm = s.rcvhwm = 10_000
        try:
            if self._curve_secret:
                _setup_curve(self, front, self._allow_clients, _ZAP_DOMAIN)
                if remote is not None:
                    if self._allow_workers is None:
                        raise ConfigError("a CURVE server with a remote worker address needs --allow-workers "
                                          "(the public keys of the workers allowed in)")
                    _setup_curve(self, remote, self._allow_workers, _ZAP_DOMAIN + "-workers")
            else:
                for addr, what in ((self._front_addr, "edges"), (self._remote_addr, "workers")):
                    if addr and not _is_loopback(addr):
                        log.warning("binding %s for %s without CURVE: anyone who reaches this address can "
                                    "use (or impersonate) the server (pass --curve-secret and --allow-clients"
                                    "%s)", addr, what, " / --allow-workers" if what == "workers" else "")
            front.bind(_zmq_address(self._front_addr))
            back.bind(_zmq_address(self._back_addr))
            if remote is not None:
                remote.bind(_zmq_address(self._remote_addr))
        except (zmq.ZMQError, ConfigError) as exc:
            for s in socks:
                s.close()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot bind {self._front_addr} / {self._back_addr}: {exc}") from None
        self.front, self.back, self.remote = front, back, remote
        self.front_address = _public(front.last_endpoint.decode())
        self.back_address = _public(back.last_endpoint.decode())
        if remote is not None:
            self.remote_address = _public(remote.last_endpoint.decode())
        self._update_snapshot(time.monotonic())
        self._bound.set()
        return self.front_address, self.back_address

    def add_inproc_endpoint(self) -> str:
        """Also listen for workers on an inproc:// address (threads of this process, same context).

        A request then reaches its worker by pointer: the payload lands once in this process.
        """
        self.bind()
        if self._inproc_address is None:
            # A fresh name each time: id(self) can be reused by a later broker in this process
            # while the old one's inproc endpoint is still being torn down.
            self._inproc_address = f"inproc://edgesplit-broker-{uuid.uuid4().hex}"
            self.back.bind(self._inproc_address)
        return self._inproc_address

    def add_inline_worker(self, worker) -> None:
        """Run `worker` (a TailWorker, not started) in this broker's own thread.

        A request is then decoded, computed and answered in the wake-up that received it: no
        hand-off to another thread or process (the lowest overhead), but the broker reads
        nothing else while a batch computes. For short tails on one host. Call before start().
        """
        if self._inline is not None:
            raise ConfigError("a broker runs at most one inline worker")
        if self._remote_addr:
            # while a batch computes nobody reads their heartbeats or sends them ours
            raise ConfigError("an inline worker serves alone: use thread or process workers with remote workers")
        self._inline = worker

    def start(self) -> "Broker":
        """Bind and run the loop in a background thread."""
        self.bind()
        self._thread = threading.Thread(target=self.run, name="edgesplit-broker", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop taking requests, finish those in flight, stop the workers, then return from run().

        Safe to call from any thread or a signal handler.
        """
        if self._shutdown_at is None:
            self._shutdown_at = time.monotonic()

    def abort(self) -> None:
        """Stop at once: no draining, no goodbyes (workers find out from the silence)."""
        self._abort = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end; True when it did."""
        return self._stopped.wait(timeout)

    def close(self) -> None:
        self.shutdown()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.config.drain_timeout_s + 10)
        for s in (self.front, self.back, self.remote):
            if s is not None and not s.closed:
                s.close(0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until shutdown() and the drain are done."""
        self.bind()
        front, back, remote = self.front, self.back, self.remote
        poller = zmq.Poller()
        handlers = {front: self._on_front, back: lambda f: self._on_back(f, back)}
        if remote is not None:
            handlers[remote] = lambda f: self._on_back(f, remote)
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        cfg = self.config
        try:
            if self._inline is not None:
                self._start_inline()
            next_tick = next_expiry_check = time.monotonic()
            while True:
                now = time.monotonic()
                wait = max(0.0, min(next_tick - now, next_expiry_check - now, 0.05))
                if self._pending:
                    wait = min(wait, 0.002)
                events = poller.poll(math.ceil(wait * 1e3))  # whole ms: a fraction would spin
                for sock, _ in events:
                    handler = handlers[sock]
                    for _ in range(_RECV_BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            handler(frames)
                        except Exception:  # a bug must not stop the pool; the request is logged
                            log.exception("broker: failed to handle a message")
                        # Asking the socket is cheaper than a recv that raises Again (and it
                        # keeps the GIL, which the thread workers of this process want now).
                        if not sock.get(_EVENTS) & _POLLIN:
                            break
                if self._inline is not None:
                    try:
                        self._run_inline()
                    except Exception:  # same as a handler: log the bug, keep serving
                        log.exception("broker: the inline worker failed")
                now = time.monotonic()
                try:
                    if self._pending:
                        self._expire_pending(now)
                    if now >= next_expiry_check:
                        next_expiry_check = now + cfg.heartbeat_interval_s / 8
                        self._expire_workers(now)
                    if now >= next_tick:
                        next_tick = now + cfg.heartbeat_interval_s
                        self._tick(now)
                    if self._abort or (self._shutdown_at is not None and self._drain_step(now)):
                        break
                except Exception:  # same: log the bug, keep serving
                    log.exception("broker: housekeeping failed")
        finally:
            if self._inline is not None:
                for b in self._inline._loaded.values():
                    b.close()
            self._update_snapshot(time.monotonic(), stopped=True)
            self._stopped.set()

    # -- edges --------------------------------------------------------------------------------
    def _reply(self, ident: bytes, msg: P.Message) -> None:
        frames = P.encode(msg)
        self.metrics.bytes_out.inc(sum(len(f) for f in frames))
        self.front.send_multipart([ident, *frames], copy=False)

    def _outcome(self, outcome: Any):
        """The requests counter for one outcome (label children cached: this runs per request)."""
        if not isinstance(outcome, str):
            outcome = "other"
        child = self._outcomes.get(outcome)
        if child is None:
            key = outcome if isinstance(outcome, str) and outcome in P.ERROR_CODES | {"ok", "cancelled"} else "other"
            child = self._outcomes[outcome] = self.metrics.requests.labels(key)
        return child

    def _error(self, ident: bytes, rid: str, code: str, message: str, **meta: Any) -> None:
        self._outcome(code).inc()
        self._reply(ident, P.error(rid, code, message, **meta))

    def _on_front(self, frames: list) -> None:
        ident = frames[0].bytes
        n = len(frames)
        if n < 2:
            return  # an empty message: nobody to answer
        lim = self.limits
        total = 0
        for f in frames[1:]:
            total += len(f)
        self.metrics.bytes_in.inc(total)
        head = frames[1]
        hlen = len(head)
        if n - 2 > lim.max_tensors or total > lim.max_message_bytes or hlen > lim.max_header_bytes or hlen == 0:
            self._error(ident, "", "bad_request",
                        f"message of {n - 1} frames / {total} bytes (header {hlen}) is over the limits or empty")
            return
        try:
            h = msgpack.unpackb(head.buffer, raw=False, strict_map_key=True, max_str_len=lim.max_header_bytes,
                                max_bin_len=lim.max_header_bytes, max_array_len=lim.max_items,
                                max_map_len=lim.max_items, max_ext_len=0)
        except Exception:  # msgpack raises a zoo of types; any of them means garbage
            self._error(ident, "", "bad_request", "header is not valid msgpack")
            return
        if type(h) is not dict:
            self._error(ident, "", "bad_request", "header must be a msgpack map")
            return
        rid = h.get("id", "")
        if type(rid) is not str or len(rid) > lim.max_name_length:
            self._error(ident, "", "bad_request", "id must be a string")
            return
        v = h.get("v")
        if v != P.VERSION or type(v) is not int:
            self._error(ident, rid, "version" if type(v) is int else "bad_request",
                        f"protocol version {v!r} is not supported: this server speaks version {P.VERSION}")
            return
        kind = h.get("kind")
        if kind == "infer":
            self._on_infer(ident, rid, h, frames, total)
        elif kind == "ping":
            self._reply(ident, P.pong(rid, load=self._load()))
        elif kind == "hello":
            self._on_hello(ident, rid, h)
        elif kind == "cancel":
            self._on_cancel(ident, rid)
        elif kind in ("result", "error", "pong", "welcome"):
            return  # answers are not questions: never reply to them (no ping-pong storms)
        else:
            self._error(ident, rid, "bad_request", f"unknown message kind {str(kind)[:40]!r}")

    def _on_infer(self, ident: bytes, rid: str, h: dict, frames: list, total: int) -> None:
        bundle, cut, dl = h.get("bundle"), h.get("cut"), h.get("deadline_ms")
        if type(bundle) is not str or not bundle or len(bundle) > self.limits.max_name_length:
            self._error(ident, rid, "bad_request", "an infer message needs a bundle id")
            return
        if type(cut) is not int or cut < 0:
            self._error(ident, rid, "bad_request", "an infer message needs an integer cut >= 0")
            return
        if dl is not None and (type(dl) not in _FLOAT or not math.isfinite(dl)):
            self._error(ident, rid, "bad_request", "deadline_ms must be a finite number")
            return
        if self._draining:
            self._error(ident, rid, "shutdown", "the server is shutting down",
                        retry_after_ms=self.config.min_retry_after_ms)
            return
        key = (ident, rid)
        if key in self._by_client:
            self._error(ident, rid, "bad_request", f"request id {rid!r} is already in flight")
            return
        info = self._bundles.get(bundle)
        if info is None and self._rescan():
            info = self._bundles.get(bundle)
        if info is None:
            self._error(ident, rid, "unknown_bundle", f"this server holds no bundle {bundle[:64]!r}")
            return
        if cut >= info["segments"]:
            self._error(ident, rid, "bad_cut",
                        f"cut {cut} leaves nothing to run: bundle {info['name']} has cuts 0..{info['segments'] - 1}")
            return
        now = time.monotonic()
        budget = self.config.default_deadline_ms if dl is None else dl
        if budget <= 0:
            self._error(ident, rid, "deadline", "the request's deadline had passed when it arrived")
            return
        if self._held_bytes + total > self.config.max_held_bytes:
            self._error(ident, rid, "busy", f"the server holds {self._held_bytes} bytes of requests already",
                        retry_after_ms=self._retry_after_ms())
            return
        rkey = struct.pack("<Q", next(self._keys))
        req = _Request(rkey, ident, rid, bundle, cut, now + budget / 1e3, frames[1:], now, total)
        self._reqs[rkey] = req
        self._by_client[key] = req
        self._held_bytes += total
        if self._pending or not self._dispatch(req, now):
            if len(self._pending) >= self.config.max_pending:
                self._forget(req)
                self._error(ident, rid, "busy", f"{len(self._pending)} requests are already waiting",
                            retry_after_ms=self._retry_after_ms())
                return
            self._pending.append(req)
            if not any(bundle in w.available for w in self._workers.values()):
                self._ask_to_load(bundle)
            self._dispatch_pending(now)

    def _on_hello(self, ident: bytes, rid: str, h: dict) -> None:
        bundle = h.get("bundle")
        if type(bundle) is not str:
            self._error(ident, rid, "bad_request", "hello needs a bundle id")
            return
        held = bundle in self._bundles or (self._rescan() and bundle in self._bundles)
        if held and not any(bundle in w.loaded for w in self._workers.values()):
            self._ask_to_load(bundle)
        self._reply(ident, P.welcome(rid, bundle=bundle, held=held, profile=self._profiles.get(bundle),
                                     load=self._load()))

    def _on_cancel(self, ident: bytes, rid: str) -> None:
        req = self._by_client.get((ident, rid))
        if req is not None and req.worker is None:  # still waiting here: never computed, never answered
            try:
                self._pending.remove(req)
            except ValueError:
                return
            self._forget(req)
            self._outcome("cancelled").inc()

    # -- dispatch -----------------------------------------------------------------------------
    def _pick(self, bundle: str) -> _Worker | None:
        best, best_key = None, None
        for w in self._workers.values():
            if w.draining or bundle not in w.available:
                continue
            load = len(w.inflight)
            if load >= w.capacity:
                continue
            key = (load, bundle not in w.loaded)
            if best_key is None or key < best_key:
                best, best_key = w, key
        return best

    def _dispatch(self, req: _Request, now: float) -> bool:
        w = self._pick(req.bundle)
        if w is None:
            return False
        # the worker maps broker times onto its own clock (see _wire.ClockMap): time a request
        # spends in the worker's socket buffer counts against its deadline too
        w.sock.send_multipart([w.ident, W.ctl(W.REQUEST, req.rkey, req.deadline, req.t0, now), *req.frames],
                              copy=False)
        req.worker = w
        req.attempts += 1
        w.inflight[req.rkey] = req
        return True

    def _dispatch_pending(self, now: float) -> None:
        if not self._pending:
            return
        keep: deque[_Request] = deque()
        pending = self._pending
        while pending:
            req = pending.popleft()
            if now >= req.deadline:
                self._answer_error(req, "deadline", "the deadline passed while the request waited for a worker")
            elif not self._dispatch(req, now):
                keep.append(req)
                if not any(len(w.inflight) < w.capacity and not w.draining for w in self._workers.values()):
                    break  # every worker is full: the rest waits too
        keep.extend(pending)
        self._pending = keep

    def _expire_pending(self, now: float) -> None:
        if any(now >= r.deadline for r in self._pending):
            self._dispatch_pending(now)

    def _forget(self, req: _Request) -> None:
        if self._reqs.pop(req.rkey, None) is not None:
            self._held_bytes -= req.nbytes
        if self._by_client.get((req.ident, req.rid)) is req:
            del self._by_client[(req.ident, req.rid)]

    def _answer_error(self, req: _Request, code: str, message: str) -> None:
        self._forget(req)
        if req.worker is not None:
            req.worker.inflight.pop(req.rkey, None)
        self._error(req.ident, req.rid, code, message)

    def _retry_after_ms(self) -> float:
        return max(self.config.min_retry_after_ms, self._est_wait_ms())

    def _est_wait_ms(self) -> float:
        live = sum(1 for w in self._workers.values() if not w.draining) or 1
        return len(self._pending) * self._svc_ms / live

    def _load(self) -> dict:
        return {"workers": sum(1 for w in self._workers.values() if not w.draining),
                "queued": len(self._pending), "inflight": len(self._reqs) - len(self._pending),
                "est_wait_ms": round(self._est_wait_ms(), 3)}

    def _ask_to_load(self, bundle: str) -> None:
        """Have the least-loaded worker load (or look for) `bundle` before requests need it."""
        live = [w for w in self._workers.values() if not w.draining]
        if not live:
            return
        having = [w for w in live if bundle in w.available] or live
        w = min(having, key=lambda w: len(w.inflight))
        w.sock.send_multipart([w.ident, W.ctl(W.LOAD, bundle)])

    # -- the inline worker ----------------------------------------------------------------------
    # It speaks the same conversation as any worker (_wire: ready, hb, req, reply, bye), only
    # through two deques instead of a socket, so dispatch, exactly-once replies, deadlines and
    # metrics are the same code as for the others.
    def _start_inline(self) -> None:
        w = self._inline
        w._send = self._inline_out.append  # its replies come back to _on_back below
        w._receive = _no_receive  # requests are handed over, never received
        w.CROWD_MEMORY_S = 0.0  # never wait for batch-mates: this thread is the only one
        w._scan()
        self._inline_ident = f"inline:{w.name}".encode()[:255]
        self._inline_back([W.ctl(W.READY, w._status(full=True))])
        if w.config.preload:
            for bid in w.repository.ids():
                w._load_bundle(bid)
        self._inline_beat(time.monotonic())

    def _inline_back(self, frames: list) -> None:
        self._on_back([zmq.Frame(self._inline_ident), *frames], self._inline_sock)

    def _inline_beat(self, now: float) -> None:
        w = self._inline
        if self._inline_gone:
            return
        if w._stop_at is not None and not any(j.load is None for j in w._queue):
            self._inline_gone = True
            self._inline_back([W.ctl(W.BYE)])
            return
        if w._version != self._inline_version or now - self._inline_beat_at >= self.config.heartbeat_interval_s / 2:
            self._inline_version, self._inline_beat_at = w._version, now
            self._inline_back([W.ctl(W.HEARTBEAT, w._status())])

    def _run_inline(self) -> None:
        """Hand the inline worker what the broker sent it, run its queue, deliver its replies."""
        w, inbox, out = self._inline, self._inline_in, self._inline_out
        while inbox or w._queue or out:
            while inbox:
                w._on_broker(inbox.popleft())
            if w._queue:
                batch = w._take_batch()
                if batch:
                    w._run_batch(batch)
            while out:
                self._inline_back(out.popleft())
        self._inline_beat(time.monotonic())

    # -- workers ------------------------------------------------------------------------------
    def _on_back(self, frames: list, sock: zmq.Socket) -> None:
        c = W.parse(frames[1]) if len(frames) >= 2 else None
        if c is None:
            return
        ident = frames[0].bytes
        cmd = c[0]
        now = time.monotonic()
        w = self._workers.get(ident)
        if cmd == W.REPLY and w is not None and len(c) >= 3:
            w.expiry = now + self.config.heartbeat_expiry_s
            self._on_reply(w, c[1], c[2], frames[2:], now)
            return
        if cmd == W.READY:
            info = c[1] if len(c) > 1 and isinstance(c[1], dict) else {}
            if w is not None:
                self._drop(w, "announced itself again")
            self._add_worker(ident, info, now, sock)
            return
        if w is None:
            if cmd != W.BYE:
                sock.send_multipart([ident, W.ctl(W.RECONNECT)])
            return
        w.expiry = now + self.config.heartbeat_expiry_s
        if cmd == W.HEARTBEAT:
            if len(c) > 1 and isinstance(c[1], dict):
                before = (w.loaded, w.available, w.draining)
                self._apply_status(w, c[1])
                if (w.loaded, w.available, w.draining) != before:
                    self._update_snapshot(now)
                self._dispatch_pending(now)
        elif cmd == W.DRAINING:
            w.draining = True
        elif cmd == W.BYE:
            self._drop(w, "said goodbye", lost=False)

    def _on_reply(self, w: _Worker, rkey: Any, stats: Any, out: list, now: float) -> None:
        req = w.inflight.pop(rkey, None) if type(rkey) is bytes else None
        if req is None:
            return  # answered already (re-dispatched after a presumed loss, or timed out): drop
        self._forget(req)
        nbytes = 0
        for f in out:
            nbytes += len(f)
        self.front.send_multipart([req.ident, *out], copy=False)
        m = self.metrics
        m.bytes_out.inc(nbytes)
        m.latency.observe(now - req.t0)
        try:
            outcome, times, batch = stats[0], stats[1], stats[2]
            if times is not None and not (type(times) is list and all(type(t) is float for t in times)):
                times = None
            batch = batch if type(batch) is int else 0
        except (TypeError, IndexError, KeyError):
            outcome, times, batch = "ok", None, 0
        self._outcome(outcome).inc()
        if times:
            # queue time = broker receipt to the worker starting to decode (both queues)
            for child, ms in zip(self._stage_children, times):
                child.observe(ms / 1e3)
            svc = sum(times[1:]) if outcome == "ok" else 0.0
            if svc > 0:
                self._svc_ms = svc if self._svc_ms == 0 else self._svc_ms + 0.1 * (svc - self._svc_ms)
        if batch:
            m.batch.observe(batch)
        if self._pending:
            self._dispatch_pending(now)

    def _add_worker(self, ident: bytes, info: dict, now: float, sock: zmq.Socket) -> None:
        w = _Worker(ident, info, self.config.worker_capacity, now, self.config.heartbeat_expiry_s)
        w.sock = sock
        with self._lock:
            self._workers[ident] = w
        self._apply_status(w, info)
        self.metrics.worker_up.labels(w.name, w.device).set(1)
        log.info("worker %s joined (%s, %s, pid %s, %d bundles)", w.name, w.device, w.runner, w.pid,
                 len(w.available))
        self._update_snapshot(now)
        self._dispatch_pending(now)

    def _apply_status(self, w: _Worker, status: dict) -> None:
        avail = status.get("available")
        if isinstance(avail, list):
            ids = set()
            for s in avail:
                if isinstance(s, dict) and isinstance(s.get("id"), str) and isinstance(s.get("segments"), int):
                    ids.add(s["id"])
                    self._bundles.setdefault(s["id"], s)
            w.available = ids
        loaded = status.get("loaded")
        if isinstance(loaded, list):
            w.loaded = {b for b in loaded if isinstance(b, str)}
        runner = status.get("runner")
        if isinstance(runner, str):
            w.runner = runner[:64]
        q = status.get("queued")
        if isinstance(q, int):
            w.queued = q
        profiles = status.get("profiles")
        if isinstance(profiles, dict):
            for bid, prof in profiles.items():
                if isinstance(prof, dict) and isinstance(prof.get("segment_ms"), list):
                    self._profiles[bid] = {"segment_ms": prof["segment_ms"],
                                           "device": str(prof.get("device", w.device))}
        if status.get("draining"):
            w.draining = True

    def _drop(self, w: _Worker, why: str, lost: bool = True) -> None:
        """Forget a worker; its requests in flight go to another worker (or get an error)."""
        with self._lock:
            self._workers.pop(w.ident, None)
        m = self.metrics
        m.worker_up.remove(w.name, w.device)
        m.worker_inflight.remove(w.name)
        if lost:
            m.workers_lost.inc()
            log.warning("worker %s %s; re-dispatching %d requests", w.name, why, len(w.inflight))
        else:
            log.info("worker %s %s", w.name, why)
        orphans = sorted(w.inflight.values(), key=lambda r: r.t0)
        w.inflight.clear()
        now = time.monotonic()
        for req in orphans:
            req.worker = None
            if req.attempts >= self.config.max_attempts:
                self._answer_error(req, "worker_lost",
                                   f"{req.attempts} workers were lost while computing this request")
            else:
                m.redispatched.inc()
                self._pending.appendleft(req)
        self._pending = deque(sorted(self._pending, key=lambda r: r.t0))
        self._update_snapshot(now)
        self._dispatch_pending(now)

    def _expire_workers(self, now: float) -> None:
        for w in list(self._workers.values()):
            if now > w.expiry:
                silent_ms = (now - w.expiry + self.config.heartbeat_expiry_s) * 1e3
                self._lost.append({"name": w.name, "pid": w.pid, "silent_ms": round(silent_ms, 1),
                                   "inflight": len(w.inflight), "at": time.time()})
                del self._lost[:-32]
                self._drop(w, f"missed {self.config.heartbeat_liveness} heartbeats ({silent_ms:.0f} ms silent)")

    def _tick(self, now: float) -> None:
        self._expire_workers(now)
        stamp = W.ctl(W.HEARTBEAT, time.monotonic())
        for w in self._workers.values():
            w.sock.send_multipart([w.ident, stamp])
        grace = self.config.deadline_grace_ms / 1e3
        for req in [r for r in self._reqs.values() if r.worker is not None and now > r.deadline + grace]:
            self._answer_error(req, "deadline", "no answer from the worker within the deadline")
        self._update_snapshot(now)

    def _drain_step(self, now: float) -> bool:
        """One step of a graceful stop; True when the loop may end."""
        cfg = self.config
        if not self._draining:
            self._draining = True
            log.info("shutting down: %d requests in flight", len(self._reqs))
        if self._stopping_since is None:
            if self._reqs and now - self._shutdown_at < cfg.drain_timeout_s:
                return False
            for req in list(self._reqs.values()):
                self._answer_error(req, "shutdown", "the server stopped before this request was computed")
            self._pending.clear()
            for w in self._workers.values():
                w.sock.send_multipart([w.ident, W.ctl(W.STOP)])
            self._stopping_since = now
        # wait for the workers' goodbyes (bounded: a dead one never says it)
        return not self._workers or now - self._stopping_since > max(2.0, cfg.heartbeat_expiry_s)

    def _rescan(self, force: bool = False) -> bool:
        """Re-read the repository (rate-limited); True when it was read."""
        if self.repository is None:
            return False
        now = time.monotonic()
        if not force and now - self._last_scan < self.config.rescan_interval_s:
            return False
        self._last_scan = now
        self.repository.scan()
        for bid in self.repository.ids():
            if bid not in self._bundles:
                self._bundles[bid] = bundle_summary(self.repository.manifest(bid))
        return True

    # -- state for the admin endpoints (read from another thread) ------------------------------
    def _update_snapshot(self, now: float, stopped: bool = False) -> None:
        m = self.metrics
        workers = []
        for w in list(self._workers.values()):
            workers.append({"name": w.name, "device": w.device, "runner": w.runner, "host": w.host, "pid": w.pid,
                            "inflight": len(w.inflight), "queued": w.queued, "capacity": w.capacity,
                            "loaded": sorted(w.loaded), "available": sorted(w.available), "draining": w.draining,
                            "joined": w.joined})
            m.worker_inflight.labels(w.name).set(len(w.inflight))
        live = sum(1 for w in workers if not w["draining"])
        m.live_workers.set(live)
        m.queued.set(len(self._pending))
        m.inflight.set(len(self._reqs) - len(self._pending))
        bundles = []
        for bid, s in sorted(self._bundles.items()):
            bundles.append({**s, "loaded_on": [w["name"] for w in workers if bid in w["loaded"]],
                            "available_on": [w["name"] for w in workers if bid in w["available"]],
                            "profile": self._profiles.get(bid)})
        snap = {"front": self.front_address, "back": self.back_address, "remote": self.remote_address,
                "workers": workers, "bundles": bundles,
                "load": self._load(), "draining": self._draining, "stopped": stopped, "lost": list(self._lost),
                "ready": any(w["loaded"] for w in workers if not w["draining"]) and not self._draining,
                "curve": bool(self._curve_secret)}
        with self._lock:
            self._snapshot = snap

    def snapshot(self) -> dict:
        """A consistent copy of the broker's state (workers, bundles, load); thread-safe."""
        with self._lock:
            return self._snapshot

    def wait_for_workers(self, n: int, timeout: float) -> bool:
        """Block until `n` workers have announced themselves (True) or `timeout` passes (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.snapshot().get("workers", ())) >= n:
                return True
            if self._stopped.is_set():
                return False
            time.sleep(0.02)
        return False


def _default_metrics() -> Metrics:
    from edgesplit._lazy import available

    return Metrics(enabled=available("prometheus_client"))


def _zmq_address(address: str) -> str:
    # "tcp://host:0" means "any free port" to us; libzmq spells that "tcp://host:*".
    if address.startswith("tcp://") and address.endswith(":0"):
        return address[:-2] + ":*"
    return address


def _public(endpoint: str) -> str:
    # A wildcard bind reports 0.0.0.0; that is still the address to print.
    return endpoint


def _setup_curve(broker: Broker, sock: zmq.Socket, allow, domain: str) -> None:
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    try:
        public, secret = zmq.auth.load_certificate(os.fspath(broker._curve_secret))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the server key {broker._curve_secret}: {exc}") from None
    if secret is None:
        raise ConfigError(f"{broker._curve_secret} holds no secret key (use the *.key_secret file)")
    if allow is not None and not os.path.isdir(allow):
        raise ConfigError(f"{allow} is not a directory of public keys")
    if broker._auth is None:
        broker._auth = ThreadAuthenticator(broker.ctx, log=logging.getLogger("cloud_server.auth"))
        broker._auth.start()
    if allow is None:
        log.warning("CURVE without --allow-clients: every client that knows the server key is admitted")
        broker._auth.configure_curve(domain=domain, location=zmq.auth.CURVE_ALLOW_ANY)
    else:
        broker._auth.configure_curve(domain=domain, location=os.fspath(allow))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = domain.encode()
