"""The broker: edges talk to its front ROUTER, tail workers to its back ROUTER (Paranoid Pirate).

The broker parses only the small msgpack header of an edge's message; the tensor frames are
forwarded to a worker, and the worker's reply frames back to the edge, as the same ZeroMQ
messages (no copy, no re-encoding). It owns every request until exactly one reply went out:

- a request goes to the least-loaded live worker that holds its bundle (a worker that only
  has the bundle on disk loads it on demand); when every worker is at capacity it waits in a
  bounded queue, and when that is full the edge gets "busy" with a retry_after_ms hint;
- a worker whose silence its failure detector finds too long (registry.is_lost) is dropped
  and its requests are sent to another worker (at most `max_attempts` dispatches, then "worker_lost");
- a request past its deadline is answered "deadline" instead of being computed;
- anything malformed from an edge is answered with an error (or dropped); it never stops the loop.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid

import zmq

from edgesplit import protocol as P
from edgesplit.errors import ConfigError

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.curve import CurveServer
from cloud_server.dispatch import Dispatcher
from cloud_server.front import EdgeDesk
from cloud_server.inline import InlineWorker
from cloud_server.metrics import Metrics
from cloud_server.placement import Pipelines
from cloud_server.registry import BundleCatalog, SocketLink, WorkerRecord, WorkerRegistry
from cloud_server.fetch import BundleSource
from cloud_server.repository import Repository
from cloud_server.snapshot import AdminView

__all__ = ["Broker"]

log = logging.getLogger(__name__)

_RECV_BATCH = 64  # messages taken from one socket before looking at the other
_EVENTS, _POLLIN, _NOBLOCK = zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK
_ZAP_DOMAIN = "edgesplit"  # the ZeroMQ authentication domain of the edge-facing socket
# Frames travel as copies up to and including the header, payloads without a copy:
_FRONT_SMALL = 2  # [ident, header, *payloads]
_BACK_SMALL = 3  # [ident, ctl, header, *payloads]


def _is_loopback(address: str) -> bool:
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


class Broker:
    """Routes edge requests to tail workers: the life cycle, the loop, and the worker conversation.

    The jobs live in rooms: `EdgeDesk` (cloud_server.front) reads and answers edges,
    `Dispatcher` (dispatch) holds the requests, `WorkerRegistry` and `BundleCatalog` (registry)
    know the workers and bundles, `AdminView` (snapshot) is what the admin endpoints read,
    `CurveServer` (curve) secures the sockets, `InlineWorker` (inline) runs a worker in this thread.

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
        self._allow_clients = allow_clients
        self._remote_addr, self._allow_workers = remote_back, allow_workers
        self.curve = CurveServer(self.ctx, curve_secret) if curve_secret else None
        self.front: zmq.Socket | None = None
        self.back: zmq.Socket | None = None
        self.remote: zmq.Socket | None = None
        self.front_address = self.back_address = self.remote_address = None

        self._lock = threading.Lock()
        self.catalog = BundleCatalog(self.repository, config.rescan_interval_s)
        self.catalog.on_new = lambda bundle, summary: self.metrics.know_bundle(bundle, summary.get("name"))
        self.registry = WorkerRegistry(config, self.metrics, self._lock)
        # workers fetch the bundles of this broker's repository that they do not hold (cloud_server.fetch)
        self.bundle_source = BundleSource(self.repository, config)
        self.registry.fetchable = lambda b: self.repository is not None and b in self.repository
        self.desk = EdgeDesk(config, self.metrics, self.catalog, self.registry, None, lambda: self._draining)
        self.dispatcher = Dispatcher(config, self.registry, self.metrics, self.desk.error)
        # bundles too big for one worker (or asked to be) run as pipeline stages (cloud_server.placement)
        self.registry.bundle_bytes = self.catalog.bytes_of
        self.pipelines = Pipelines(config, self.registry, self.catalog, self.metrics,
                                   lambda w, b, start, stop: w.send([W.ctl(W.LOAD, b, [start, stop])]),
                                   lambda: self._shutdown_at is not None)
        self.dispatcher.pipelines = self.pipelines
        if config.tracing:
            from cloud_server.traces import BrokerTrace

            self.dispatcher.trace = BrokerTrace()
        self.desk.dispatcher = self.dispatcher
        self.view = AdminView(self.metrics, self._lock, self.registry, self.dispatcher, self.catalog)
        self._shutdown_at: float | None = None
        self._abort = False
        self._draining = False
        self._stopping_since: float | None = None
        self._stopped = threading.Event()
        self._bound = threading.Event()
        self._inproc_address: str | None = None  # set by add_inproc_endpoint
        self._thread: threading.Thread | None = None
        self._inline: InlineWorker | None = None  # a tail worker run by this broker's own thread
        self.exit_reason = ""
        # ZMQ_MAXMSGSIZE of every socket (see _socket_bound), and the catalogue size it was made for
        self.socket_bound = 0
        self._bound_for = 0
        # bundles workers could not load: id -> {worker name: why}; replaced, never changed in
        # place, so the admin thread reads it without a lock
        self.load_errors: dict[str, dict[str, str]] = {}

    @property
    def shutting_down(self) -> bool:
        """shutdown() was called (the broker is draining or has stopped)."""
        return self._shutdown_at is not None

    @property
    def held(self) -> int:
        """Requests held now: waiting for a worker, or computing (safe to read from any thread)."""
        return len(self.dispatcher.reqs)

    # -- life cycle ---------------------------------------------------------------------------
    def bind(self) -> tuple[str, str]:
        """Bind both sockets; returns (front address, back address) with real port numbers."""
        if self.front is not None:
            return self.front_address, self.back_address
        if self.repository is not None:
            self.catalog.rescan(force=True)
        front = self.ctx.socket(zmq.ROUTER)
        back = self.ctx.socket(zmq.ROUTER)
        remote = self.ctx.socket(zmq.ROUTER) if self._remote_addr else None
        socks = [s for s in (front, back, remote) if s is not None]
        bound = self._socket_bound()
        for s in socks:
            s.linger = 0
            s.router_mandatory = False
            s.sndhwm = s.rcvhwm = 10_000
            s.maxmsgsize = bound
        try:
            if self.curve is not None:
                self.curve.secure(front, self._allow_clients, _ZAP_DOMAIN)
                if remote is not None:
                    if self._allow_workers is None:
                        raise ConfigError("a CURVE server with a remote worker address needs --allow-workers "
                                          "(the public keys of the workers allowed in)")
                    self.curve.secure(remote, self._allow_workers, _ZAP_DOMAIN + "-workers")
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
        self.socket_bound = bound
        self._bound_for = len(self.catalog.bundles)
        self.front_address = _public(front.last_endpoint.decode())
        self.back_address = _public(back.last_endpoint.decode())
        if remote is not None:
            self.remote_address = _public(remote.last_endpoint.decode())
        self.desk.sock = front
        self._update_snapshot()
        self._bound.set()
        return self.front_address, self.back_address

    def _socket_bound(self) -> int:
        """ZMQ_MAXMSGSIZE for the broker's sockets: the largest frame a request or reply for the
        bundles it knows can need at max_batch (ServerConfig.socket_bound). A bundle it knows only
        from a remote worker's announcement (no specs here) leaves it at limits.max_message_bytes.

        libzmq checks each frame as it arrives and drops the sender's connection, without a
        word to it, when a frame is bigger: nothing is buffered past the bound.
        """
        repo = self.repository
        if repo is None or any(b not in repo for b in self.catalog.bundles):
            return self.limits.max_message_bytes
        return self.config.socket_bound(repo.manifest(b) for b in repo.ids())

    def _grow_socket_bound(self) -> None:
        """A new bundle may need bigger frames: raise the bound (it applies to new connections)."""
        if len(self.catalog.bundles) == self._bound_for:
            return
        self._bound_for = len(self.catalog.bundles)
        bound = self._socket_bound()
        if bound <= self.socket_bound:
            return
        log.warning("new bundles need frames of up to %d bytes (was %d): connections made from now on "
                    "accept them; edges and workers connected before must reconnect", bound, self.socket_bound)
        self.socket_bound = bound
        for s in (self.front, self.back, self.remote):
            if s is not None:
                s.maxmsgsize = bound

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
        self._inline = InlineWorker(worker, self._on_back, self.config.heartbeat_interval_s / 2)

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
        if self.curve is not None:
            self.curve.close()

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
        desk = self.desk
        # (handler, frames received as copies up to the header)
        handlers = {front: (desk.on_message, _FRONT_SMALL), back: (self._back_handler(back), _BACK_SMALL)}
        if remote is not None:
            handlers[remote] = (self._back_handler(remote), _BACK_SMALL)
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        cfg = self.config
        d = self.dispatcher
        try:
            if self._inline is not None:
                self._inline.start()
            next_tick = next_expiry_check = time.monotonic()
            while True:
                now = time.monotonic()
                wait = max(0.0, min(next_tick - now, next_expiry_check - now, 0.05))
                if d.pending:
                    wait = min(wait, 0.002)
                events = poller.poll(math.ceil(wait * 1e3))  # whole ms: a fraction would spin
                for sock, _ in events:
                    handler, small = handlers[sock]
                    for _ in range(_RECV_BATCH):
                        try:
                            frames = P.recv_frames(sock, small, _NOBLOCK)
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
                        self._inline.run()
                    except Exception:  # same as a handler: log the bug, keep serving
                        log.exception("broker: the inline worker failed")
                now = time.monotonic()
                try:
                    if d.pending:
                        d.expire_pending(now)
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
                self._inline.close()
            self._update_snapshot(stopped=True)
            self._stopped.set()

    # -- workers ------------------------------------------------------------------------------
    def _back_handler(self, sock: zmq.Socket):
        link = SocketLink(sock)
        return lambda frames: self._on_back(frames, link)

    def _on_back(self, frames: list, link) -> None:
        """[ident, ctl, *frames] from a worker, reached back through `link`."""
        c = W.parse(frames[1]) if len(frames) >= 2 else None
        if c is None:
            return
        ident = frames[0]
        cmd = c[0]
        now = time.monotonic()
        reg = self.registry
        w = reg.get(ident)
        if cmd == W.REPLY and w is not None and len(c) >= 3:
            w.heard(now)
            stats = c[2]
            if type(stats) is list and stats and (stats[0] == "hop" or stats[-1] == "not_held"):
                # a pipeline stage's answer: the next hop's request, or "not held here"
                self.dispatcher.hop_done(w, c[1], frames[2:], stats[0] == "hop", now)
                self.dispatcher.dispatch_pending(now)
                return
            req = self.dispatcher.replied(w, c[1])
            if req is None:
                return  # answered already (re-dispatched after a presumed loss, or timed out): drop
            self.desk.forward_reply(req, frames[2:], c[2], now)
            self.dispatcher.dispatch_pending(now)
            return
        if cmd == W.READY:
            info = c[1] if len(c) > 1 and isinstance(c[1], dict) else {}
            if w is not None:
                self._drop(w, "announced itself again")
            w = reg.add(ident, info, now, link, self.catalog)
            self._note_load_errors(w, info)
            self.pipelines.workers_changed()
            self._update_snapshot()
            self.dispatcher.dispatch_pending(now)
            return
        if w is None:
            if cmd != W.BYE:
                link.send(ident, [W.ctl(W.RECONNECT)])
            return
        w.heard(now)
        if cmd == W.HEARTBEAT:
            if len(c) > 1 and isinstance(c[1], dict):
                changed = self._note_load_errors(w, c[1])
                if w.apply_status(c[1], self.catalog) or changed:
                    self.pipelines.workers_changed()
                    self._update_snapshot()
                self.dispatcher.sessions.observe(w, c[1])
                self.dispatcher.dispatch_pending(now)
        elif cmd == W.FETCH:
            reply = self.bundle_source.answer(c)
            if reply is not None:
                w.send(reply)
        elif cmd == W.DRAINING:
            w.draining = True
            self.pipelines.workers_changed()
        elif cmd == W.BYE:
            self._drop(w, "said goodbye", lost=False)

    def _note_load_errors(self, w: WorkerRecord, status: dict) -> bool:
        """Take in the bundles a worker says it cannot load (log, /v1/models, a gauge); True if that changed."""
        failed = status.get("failed")
        if not isinstance(failed, dict):
            return False
        mine = {b: str(why)[:500] for b, why in list(failed.items())[:256] if isinstance(b, str) and len(b) <= 128}
        errors = {b: {n: why for n, why in ws.items() if n != w.name} for b, ws in self.load_errors.items()}
        for b, why in mine.items():
            errors.setdefault(b, {})[w.name] = why
        errors = {b: ws for b, ws in errors.items() if ws}
        if errors == self.load_errors:
            return False
        for b, why in mine.items():
            if self.load_errors.get(b, {}).get(w.name) != why:
                log.error("worker %s cannot load bundle %s: %s", w.name, b[:12], why)
        for b in set(self.load_errors) | set(errors):
            info = self.catalog.bundles.get(b) or {}
            self.metrics.bundle_load_errors.labels(b, str(info.get("name", "?"))[:64]).set(len(errors.get(b, ())))
        self.load_errors = errors
        return True

    def load_errors_of(self, worker: str) -> set[str]:
        """The bundles worker `worker` (a name) reported it cannot load; thread-safe."""
        return {b for b, ws in self.load_errors.items() if worker in ws}

    def _drop(self, w: WorkerRecord, why: str, lost: bool = True) -> None:
        """Forget a worker; its requests in flight go to another worker (or get an error)."""
        self.dispatcher.requeue(self.registry.remove(w, why, lost))
        self.pipelines.workers_changed()
        self._update_snapshot()
        self.dispatcher.dispatch_pending(time.monotonic())

    def _expire_workers(self, now: float) -> None:
        # Read before judging: a heartbeat already waiting in a worker socket proves life.
        unread = any(s is not None and s.get(_EVENTS) & _POLLIN for s in (self.back, self.remote))
        for w, why in self.registry.silent(now, unread):
            self._drop(w, why)

    def _tick(self, now: float) -> None:
        self._expire_workers(now)
        self._grow_socket_bound()
        stamp = W.ctl(W.HEARTBEAT, time.monotonic())
        for w in self.registry:
            w.send([stamp])
        self.dispatcher.fail_overdue(now)
        self.dispatcher.sessions.expire(now)
        self._update_snapshot()

    def _drain_step(self, now: float) -> bool:
        """One step of a graceful stop; True when the loop may end."""
        cfg = self.config
        d = self.dispatcher
        if not self._draining:
            self._draining = True
            log.info("shutting down: %d requests in flight", len(d.reqs))
        if self._stopping_since is None:
            if d.reqs and now - self._shutdown_at < cfg.drain_timeout_s:
                return False
            d.fail_all("shutdown", "the server stopped before this request was computed")
            for w in self.registry:
                w.send([W.ctl(W.STOP)])
            self._stopping_since = now
        # wait for the workers' goodbyes (bounded: a dead one never says it)
        return not len(self.registry) or now - self._stopping_since > max(2.0, cfg.heartbeat_expiry_s)

    # -- state for the admin endpoints (read from another thread) ------------------------------
    def _update_snapshot(self, stopped: bool = False) -> None:
        self.view.update({"front": self.front_address, "back": self.back_address, "remote": self.remote_address},
                         self._draining, self.curve is not None, stopped)

    def snapshot(self) -> dict:
        """A consistent copy of the broker's state (workers, bundles, load); thread-safe."""
        return self.view.get()

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
    from edgesplit.deps import available

    return Metrics(enabled=available("prometheus_client"))


def _zmq_address(address: str) -> str:
    # "tcp://host:0" means "any free port" to us; libzmq spells that "tcp://host:*".
    if address.startswith("tcp://") and address.endswith(":0"):
        return address[:-2] + ":*"
    return address


def _public(endpoint: str) -> str:
    # A wildcard bind reports 0.0.0.0; that is still the address to print.
    return endpoint
