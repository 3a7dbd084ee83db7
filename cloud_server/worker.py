"""A tail worker: runs segments [k, n) of bundles for the broker, batching requests that arrive together.

One thread serves: it announces the worker, checks each request's frames (edgesplit.protocol.decode,
no copies), loads bundles on demand (edgesplit.runtime.SegmentChain per segment), forms a batch
from requests for the same bundle and cut that arrive within `max_queue_delay_ms` (when the cut
has a dynamic batch dim), runs it, splits the outputs and replies, and reconnects with backoff when
the broker goes quiet (Paranoid Pirate). A request never changes threads inside the worker (each
hand-off costs a wake-up). A second thread sends the heartbeat only while the serving thread is
busy (a long batch, a bundle loading), so the broker never takes a busy worker for a dead one.
"""

from __future__ import annotations

import itertools
import math
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import zmq

from edgesplit import protocol as P
from edgesplit.bundle import Bundle
from edgesplit.codecs import decode as decode_tensor
from edgesplit.codecs import get_codec
from edgesplit.errors import BackendError, BundleError, CodecError, ConfigError, EdgeSplitError, ProtocolError

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.repository import Repository, bundle_summary

__all__ = ["TailWorker"]

log = logging.getLogger(__name__)
_ids = itertools.count()
_EVENTS, _POLLIN = zmq.EVENTS, zmq.POLLIN


class _Job:
    __slots__ = ("rkey", "msg", "deadline", "arrived", "received", "arrays", "samples", "decode_ms", "t_start",
                 "batch_wait_ms",
                 "load")

    def __init__(self, rkey: bytes, msg: P.Message | None, deadline: float | None, arrived: float, received: float,
                 load: str | None = None):
        self.rkey = rkey
        self.msg = msg
        self.deadline = deadline
        self.arrived = arrived
        self.received = received  # broker clock
        self.arrays: dict[str, np.ndarray] | None = None
        self.samples = 1
        self.decode_ms = 0.0
        self.t_start = 0.0
        self.batch_wait_ms = 0.0
        self.load = load  # a "load this bundle" order instead of a request


class _Failure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Loaded:
    """A bundle ready to run: one SegmentChain per segment, so any [k, n) reuses the same sessions."""

    def __init__(self, bundle: Bundle, runner: str, threads: int | None):
        from edgesplit.runtime import SegmentChain

        self.bundle = bundle
        n = bundle.num_segments
        self.chains = [SegmentChain(bundle, i, i + 1, runner=runner, intra_op_threads=threads).activate()
                       for i in range(n)]
        self.batchable = {k: _batch_symbol(bundle, k) is not None for k in range(n)}
        self.profile: dict | None = None

    @property
    def runner_name(self) -> str:
        return ",".join(sorted({c.runner_name for c in self.chains}))

    def run(self, k: int, feeds: dict[str, np.ndarray], times: list[float] | None = None) -> dict[str, np.ndarray]:
        env = feeds
        for i in range(k, len(self.chains)):
            t = time.perf_counter()
            env = self.chains[i].run(env)
            if times is not None:
                times.append((time.perf_counter() - t) * 1e3)
        return env

    def measure(self, device: str, passes: int = 3) -> None:
        """Per-segment times at batch 1 on zeros (first pass discarded): the profile for "welcome"."""
        feeds = {s.name: np.zeros([d if isinstance(d, int) and d >= 0 else 1 for d in s.shape], dtype=s.dtype)
                 for s in self.bundle.inputs}
        runs = []
        for _ in range(passes):
            t: list[float] = []
            self.run(0, feeds, t)
            runs.append(t)
        seg = np.median(np.array(runs[1:] or runs), axis=0)
        self.profile = {"segment_ms": [round(float(x), 4) for x in seg], "device": device,
                        "runner": self.runner_name, "batch": 1}

    def close(self) -> None:
        for c in self.chains:
            c.close()


def _batch_symbol(bundle: Bundle, k: int) -> str | None:
    """The symbol of the shared leading batch dim of cut k's tensors and the outputs, if any."""
    specs = list(bundle.cut(k).specs) + list(bundle.outputs)
    if not specs or not all(s.shape and isinstance(s.shape[0], str) for s in specs):
        return None
    syms = {s.shape[0] for s in specs}
    return syms.pop() if len(syms) == 1 else None


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

    # A key that formed a batch of several requests keeps the batching window open this long.
    CROWD_MEMORY_S = 1.0

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
        self._curve = None
        if curve_server_key or curve_secret:
            from zmq.auth import load_certificate

            if not (curve_server_key and curve_secret):
                raise ConfigError("a CURVE worker needs both the broker's public key and its own secret key")
            server_pub, _ = load_certificate(os.fspath(curve_server_key))
            pub, sec = load_certificate(os.fspath(curve_secret))
            if sec is None:
                raise ConfigError(f"{curve_secret} holds no secret key")
            self._curve = (server_pub, pub, sec)
        self._loaded: dict[str, _Loaded] = {}
        self._queue: deque[_Job] = deque()  # received, not yet run (only the serving thread touches it)
        self._lock = threading.Lock()  # guards the socket: the serving thread and the heartbeat thread
        self._stop_at: float | None = None
        self._done = threading.Event()
        self._version = 0  # bumped when loaded bundles or profiles change: triggers a heartbeat
        self._codecs: dict[str, Any] = {}
        self._sock: zmq.Socket | None = None
        self._poller: zmq.Poller | None = None  # polls self._sock (made again for a new socket)
        self._poller_sock: zmq.Socket | None = None
        self._last_send = 0.0
        self._last_heard = time.monotonic()
        self._clock = W.ClockMap()
        self._crowded: dict[tuple, float] = {}  # (bundle, cut) -> until when to wait for batch-mates
        self._available: list[dict] = []  # summaries of the repository's bundles (announced)

    # -- public -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop: take no more requests, finish the queued ones, say goodbye. Signal-safe."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()

    def run(self) -> int:
        """Serve until stop() (or a STOP from the broker) and the queue is drained; returns 0."""
        self._scan()
        if self.config.preload:
            for bid in self.repository.ids():
                self._queue.append(_Job(b"", None, None, time.monotonic(), 0.0, load=bid))
        with self._lock:
            self._sock = self._open()
        beat = threading.Thread(target=self._heartbeat_loop, name=f"{self.name}-heartbeat", daemon=True)
        beat.start()
        try:
            self._serve_loop()
        finally:
            self._done.set()
            beat.join(5)
            with self._lock:
                if self._sock is not None:
                    self._sock.close(0)
                    self._sock = None
            for b in self._loaded.values():
                b.close()
        return 0

    # -- the socket ---------------------------------------------------------------------------
    # One thread serves: it receives, batches, computes and replies, so a request crosses no
    # thread boundary inside the worker. The heartbeat thread only speaks when that thread has
    # been quiet for a heartbeat interval (a long batch, a bundle loading), so the broker never
    # takes a busy worker for a dead one.
    def _open(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndhwm = s.rcvhwm = 10_000
        if self._curve:
            server_pub, pub, sec = self._curve
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_pub, pub, sec
        s.connect(self.connect)
        s.send_multipart([W.ctl(W.READY, self._status(full=True))])
        self._last_send = self._last_heard = time.monotonic()
        return s

    def _send(self, frames: list) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.send_multipart(frames, copy=False)
                self._last_send = time.monotonic()

    def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval_s
        while not self._done.wait(interval / 4):
            if time.monotonic() - self._last_send >= interval:
                try:
                    self._send([W.ctl(W.HEARTBEAT, self._status())])
                except Exception:  # this thread must outlive any bug: it is what keeps us alive
                    log.exception("%s: heartbeat failed", self.name)

    def _status(self, full: bool = False) -> dict:
        st: dict[str, Any] = {"queued": len(self._queue), "loaded": sorted(self._loaded),
                              "profiles": {b: l.profile for b, l in list(self._loaded.items()) if l.profile},
                              "draining": self._stop_at is not None}
        if full:
            st.update(name=self.name, device=self.device, pid=os.getpid(), host=socket.gethostname(),
                      capacity=self.config.worker_capacity)
        # the backends actually running (e.g. "ort-cuda"), once a bundle is loaded
        st["runner"] = ",".join(sorted({b.runner_name for b in list(self._loaded.values())})) or self.runner
        st["available"] = self._available
        return st

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
                    got.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
                if not sock.get(_EVENTS) & _POLLIN:
                    break
        self._last_heard = time.monotonic()
        for frames in got:
            self._on_broker(frames)

    def _serve_loop(self) -> None:
        cfg = self.config
        backoff = cfg.reconnect_initial_s
        sent_version = self._version
        draining_sent = False
        while True:
            now = time.monotonic()
            if self._stop_at is not None:
                if not draining_sent:
                    self._send([W.ctl(W.DRAINING)])
                    draining_sent = True
                if not any(j.load is None for j in self._queue):
                    self._send([W.ctl(W.BYE)])
                    time.sleep(0.05)  # let libzmq flush the goodbye before the socket closes
                    return
                if now - self._stop_at > cfg.drain_timeout_s:
                    log.warning("%s: drain timeout; %d requests unanswered", self.name, len(self._queue))
                    return
            if self._version != sent_version or now - self._last_send >= cfg.heartbeat_interval_s:
                sent_version = self._version
                self._send([W.ctl(W.HEARTBEAT, self._status())])
            if now - self._last_heard > cfg.heartbeat_expiry_s and self._stop_at is None:
                # After a long batch the broker's messages may be waiting here, or still on their
                # way through ZeroMQ's I/O thread: give them one interval before calling it silent.
                self._receive(cfg.heartbeat_interval_s)
            if now - self._last_heard > cfg.heartbeat_expiry_s and self._stop_at is None:
                log.warning("%s: broker silent for %.1f s; reconnecting in %.2f s", self.name,
                            now - self._last_heard, backoff)
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
            if not self._queue:
                self._receive(min(cfg.heartbeat_interval_s / 2, 0.05))
                continue
            self._receive(0)  # whatever else arrived meanwhile joins the queue (and maybe the batch)
            batch = self._take_batch()
            if batch:
                self._run_batch(batch)

    def _on_broker(self, frames: list) -> None:
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
            self._send([W.ctl(W.READY, self._status(full=True))])
        elif cmd == W.LOAD and len(c) >= 2 and isinstance(c[1], str):
            self._queue.append(_Job(b"", None, None, time.monotonic(), 0.0, load=c[1]))

    def _on_request(self, c: list, msg_frames: list) -> None:
        now = time.monotonic()
        try:
            rkey = c[1]
            deadline_b, received_b, now_b = float(c[2]), float(c[3]), float(c[4])
        except (ValueError, TypeError):
            return  # not from our broker
        self._clock.observe(now_b, now)
        try:
            msg = P.decode(msg_frames, self.config.limits)
        except ProtocolError as exc:
            self._send_error(rkey, getattr(exc, "request_id", None) or "", P.error_code(exc), str(exc))
            return
        if msg.kind != "infer":
            self._send_error(rkey, msg.id, "bad_request", f"expected an infer message, got {msg.kind!r}")
            return
        if self._stop_at is not None and self._stop_at < now - 0.5:
            self._send_error(rkey, msg.id, "shutdown", "this worker is shutting down")
            return
        self._queue.append(_Job(rkey, msg, self._clock.to_local(deadline_b), now, received_b))

    def _send_error(self, rkey: bytes, rid: str, code: str, message: str) -> None:
        frames = P.encode(P.error(rid, code, message, worker=self.name))
        self._send([W.ctl(W.REPLY, rkey, (code, None, 0)), *frames])

    # -- batching and computing ---------------------------------------------------------------
    def _reply_error(self, job: _Job, code: str, message: str) -> None:
        self._send_error(job.rkey, job.msg.id, code, message)

    def _take_batch(self) -> list[_Job]:
        """The next batch: the oldest request and others of the same bundle and cut (may be [])."""
        cfg = self.config
        first = self._queue.popleft()
        if first.load is not None:
            self._load_bundle(first.load)
            return []
        if not self._prepare(first):
            return []
        loaded = self._loaded[first.msg.bundle]
        if not loaded.batchable[first.msg.cut] or cfg.max_batch <= 1 or first.samples >= cfg.max_batch:
            return [first]
        batch, samples = [first], first.samples
        window_end = first.arrived + cfg.max_queue_delay_ms / 1e3
        key = (first.msg.bundle, first.msg.cut)
        # Wait for batch-mates only while several clients are sending this key: a lone client
        # would only wait out the window for a request that comes after its answer.
        t_wait = time.monotonic()
        may_wait = self._crowded.get(key, 0.0) > t_wait
        while samples < cfg.max_batch:
            job = None
            for i, j in enumerate(self._queue):
                if j.msg is not None and (j.msg.bundle, j.msg.cut) == key:
                    job = j
                    del self._queue[i]
                    break
            if job is None:
                left = window_end - time.monotonic()
                if left <= 0 or not may_wait or self._stop_at is not None:
                    break
                self._receive(left)
                continue
            if not self._prepare(job):
                continue
            if samples + job.samples > cfg.max_batch:
                self._queue.appendleft(job)  # the next batch; already decoded
                break
            batch.append(job)
            samples += job.samples
        now = time.monotonic()
        first.batch_wait_ms = (now - t_wait) * 1e3 if may_wait else 0.0
        if len(batch) > 1:
            self._crowded[key] = now + self.CROWD_MEMORY_S
        return batch

    def _prepare(self, job: _Job) -> bool:
        """Check `job` against its bundle and decode its tensors; on failure, answer it and return False."""
        if job.arrays is not None:
            return True
        msg = job.msg
        job.t_start = time.monotonic()
        try:
            if job.deadline is not None and job.t_start >= job.deadline:
                raise _Failure("deadline", "the deadline passed while the request was queued")
            loaded = self._loaded.get(msg.bundle) or self._load_bundle(msg.bundle)
            if loaded is None:
                raise _Failure("unknown_bundle", f"this worker cannot load bundle {msg.bundle[:64]!r}")
            n = loaded.bundle.num_segments
            if not 0 <= msg.cut < n:
                raise _Failure("bad_cut", f"cut {msg.cut} is outside 0..{n - 1} for bundle {loaded.bundle.name}")
            P.check_tensors(msg, loaded.bundle.cut(msg.cut).specs)
            spec = msg.meta.get("reply_codec", "raw")
            if not isinstance(spec, str) or self._codec(spec) is None:
                raise _Failure("bad_request", f"unknown reply_codec {str(spec)[:40]!r}")
            t = time.perf_counter()
            job.arrays = {name: decode_tensor(enc) for name, enc in msg.tensors.items()}
            job.decode_ms = (time.perf_counter() - t) * 1e3
            if loaded.batchable[msg.cut]:
                job.samples = int(next(iter(job.arrays.values())).shape[0]) if job.arrays else 1
        except _Failure as exc:
            self._reply_error(job, exc.code, str(exc))
            return False
        except (ProtocolError, CodecError) as exc:
            self._reply_error(job, "bad_request", str(exc))
            return False
        return True

    def _codec(self, spec: str):
        c = self._codecs.get(spec)
        if c is None and len(self._codecs) < 64:
            try:
                c = self._codecs[spec] = get_codec(spec)
            except (CodecError, ConfigError, ValueError):
                return None
        return c

    def _load_bundle(self, bid: str) -> _Loaded | None:
        if bid in self._loaded:
            return self._loaded[bid]
        if bid not in self.repository:
            self._scan()
            self._version += 1  # announce what the rescan found
            if bid not in self.repository:
                return None
        t = time.perf_counter()
        try:
            loaded = _Loaded(self.repository.load(bid), self.runner, self._threads())
        except (BundleError, BackendError, ConfigError) as exc:
            log.error("%s: cannot load bundle %s: %s", self.name, bid[:12], exc)
            return None
        if self.config.profile_on_load:
            try:
                loaded.measure(self.device)
            except (EdgeSplitError, ValueError, TypeError) as exc:
                log.warning("%s: could not profile %s: %s", self.name, loaded.bundle.name, exc)
        if self.device != "cpu" and loaded.runner_name == "ort-cpu":
            log.warning("%s: asked for %s but %s runs on the CPU (no usable GPU runner: pip install "
                        "'edgesplit[gpu]' or '[trt]')", self.name, self.device, loaded.bundle.name)
        self._loaded[bid] = loaded
        self._version += 1
        log.info("%s: loaded %s (%s) in %.0f ms", self.name, loaded.bundle.name, loaded.runner_name,
                 (time.perf_counter() - t) * 1e3)
        return loaded

    def _threads(self) -> int | None:
        return self.config.intra_op_threads

    def _run_batch(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if job.deadline is not None and now >= job.deadline:
                self._reply_error(job, "deadline", "the deadline passed before the request could be computed")
            else:
                live.append(job)
        if not live:
            return
        first = live[0].msg
        loaded = self._loaded[first.bundle]
        names = list(live[0].arrays)
        t = time.perf_counter()
        try:
            if len(live) == 1:
                feeds = live[0].arrays
            else:
                feeds = {n: np.concatenate([j.arrays[n] for j in live], axis=0) for n in names}
            outs = loaded.run(first.cut, feeds)
        except (BackendError, ValueError) as exc:
            if len(live) > 1:  # one bad request must not fail its batch-mates: run each alone
                for job in live:
                    self._run_batch([job])
                return
            self._reply_error(live[0], "internal", f"the tail failed: {exc}")
            return
        compute_ms = (time.perf_counter() - t) * 1e3
        offset = 0
        for i, job in enumerate(live):
            t = time.perf_counter()
            if len(live) == 1:
                mine = outs
            else:
                mine = {n: a[offset:offset + job.samples] for n, a in outs.items()}
                offset += job.samples
            try:
                codec = self._codec(job.msg.meta.get("reply_codec", "raw"))
                tensors = {n: codec.encode(np.ascontiguousarray(a)) for n, a in mine.items()}
            except (CodecError, ValueError) as exc:
                self._reply_error(job, "internal", f"cannot encode the outputs: {exc}")
                continue
            encode_ms = (time.perf_counter() - t) * 1e3
            # broker receipt to the start of decoding, socket buffers included
            queue_ms = max(0.0, (job.t_start - self._clock.to_local(job.received)) * 1e3)
            timings = {"queue_ms": round(queue_ms, 4), "decode_ms": round(job.decode_ms, 4),
                       "compute_ms": round(compute_ms, 4), "encode_ms": round(encode_ms, 4)}
            frames = P.encode(P.result(job.msg.id, tensors, timings=timings, worker=self.name, batch=len(live),
                                       batch_wait_ms=round(live[0].batch_wait_ms, 4)))
            stats = ("ok", [queue_ms, job.decode_ms, compute_ms, encode_ms], len(live) if i == 0 else 0)
            self._send([W.ctl(W.REPLY, job.rkey, stats), *frames])
