"""A tail worker: the conversation with the broker around a TailBatcher (cloud_server.tail), which computes.

Run as its own process or thread (`run()`), one thread serves: it announces the worker, takes
what the broker sends (`accept`), runs the queue (`step`), keeps the broker informed
(`heartbeat`), and reconnects with backoff when the broker goes quiet (Paranoid Pirate; the
broker's silence is judged by an adaptive failure detector, edgesplit.liveness). A
request never changes threads inside the worker (each hand-off costs a wake-up). A second
thread sends the heartbeat only while the serving thread is busy (a long batch, a bundle
loading), so the broker never takes a busy worker for a dead one.

The same four calls drive a worker from another loop (`attach(send)` instead of `run()`): the
broker's inline mode runs one in its own thread that way.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import threading
import time
from typing import Any, Callable

import zmq

from edgesplit import protocol as P
from edgesplit.errors import ProtocolError

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.curve import ClientKeys
from cloud_server.fetch import BundleFetcher
from cloud_server.repository import Repository, bundle_summary
from cloud_server.tail import TailBatcher

__all__ = ["TailWorker", "admit_request"]

log = logging.getLogger(__name__)
_ids = itertools.count()
_EVENTS, _POLLIN, _NOBLOCK = zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK
_SMALL = 2  # [ctl, header, *payloads]: control and header frames travel as copies, payloads do not


class TailWorker:
    """One tail worker (run it in its own process: `edgesplit worker` or `edgesplit serve`).

    Args:
        connect: the broker's worker address ("tcp://host:port").
        repository: directory of bundles this worker can load.
        config: the ServerConfig (heartbeats, batching, runner).
        device: "cpu" or "cuda:N"; describes the worker and picks the runner when config.runner is "auto".
        name: a name for metrics and logs (default host-pid-n).
        curve_server_key / curve_secret: zmq.auth certificate files when the broker's worker
            socket uses CURVE (the broker's public key; this worker's secret key).
    """

    def __init__(self, connect: str, repository: str | os.PathLike, config: ServerConfig = ServerConfig(),
                 device: str = "cpu", name: str | None = None, context: zmq.Context | None = None,
                 curve_server_key: str | os.PathLike | None = None, curve_secret: str | os.PathLike | None = None):
        self.connect = connect
        self.config = config
        self.repository = Repository(repository, verify=True)
        self.device = device
        self.runner = config.runner
        if device == "cpu" and config.runner == "auto":
            self.runner = "ort-cpu"
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{next(_ids)}"
        self.ctx = context or zmq.Context.instance()
        self._curve = ClientKeys(curve_server_key, curve_secret) if curve_server_key or curve_secret else None
        self._clock = W.ClockMap()
        self._tail = TailBatcher(config, self.repository, device, self.runner, self.name, self._send, self._scan,
                                 self._clock.to_local, lambda: self._stop_at is not None)
        # a bundle asked for but not held is fetched from the broker (cloud_server.fetch)
        self._fetcher = BundleFetcher(self.repository, config, self.name, self._fetched)
        self._tail.park = self._park
        self._trace = None
        if config.tracing:
            from cloud_server.traces import WorkerTrace

            self._trace = WorkerTrace(self.name)
        self._lock = threading.Lock()  # guards the socket: the serving thread and the heartbeat thread
        self._stop_at: float | None = None
        self._done = threading.Event()
        self._sock: zmq.Socket | None = None
        self._poller: zmq.Poller | None = None  # polls self._sock (made again for a new socket)
        self._poller_sock: zmq.Socket | None = None
        self._outbox: Callable[[list], None] | None = None  # set by attach(): no socket of our own
        self._wait: Callable[[float], None] | None = None  # how step() waits for batch-mates
        self._last_send = 0.0
        self._last_heard = time.monotonic()
        self._broker_liveness = config.failure_detector(self._last_heard)  # fed by every broker message
        self._sent_version = 0
        self._said_bye = False
        self._draining_sent = False
        self._available: list[dict] = []  # summaries of the repository's bundles (announced)

    # -- the step API: run() drives it from its own socket, attach() lets another loop drive it --
    def attach(self, send: Callable[[list], None]) -> None:
        """Drive this worker from another loop instead of run(): what it says goes to `send(frames)`.

        It announces itself at once (and queues its preloads); then feed it with accept(), run it
        with step(), and keep the broker informed with heartbeat(). It has no socket to receive
        batch-mates on, so it never waits for them.
        """
        self._outbox = send
        self._get_ready()
        self._send([W.ctl(W.READY, self.status(full=True))])

    def accept(self, frames: list) -> None:
        """One message from the broker: [control frame, *an edge's frames]."""
        c = W.parse(frames[0]) if frames else None
        if c is None:
            return
        cmd = c[0]
        if cmd == W.REQUEST and len(c) >= 5 and len(frames) >= 2:
            self._on_request(c, frames[1:])
        elif cmd == W.HEARTBEAT:
            if len(c) >= 2 and isinstance(c[1], float):
                self._clock.observe(c[1], time.monotonic())
        elif cmd == W.STOP:
            self.stop()
        elif cmd == W.RECONNECT:
            self._send([W.ctl(W.READY, self.status(full=True))])
        elif cmd == W.LOAD and len(c) >= 2 and isinstance(c[1], str):
            self._tail.add_load(c[1], W.stage_of(c))
        elif cmd == W.BUNDLE:
            self._fetcher.on_message(c, frames[1:])

    # -- bundles fetched from the broker (cloud_server.fetch) -----------------------------------
    def _park(self, job) -> bool:
        return self._fetcher.want(job.msg.bundle, job, self._fetch_sender(job))

    def _fetch_sender(self, job) -> Callable[[list], None]:
        """Where the fetch for `job`'s bundle is asked: the broker that sent the job."""
        return self._send

    def _fetched(self, bundle: str, jobs: list, error: str | None) -> None:
        if error is None:
            self._scan()
            self._tail.version += 1  # the broker hears at once that it is here
            self._tail.queue.extend(jobs)
            return
        for job in jobs:
            self._tail.send_error(job.rkey, job.msg.id, "unknown_bundle",
                                  f"this worker could not fetch bundle {bundle[:12]} from the broker: {error}")

    def step(self) -> bool:
        """Run the next queued job (a batch, or a bundle to load); False when nothing was queued."""
        return self._tail.step(self._wait)

    @property
    def pending(self) -> bool:
        """Jobs are queued (step() has work)."""
        return bool(self._tail.queue)

    def heartbeat(self, now: float, every_s: float | None = None) -> bool:
        """Tell the broker how this worker is, when that changed or it said nothing for `every_s`.

        Once stopping with no request left it says goodbye instead; False from then on.
        `every_s` defaults to the heartbeat interval.
        """
        if self._said_goodbye():
            return False
        every = self.config.heartbeat_interval_s if every_s is None else every_s
        if self._tail.version != self._sent_version or now - self._last_send >= every:
            self._sent_version = self._tail.version
            self._send([W.ctl(W.HEARTBEAT, self.status())])
        return True

    def _said_goodbye(self) -> bool:
        """True once stopping with no request left (the goodbye goes out the first time)."""
        if not self._said_bye and self._stop_at is not None and not self._tail.has_requests():
            self._send([W.ctl(W.BYE)])
            self._said_bye = True
        return self._said_bye

    def status(self, full: bool = False) -> dict:
        """What the broker is told: queue, loaded bundles, profiles (full: who this worker is)."""
        st: dict[str, Any] = {"queued": len(self._tail.queue), "draining": self._stop_at is not None,
                              **self._tail.holdings()}
        if full:
            st.update(name=self.name, device=self.device, pid=os.getpid(), host=socket.gethostname(),
                      capacity=self.config.worker_capacity, fetch=self._fetcher.enabled)
        # the backends actually running (e.g. "ort-cuda"), once a bundle is loaded
        st["runner"] = ",".join(sorted({b.runner_name for b in list(self._tail.loaded.values())})) or self.runner
        st["available"] = self._available
        # bundles this worker cannot load, and why (start-up readiness does not wait for them)
        st["failed"] = {b: why for b, (_, why) in list(self._tail.failed.items())}
        st["sessions"] = self._tail.sessions.report()  # count, bytes, evictions (drops idle ones first)
        return st

    @property
    def stopping(self) -> bool:
        return self._stop_at is not None

    def stop(self) -> None:
        """Graceful stop: take no more requests, finish the queued ones, say goodbye. Signal-safe."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()

    def close(self) -> None:
        """Release the loaded bundles (run() does this itself when it returns)."""
        self._tail.close()

    def run(self) -> int:
        """Serve until stop() (or a STOP from the broker) and the queue is drained; returns 0."""
        self._wait = self._receive
        self._get_ready()
        self._open_sockets()
        beat = threading.Thread(target=self._heartbeat_loop, name=f"{self.name}-heartbeat", daemon=True)
        beat.start()
        try:
            self._serve_loop()
        finally:
            self._done.set()
            beat.join(5)
            self._close_sockets()
            self.close()
        return 0

    def _open_sockets(self) -> None:
        with self._lock:
            self._sock = self._open()

    def _close_sockets(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(0)
                self._sock = None

    def _get_ready(self) -> None:
        self._scan()
        if self.config.preload:
            for bid in self.repository.ids():
                self._tail.add_load(bid)

    # -- the socket ---------------------------------------------------------------------------
    # One thread serves: it receives, batches, computes and replies, so a request crosses no
    # thread boundary inside the worker. The heartbeat thread only speaks when that thread has
    # been quiet for a heartbeat interval (a long batch, a bundle loading), so the broker never
    # takes a busy worker for a dead one.
    def _dealer(self, address: str) -> zmq.Socket:
        """A DEALER connected to a broker's worker address."""
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndhwm = s.rcvhwm = 10_000
        # The broker forwards what edges sent; a frame bigger than any request for these bundles
        # can be (at max_batch) is dropped by libzmq before it is buffered here.
        s.maxmsgsize = self.socket_bound()
        if self._curve:
            self._curve.apply(s)
        s.connect(address)
        return s

    def _open(self) -> zmq.Socket:
        s = self._dealer(self.connect)
        s.send(W.ctl(W.READY, self.status(full=True)))
        self._last_send = self._last_heard = time.monotonic()
        self._broker_liveness.reset(self._last_heard)  # a new connection: learn the broker again
        return s

    def socket_bound(self) -> int:
        """ZMQ_MAXMSGSIZE of this worker's socket, from the repository's bundles (ServerConfig.socket_bound).

        A worker that may fetch bundles takes frames up to limits.max_message_bytes: a bundle it
        fetches later may need more than those it holds now, and its broker's edge-facing socket
        bounds every request by the broker's bundles already.
        """
        if self._fetcher.enabled:
            return self.config.limits.max_message_bytes
        return self.config.socket_bound(self.repository.manifest(b) for b in self.repository.ids())

    def _send(self, frames: list) -> None:
        if self._trace is not None and self._trace.waiting:
            self._trace.replied(frames[0])
        if self._outbox is not None:
            self._outbox(frames)
        else:
            with self._lock:
                if self._sock is None:
                    return
                P.send_frames(self._sock, frames, _SMALL)
        self._last_send = time.monotonic()

    def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval_s
        while not self._done.wait(interval / 4):
            if time.monotonic() - self._last_send >= interval:
                try:
                    self._send([W.ctl(W.HEARTBEAT, self.status())])
                except Exception:  # this thread must outlive any bug: it is what keeps us alive
                    log.exception("%s: heartbeat failed", self.name)

    def _scan(self) -> None:
        """Look at the repository again; what the worker announces is computed here, once."""
        self.repository.scan()
        self._available = [bundle_summary(self.repository.manifest(b)) for b in self.repository.ids()]

    def _receive(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the broker, then take everything it sent."""
        with self._lock:
            sock = self._sock
            # Asking the socket for its events is cheaper than a poll (and than a recv that
            # raises Again), and it keeps the GIL, which a broker thread of this process wants.
            if not sock.get(_EVENTS) & _POLLIN:
                if timeout_s <= 0:
                    return
                if self._poller is None or self._poller_sock is not sock:
                    self._poller, self._poller_sock = zmq.Poller(), sock
                    self._poller.register(sock, _POLLIN)
                if not self._poller.poll(math.ceil(timeout_s * 1e3)):  # whole ms: a fraction would spin
                    return
            got = []
            for _ in range(256):
                try:
                    got.append(P.recv_frames(sock, _SMALL, _NOBLOCK))
                except zmq.Again:
                    break
                if not sock.get(_EVENTS) & _POLLIN:
                    break
        self._last_heard = time.monotonic()
        self._broker_liveness.heartbeat(self._last_heard)
        for frames in got:
            self.accept(frames)

    def _keep_serving(self, now: float) -> bool:
        """Heartbeat, and the graceful stop (draining, goodbye, drain timeout); False: the loop ends."""
        if self._stop_at is not None and not self._draining_sent:
            self._send([W.ctl(W.DRAINING)])
            self._draining_sent = True
        if not self.heartbeat(now):
            time.sleep(0.05)  # let libzmq flush the goodbye before the socket closes
            return False
        if self._fetcher.active:
            self._fetcher.expire(now)
        if self._stop_at is not None and now - self._stop_at > self.config.drain_timeout_s:
            log.warning("%s: drain timeout; %d requests unanswered", self.name, len(self._tail.queue))
            return False
        return True

    def _serve_loop(self) -> None:
        cfg = self.config
        backoff = cfg.reconnect_initial_s
        while True:
            now = time.monotonic()
            if not self._keep_serving(now):
                return
            if self._broker_liveness.suspect(now) and self._stop_at is None:
                # After a long batch (or our own stall on a loaded box) the broker's messages may
                # be waiting here, or still on their way through ZeroMQ's I/O thread: give them
                # one interval before calling it silent (in slices: the heartbeat thread waits
                # for the socket's lock meanwhile, and the broker must keep hearing from us).
                until = now + cfg.heartbeat_interval_s
                while self._broker_liveness.suspect(now) and now < until:
                    self._receive(min(0.05, until - now))
                    now = time.monotonic()
                    self.heartbeat(now)
            if self._broker_liveness.suspect(now) and self._stop_at is None:
                log.warning("%s: broker silent (%s); reconnecting in %.2f s", self.name,
                            self._broker_liveness.describe(now), backoff)
                with self._lock:
                    self._sock.close(0)
                    self._sock = None
                time.sleep(backoff)
                backoff = min(backoff * 2, cfg.reconnect_max_s)
                with self._lock:
                    self._sock = self._open()
                continue
            if self._last_heard > now - cfg.heartbeat_interval_s:
                backoff = cfg.reconnect_initial_s
            if not self.pending:
                self._receive(min(cfg.heartbeat_interval_s / 2, 0.05))
                continue
            self._receive(0)  # whatever else arrived meanwhile joins the queue (and maybe the batch)
            self.step()

    def _on_request(self, c: list, msg_frames: list) -> None:
        admit_request(self._tail, self.config, self._clock, self._stop_at, c, msg_frames, trace=self._trace)


def admit_request(tail: TailBatcher, config: ServerConfig, clock: W.ClockMap, stop_at: float | None, c: list,
                  msg_frames: list, received_local: bool = False, trace=None) -> bool:
    """One REQUEST from a broker: decode it and queue it on `tail` (True), or answer it at once (False).

    `clock` maps that broker's times onto ours; `received_local` hands the batcher the receipt
    time already mapped (cloud_server.multi: one batcher, several brokers' clocks).
    """
    now = time.monotonic()
    try:
        rkey = c[1]
        deadline_b, received_b, now_b = float(c[2]), float(c[3]), float(c[4])
    except (ValueError, TypeError):
        return False  # not from our broker
    clock.observe(now_b, now)
    try:
        msg = P.decode(msg_frames, config.limits)
    except ProtocolError as exc:
        tail.send_error(rkey, getattr(exc, "request_id", None) or "", P.error_code(exc), str(exc))
        return False
    if msg.kind == "session_end":
        tail.end_session(msg)  # never answered
        return False
    if msg.kind != "infer":
        tail.send_error(rkey, msg.id, "bad_request", f"expected an infer message, got {msg.kind!r}")
        return False
    if stop_at is not None and stop_at < now - 0.5:
        tail.send_error(rkey, msg.id, "shutdown", "this worker is shutting down")
        return False
    if trace is not None and len(c) > 5 and c[5] is not None:
        trace.expect(rkey, c[5])  # the broker's span: the parent of this worker's spans
    received = clock.to_local(received_b) if received_local else received_b
    # a pipeline hop runs [cut, stop) only (cloud_server.placement); the stage checks it holds them
    stop = c[6] if len(c) > 6 else None
    tail.add_request(rkey, msg, clock.to_local(deadline_b), now, received, stop if type(stop) is int else None)
    return True
