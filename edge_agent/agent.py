"""EdgeAgent: run the head on the device, ship the cut to a live cloud server, never lose a request.

Threads (all named ``edgesplit-agent-*``, all joined by close()):

* the caller (``infer``) or one head thread (``submit``/``infer_async``) runs segments [0, k)
  and encodes the cut tensors;
* one I/O thread owns every ZeroMQ socket (two DEALERs per server: requests, and control =
  hello + pings): it sends requests, reads replies, pings the servers, watches deadlines and
  reconnects. It alone decides whether a request is still waiting for the cloud, so a request
  is answered exactly once: when it gives up on the cloud it forgets the request first, and a
  later cloud reply is dropped as late;
* local worker thread(s) finish requests on the device when the cloud cannot.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import logging
import os
import random
import secrets
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import zmq

from edgesplit.bundle import Bundle
from edgesplit.errors import (
    CodecError,
    ConfigError,
    DeadlineExceeded,
    EdgeSplitError,
    LinkDownError,
    ProtocolError,
    RemoteError,
    UserError,
)

from edge_agent._local import LocalModel, bind_shapes
from edge_agent.config import AgentConfig

__all__ = ["EdgeAgent", "InferenceResult", "LinkStats", "ServerStats"]

log = logging.getLogger("edge_agent")


@dataclass(frozen=True)
class InferenceResult:
    """One answer.

    Attributes:
        outputs: the model's outputs by name.
        where: "cloud" (the tail ran on a server) or "local" (it ran on this device).
        cut: the cut used (segments [0, cut) ran on the device first).
        timings: milliseconds: head, encode, network, tail, total (+ queue, decode when cloud).
            For "cloud", network is the round trip minus the server's own time, and tail is
            the server's compute time; for "local", network is the time spent waiting for a
            cloud answer that did not come (0 if none was tried).
        server: the address that answered ("cloud"), else None.
        reason: why a "local" answer is local (e.g. "link down", "deadline"), else None.
    """

    outputs: dict[str, np.ndarray]
    where: str
    cut: int
    timings: dict[str, float]
    server: str | None = None
    reason: str | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass(frozen=True)
class ServerStats:
    """What the link monitor knows about one server."""

    address: str
    state: str  # "up", "connecting", "down", "banned"
    rtt_ms: float | None
    load: dict
    in_flight: int
    holds_bundle: bool | None


@dataclass(frozen=True)
class LinkStats:
    """Estimates from real traffic, and the counters of what happened so far."""

    rtt_ms: float | None
    bandwidth_bps: float | None
    cut: int | None
    servers: tuple[ServerStats, ...]
    counters: dict[str, int]


class _Request:
    __slots__ = ("id", "seq", "feeds", "binding", "batch", "future", "t0", "deadline", "cloud_deadline",
                 "cut", "cut_tensors", "encoded", "bytes_up", "timings", "server", "sent_at",
                 "attempts", "waited_ms", "done", "lock", "sent_to")

    def __init__(self, rid: str, seq: int, feeds, binding, batch: int, deadline: float):
        self.id = rid
        self.seq = seq
        self.feeds = feeds
        self.binding = binding
        self.batch = batch
        self.future: Future = Future()
        self.t0 = time.perf_counter()
        self.deadline = deadline          # monotonic (perf_counter) seconds
        self.cloud_deadline = deadline    # when the I/O thread stops waiting for the cloud
        self.cut = 0
        self.cut_tensors: dict[str, np.ndarray] | None = None
        self.encoded: dict | None = None
        self.bytes_up = 0
        self.timings = {"head": 0.0, "encode": 0.0, "network": 0.0, "tail": 0.0}
        self.server: _Server | None = None
        self.sent_at = 0.0
        self.attempts = 0
        self.sent_to: set[int] = set()    # servers this request went to: only they may answer it
        self.waited_ms = 0.0
        self.done = False
        self.lock = threading.Lock()


class _Server:
    def __init__(self, address: str, index: int):
        self.address = address
        self.index = index
        self.state = "down"
        # Two connections per server: `sock` carries requests and replies, `ctrl` the hello and
        # the pings. A big request on a slow link then never holds a pong back, so silence on
        # `ctrl` means the link is gone, not that it is busy.
        self.sock: zmq.Socket | None = None
        self.ctrl: zmq.Socket | None = None
        self.monitors: list[zmq.Socket] = []
        self.last_seen = 0.0
        self.next_ping = 0.0
        self.probe_deadline = 0.0
        self.next_attempt = 0.0
        self.backoff_ms = 0.0
        self.banned_until = 0.0
        self.ban_ms = 0.0
        self.held: bool | None = None
        self.profile: dict | None = None
        self.load: dict = {}
        self.rtt_ms: float | None = None
        self.inflight: dict[str, _Request] = {}
        self.pings: dict[str, float] = {}
        self.handshake_failed = False


class EdgeAgent:
    """Runs a bundle's head on this device and its tail on a pool of cloud servers.

    Args:
        bundle: a Bundle or the path of a bundle directory.
        servers: broker addresses ("tcp://host:port"); requests go to a live one.
        runner: the device backend: "auto" (the fastest available; see ``runner_name``),
            "ort-cpu", "ort-cuda", "ort-trt" or "trt".
        codec: how the cut tensors travel ("raw", "fp16", "int8", "int8+zstd", ...).
        cut: a cut index 0..n-1 (segments [0, cut) run here), or "auto".
        config: timeouts, heartbeats, retries, fallback policy (AgentConfig).

    Use as a context manager, or call close(); it leaves no thread or socket behind.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, servers: Sequence[str] | str = (),
                 runner: str = "auto", codec: str = "int8+zstd", cut: int | str = "auto",
                 config: AgentConfig | None = None):
        from edgesplit import codecs, protocol  # noqa: F401  (fail early if they are missing)

        self._codecs = codecs
        self._protocol = protocol
        self.config = cfg = config if config is not None else AgentConfig()
        if not isinstance(cfg, AgentConfig):
            raise ConfigError(f"config must be an AgentConfig, got {type(cfg).__name__}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        n = self.bundle.num_segments
        if isinstance(servers, str):
            servers = [servers]
        self.servers = tuple(servers)
        for a in self.servers:
            if not isinstance(a, str) or "://" not in a:
                raise ConfigError(f"server address {a!r} is not like tcp://host:port")
        if cut == "auto":
            self._fixed_cut: int | None = None
        elif isinstance(cut, int) and not isinstance(cut, bool) and 0 <= cut <= n - 1:
            self._fixed_cut = cut
        else:
            raise ConfigError(f"cut must be 'auto' or an integer in 0..{n - 1} for {self.bundle.name}, got {cut!r}")
        self.codec_spec = codec
        self._codec = codecs.get_codec(codec)
        self._calibration = self.bundle.get("calibration") or {}

        self._local = LocalModel(self.bundle, runner, cfg.intra_op_threads)
        if cfg.profile_runs:
            edge_ms = self._local.profile(cfg.profile_runs)
        else:
            edge_ms = [1.0] * n
        self.runner_name = self._local.runner_name
        log.info("edge runner: %s (asked for %r)", self.runner_name, runner)
        self._edge_ms = edge_ms
        # cut="auto": the planning layer's cost model, hysteresis chooser and link estimator
        from edgesplit.planning import ChooserConfig, CostModel, CutChooser, LinkEstimator

        self._cost_model_cls = CostModel
        self._link = LinkEstimator(alpha=cfg.ewma_alpha, min_transfer_s=cfg.min_transfer_ms / 1e3)
        self._cost = CostModel.from_bundle(self.bundle, edge_ms, None, codec=codec, reply_codec=cfg.reply_codec,
                                           cloud_speedup=cfg.cloud_speedup)
        self._chooser = CutChooser(self._cost, config=ChooserConfig(
            margin=cfg.auto_hysteresis, patience=cfg.auto_patience, assumed_bandwidth_bps=cfg.assumed_bandwidth_bps))
        self._auto_count = 0

        self._tag = secrets.token_hex(4)
        self._seq = itertools.count(1)
        self._max_seq = 0
        self._counters = collections.Counter()
        self._counter_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(cfg.max_in_flight)
        self._outstanding = 0
        self._idle = threading.Condition()
        self._closed = False
        self._close_lock = threading.Lock()

        # I/O thread state (touched only by that thread, except the snapshot in link_stats()).
        self._srv = [_Server(a, i) for i, a in enumerate(self.servers)]
        self._pending: dict[str, _Request] = {}
        self._timers: list[tuple[float, int, _Request]] = []
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cmds: collections.deque = collections.deque()
        self._eligible = False       # some server is up, holds the bundle and is not banned
        self._io_alive = True
        self._ping_ids = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._became_eligible = threading.Event()

        self._head_pool = ThreadPoolExecutor(1, thread_name_prefix="edgesplit-agent-head")
        self._local_pool = ThreadPoolExecutor(cfg.local_workers, thread_name_prefix="edgesplit-agent-local")
        self._ctx = zmq.Context()
        self._io = threading.Thread(target=self._io_main, name="edgesplit-agent-io", daemon=True)
        self._io.start()
        if self.servers and cfg.connect_timeout_ms > 0:
            if not self._became_eligible.wait(cfg.connect_timeout_ms / 1e3):
                log.warning("no server of %s answered within %.0f ms; answering locally until one does",
                            ", ".join(self.servers), cfg.connect_timeout_ms)

    # ------------------------------------------------------------------ public API

    def infer(self, feeds: Mapping[str, np.ndarray], deadline_ms: float | None = None) -> InferenceResult:
        """Run the model on `feeds` and return one answer (cloud or local)."""
        req = self._admit(feeds, deadline_ms, copy=False, block=True)
        self._run_head(req)
        return req.future.result()

    def submit(self, feeds: Mapping[str, np.ndarray], deadline_ms: float | None = None) -> Future:
        """Start a request and return a Future of its InferenceResult.

        Up to ``config.max_in_flight`` requests may be pending at once (then submit blocks), so a
        camera loop keeps several frames in flight. The arrays are copied; reuse them freely.
        """
        req = self._admit(feeds, deadline_ms, copy=True, block=True)
        self._head_pool.submit(self._run_head, req)
        return req.future

    async def infer_async(self, feeds: Mapping[str, np.ndarray],
                          deadline_ms: float | None = None) -> InferenceResult:
        """The asyncio face of infer(): same arguments, same answer."""
        req = self._admit(feeds, deadline_ms, copy=True, block=False)
        if req is None:  # every slot busy: wait for one without blocking the event loop
            got = asyncio.get_running_loop().run_in_executor(None, self._slots.acquire)
            try:
                await asyncio.shield(got)
            except asyncio.CancelledError:
                # the slot will still be acquired in the executor: hand it back then
                got.add_done_callback(lambda f: self._slots.release() if not f.cancelled() else None)
                raise
            try:
                req = self._admit(feeds, deadline_ms, copy=True, block=None)
            except BaseException:
                self._slots.release()
                raise
        self._head_pool.submit(self._run_head, req)
        return await asyncio.wrap_future(req.future)

    def link_stats(self) -> LinkStats:
        """RTT and bandwidth EWMAs from real traffic, each server's state, and counters."""
        now = time.perf_counter()
        servers = []
        for s in self._srv:
            state = "banned" if s.state == "up" and s.banned_until > now else s.state
            servers.append(ServerStats(s.address, state, s.rtt_ms, dict(s.load), len(s.inflight), s.held))
        with self._counter_lock:
            counters = dict(self._counters)
        rtt = self._link.rtt_s
        return LinkStats(rtt * 1e3 if rtt is not None else None, self._link.bandwidth_bps,
                         self._fixed_cut if self._fixed_cut is not None else self._chooser.cut,
                         tuple(servers), counters)

    @property
    def cut(self) -> int | str:
        """The fixed cut, or "auto"."""
        return "auto" if self._fixed_cut is None else self._fixed_cut

    def predicted_ms(self, batch: int = 1) -> dict[int, float]:
        """The cost model's latency per cut 0..n (n = all on the device) with the current estimates."""
        bw, rtt, wait = self._estimates()
        model = self._cost if batch == 1 else self._cost_model_cls.from_bundle(
            self.bundle, self._cost.edge_ms, self._cost.cloud_ms, codec=self.codec_spec,
            reply_codec=self.config.reply_codec, batch=batch)
        return {c.cut: c.total_ms for c in model.costs(bw, rtt / 1e3, wait / 1e3)}

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until some server can take requests; False on timeout."""
        return self._became_eligible.wait(timeout_s)

    def is_connected(self) -> bool:
        return self._eligible and self._io_alive

    def close(self) -> None:
        """Let requests in flight finish (up to config.close_timeout_ms), then stop every thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._head_pool.shutdown(wait=True)
        end = time.monotonic() + self.config.close_timeout_ms / 1e3
        with self._idle:
            while self._outstanding and time.monotonic() < end:
                self._idle.wait(max(0.0, end - time.monotonic()))
        self._post(("stop", None))
        self._io.join()
        self._local_pool.shutdown(wait=True)
        self._local.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> "EdgeAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EdgeAgent({self.bundle.name!r}, servers={list(self.servers)}, cut={self.cut!r}, "
                f"runner={self.runner_name!r}, codec={self.codec_spec!r})")

    # ------------------------------------------------------------------ request path (caller / head thread)

    def _count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self._counters[key] += n

    def _admit(self, feeds, deadline_ms, copy: bool, block: bool | None) -> _Request | None:
        if self._closed:
            raise EdgeSplitError("the agent is closed")
        if not isinstance(feeds, Mapping):
            raise UserError(f"feeds must be a dict of name -> numpy array, got {type(feeds).__name__}")
        binding = bind_shapes(self.bundle.inputs, feeds, f"{self.bundle.name} inputs")
        if deadline_ms is None:
            deadline_ms = self.config.deadline_ms
        elif not isinstance(deadline_ms, (int, float)) or not deadline_ms > 0:
            raise UserError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
        if block is not None and not self._slots.acquire(blocking=block):
            return None
        feeds = {k: (np.array(v, copy=True) if copy else v) for k, v in feeds.items()}
        first = self.bundle.inputs[0].shape
        batch = feeds[self.bundle.inputs[0].name].shape[0] if first and not isinstance(first[0], int) else 1
        seq = next(self._seq)
        self._max_seq = seq
        req = _Request(f"{self._tag}-{seq}", seq, feeds, binding, batch,
                       time.perf_counter() + deadline_ms / 1e3)
        with self._idle:
            self._outstanding += 1
        return req

    def _estimates(self) -> tuple[float, float, float]:
        """(bandwidth bps, RTT ms, the least server wait ms), assumed values before any traffic."""
        bw = self._link.bandwidth_bps or self.config.assumed_bandwidth_bps
        rtt = (self._link.rtt_s or 0.0) * 1e3
        waits = [float(s.load.get("est_wait_ms") or 0.0) for s in self._srv if s.state == "up"]
        return bw, rtt, (min(waits) if waits else 0.0)

    def _choose_cut(self, req: _Request) -> int:
        if self._fixed_cut is not None:
            return self._fixed_cut
        n = self.bundle.num_segments
        bw, rtt, wait = self._estimates()
        k = self._chooser.update(bw, rtt / 1e3, wait / 1e3)
        if k == n:
            self._auto_count += 1
            if self._eligible and self._auto_count % self.config.auto_probe_every == 0:
                # everything runs here: send one request to the cloud now and then, so the
                # bandwidth estimate stays fresh and the chooser can see the link got better
                costs = self._cost.costs(bw, rtt / 1e3, wait / 1e3, allowed=range(n))
                k = min(costs, key=lambda c: c.total_ms).cut
        return k

    def _run_head(self, req: _Request) -> None:
        try:
            if req.future.cancelled():
                self._finish(req, exc=CancelledError())
                return
            n = self.bundle.num_segments
            k = req.cut = self._choose_cut(req)
            t = time.perf_counter()
            cut_tensors = self._local.run(req.feeds, 0, k)
            req.timings["head"] = (time.perf_counter() - t) * 1e3
            req.feeds = None
            req.cut_tensors = cut_tensors
            if k == n:
                self._finish_local(req, "cut=auto chose the device")
                return
            if not (self._eligible and self._io_alive):
                if self.config.fallback == "local":
                    self._count("local_link_down")
                    self._finish_local(req, "link down")
                    return
                if self.config.fallback == "error":
                    raise LinkDownError(f"no live server among {', '.join(self.servers) or '(none given)'}")
            t = time.perf_counter()
            enc = {name: self._encode(name, arr) for name, arr in cut_tensors.items()}
            req.timings["encode"] = (time.perf_counter() - t) * 1e3
            req.encoded = enc
            req.bytes_up = sum(e.nbytes for e in enc.values())
            if self._fixed_cut is None:
                self._cost.observe_edge(k, req.timings["head"] / max(1, req.batch))
            tail_ms = sum(self._edge_ms[k:]) * req.batch
            if self.config.fallback == "local":
                req.cloud_deadline = req.deadline - (tail_ms + self.config.fallback_margin_ms) / 1e3
            self._post(("send", req))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            self._finish(req, exc=exc)

    def _encode(self, name: str, arr: np.ndarray):
        # The codec leaves non-float tensors (ids, masks) exact by itself.
        cal = self._calibration.get(name) if isinstance(self._calibration, dict) else None
        return self._codec.encode(arr, calibration=cal)

    def _finish_local(self, req: _Request, reason: str) -> None:
        """Run segments [cut, n) on the device and answer (in the calling thread)."""
        try:
            n = self.bundle.num_segments
            t = time.perf_counter()
            if req.cut_tensors is None:
                raise EdgeSplitError(f"request {req.id} has no head output to finish locally")
            out = self._local.run(req.cut_tensors, req.cut, n)
            req.timings["tail"] = (time.perf_counter() - t) * 1e3
            req.timings["network"] = req.waited_ms
            self._finish(req, InferenceResult(out, "local", req.cut, self._total(req), None, reason))
        except BaseException as exc:  # noqa: BLE001
            self._finish(req, exc=exc)

    def _total(self, req: _Request) -> dict[str, float]:
        t = dict(req.timings)
        t["total"] = (time.perf_counter() - req.t0) * 1e3
        return t

    def _finish(self, req: _Request, result: InferenceResult | None = None, exc: BaseException | None = None) -> bool:
        with req.lock:
            if req.done:
                return False
            req.done = True
        req.cut_tensors = req.encoded = req.feeds = None
        try:
            if exc is not None:
                self._count("errors")
                req.future.set_exception(exc)
            else:
                self._count(result.where)
                req.future.set_result(result)
        except InvalidStateError:  # the caller cancelled the future (or its asyncio task)
            self._count("cancelled")
        self._slots.release()
        with self._idle:
            self._outstanding -= 1
            if not self._outstanding:
                self._idle.notify_all()
        return True

    # ------------------------------------------------------------------ I/O thread

    def _post(self, cmd) -> None:
        self._cmds.append(cmd)
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        if not self._io_alive and cmd[0] == "send":
            self._drain_dead()

    def _drain_dead(self) -> None:
        # The I/O thread is gone: whatever is still queued is finished here.
        while True:
            try:
                op, req = self._cmds.popleft()
            except IndexError:
                return
            if op == "send":
                self._give_up_cloud(req, "agent I/O stopped", LinkDownError("the agent's I/O thread stopped"))

    def _io_main(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        self._poller = poller
        now = time.perf_counter()
        for s in self._srv:
            s.next_attempt = now
        try:
            timeout = 0.0
            while True:
                events = dict(poller.poll(max(0, math.ceil(timeout * 1e3))))
                # Messages first, timers after: after a stall (a busy CPU) the pongs waiting in
                # the sockets prove the servers alive before the silence check runs.
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if self._process_commands():
                    break
                for s in self._srv:
                    for mon in s.monitors:
                        if mon in events:
                            self._read_monitor(s, mon)
                    for sock in (s.ctrl, s.sock):
                        if sock is not None and sock in events:
                            self._read_socket(s, sock)
                timeout = self._run_timers(time.perf_counter())
        except Exception:  # noqa: BLE001 - a bug here must not strand requests
            log.exception("edge agent I/O thread failed; finishing every request on the device")
        finally:
            self._io_alive = False
            self._eligible = False
            for req in list(self._pending.values()):
                self._forget(req)
                self._give_up_cloud(req, "agent stopped", EdgeSplitError("the agent was closed"))
            while self._waiting:
                self._give_up_cloud(self._waiting.popleft(), "agent stopped", EdgeSplitError("the agent was closed"))
            self._drain_dead()
            for s in self._srv:
                self._close_socket(s)
            self._ctx.term()

    def _process_commands(self) -> bool:
        while True:
            try:
                op, req = self._cmds.popleft()
            except IndexError:
                return False
            if op == "stop":
                return True
            if op == "send":
                self._dispatch(req)

    # --- sockets

    def _dealer(self, s: _Server, hwm: int) -> zmq.Socket:
        cfg = self.config
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(cfg.heartbeat_interval_ms)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(cfg.zmq_heartbeat_timeout_ms)))
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(6553599, max(100, int(cfg.heartbeat_ttl_ms))))
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(cfg.reconnect_initial_ms)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, int(cfg.reconnect_max_ms)))
        if cfg.curve_server_key:
            sock.curve_serverkey = _key(cfg.curve_server_key)
            sock.curve_publickey = _key(cfg.curve_public_key)
            sock.curve_secretkey = _key(cfg.curve_secret_key)
        mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(s.address)
        s.monitors.append(mon)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(mon, zmq.POLLIN)
        return sock

    def _open_socket(self, s: _Server) -> None:
        s.sock = self._dealer(s, self.config.send_hwm)
        s.ctrl = self._dealer(s, 64)

    def _close_socket(self, s: _Server) -> None:
        for sock in (s.sock, s.ctrl):
            if sock is None:
                continue
            self._poller.unregister(sock)
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            sock.close(linger=0)
        for mon in s.monitors:
            self._poller.unregister(mon)
            mon.close(linger=0)
        s.sock = s.ctrl = None
        s.monitors = []
        s.pings.clear()

    def _send(self, s: _Server, frames, sock: zmq.Socket | None = None) -> bool:
        try:
            (sock or s.sock).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _probe(self, s: _Server, now: float) -> None:
        """A reconnect attempt: fresh socket, hello (learn held/profile) and ping."""
        self._open_socket(s)
        s.state = "connecting"
        s.probe_deadline = now + self.config.probe_timeout_ms / 1e3
        P = self._protocol
        self._send(s, P.encode(P.hello(f"h{next(self._ping_ids)}", bundle=self.bundle.id)), s.ctrl)
        self._ping(s, now, measure=False)  # its RTT includes connection setup: not a sample

    def _ping(self, s: _Server, now: float, measure: bool = True) -> None:
        pid = f"p{next(self._ping_ids)}"
        if self._send(s, self._protocol.encode(self._protocol.ping(pid)), s.ctrl) and measure:
            s.pings[pid] = now
        if len(s.pings) > 64:  # pongs that never came
            for k in sorted(s.pings, key=s.pings.get)[:32]:
                del s.pings[k]
        s.next_ping = now + self.config.heartbeat_interval_ms / 1e3

    def _set_up(self, s: _Server, now: float) -> None:
        if s.state != "up":
            log.info("server %s is up%s", s.address,
                     "" if s.held is not False else " but does not hold this bundle")
            s.state = "up"
            s.backoff_ms = 0.0
            s.handshake_failed = False
            s.next_ping = now  # a first RTT sample right away (the probe's own ping is not one)
        self._update_eligible(now)

    def _set_down(self, s: _Server, now: float, reason: str) -> None:
        was_up = s.state == "up"
        self._close_socket(s)
        cfg = self.config
        if was_up:
            log.warning("server %s is down (%s)", s.address, reason)
            self._count("link_down")
            s.backoff_ms = 0.0
        s.backoff_ms = (cfg.reconnect_initial_ms if not s.backoff_ms
                        else min(s.backoff_ms * cfg.reconnect_multiplier, cfg.reconnect_max_ms))
        delay = s.backoff_ms * (1 + cfg.reconnect_jitter * (2 * random.random() - 1))
        s.state = "down"
        s.next_attempt = now + delay / 1e3
        self._update_eligible(now)
        self._reroute_all(s, now, reason)

    def _update_eligible(self, now: float) -> None:
        ok = any(self._usable(s, now) for s in self._srv)
        self._eligible = ok
        if ok:
            self._became_eligible.set()
            while self._waiting:
                self._dispatch(self._waiting.popleft())
        else:
            self._became_eligible.clear()

    @staticmethod
    def _usable(s: _Server, now: float) -> bool:
        # A broker whose pong says it has no live worker could only hold our requests until
        # their deadline: it is up, but it gets none.
        return (s.state == "up" and s.held is not False and s.banned_until <= now
                and s.load.get("workers", 1) != 0)

    def _ban(self, s: _Server, now: float, reason: str) -> None:
        cfg = self.config
        s.ban_ms = cfg.ban_initial_ms if not s.ban_ms else min(s.ban_ms * 2, cfg.ban_max_ms)
        s.banned_until = now + s.ban_ms / 1e3
        self._count("bad_replies")
        log.warning("bad reply from %s: %s; no requests to it for %.0f ms", s.address, reason, s.ban_ms)
        self._update_eligible(now)
        self._reroute_all(s, now, f"bad reply from {s.address}")

    # --- timers

    def _run_timers(self, now: float) -> float:
        """Fire due timers; return seconds until the next one."""
        cfg = self.config
        ivl = cfg.heartbeat_interval_ms / 1e3
        nxt = now + ivl
        # 5 % early, so that the wake-up latency of this loop still lands within the promise
        # "loss detected within heartbeat_misses intervals"
        silent_limit = ivl * cfg.heartbeat_misses * 0.95
        for s in self._srv:
            if s.state == "up":
                if now - s.last_seen > silent_limit:
                    self._read_waiting(s)  # something came in meanwhile: read it before judging
                if s.state == "up" and now - s.last_seen > silent_limit:
                    self._set_down(s, now, f"no heartbeat for {(now - s.last_seen) * 1e3:.0f} ms")
                elif s.state == "up":
                    if now >= s.next_ping:
                        self._ping(s, now)
                    nxt = min(nxt, s.next_ping, s.last_seen + silent_limit + 1e-4)
                    if s.banned_until > now:
                        nxt = min(nxt, s.banned_until)
                    elif s.banned_until:
                        s.banned_until = 0.0
                        self._update_eligible(now)
            if s.state == "connecting":
                if now >= s.probe_deadline:
                    self._read_waiting(s)
                if s.state == "connecting" and now >= s.probe_deadline:
                    self._set_down(s, now, "no answer to the reconnect probe")
                else:
                    nxt = min(nxt, s.probe_deadline)
            if s.state == "down":
                if now >= s.next_attempt:
                    self._probe(s, now)
                    nxt = min(nxt, s.probe_deadline)
                else:
                    nxt = min(nxt, s.next_attempt)
        while self._timers and self._timers[0][0] <= now:
            _, _, req = heapq.heappop(self._timers)
            if req.id in self._pending and req.cloud_deadline <= now:
                self._cancel_remote(req)
                self._forget(req)
                self._count("deadline_missed")
                log.debug("request %s missed its cloud deadline", req.id)
                self._give_up_cloud(req, "deadline", DeadlineExceeded(f"request {req.id}: no answer in time"))
        for req in [r for r in self._waiting if r.deadline <= now]:
            self._waiting.remove(req)
            self._give_up_cloud(req, "deadline", DeadlineExceeded(f"request {req.id}: no server came back in time"))
        if self._timers:
            nxt = min(nxt, self._timers[0][0])
        if self._waiting:
            nxt = min(nxt, min(r.deadline for r in self._waiting))
        return nxt - time.perf_counter()

    # --- requests

    def _pick(self, now: float, exclude: _Server | None = None) -> _Server | None:
        best = None
        for s in self._srv:
            if s is exclude or not self._usable(s, now):
                continue
            key = (len(s.inflight) + float(s.load.get("est_wait_ms") or 0.0) / 10.0, s.index)
            if best is None or key < best[0]:
                best = (key, s)
        return best[1] if best else None

    def _dispatch(self, req: _Request, exclude: _Server | None = None) -> None:
        if req.done:
            return
        now = time.perf_counter()
        s = self._pick(now, exclude)
        if s is None:
            self._no_server(req)
            return
        remaining_ms = (req.cloud_deadline - now) * 1e3
        if remaining_ms <= 0:
            self._count("deadline_missed")
            self._give_up_cloud(req, "deadline", DeadlineExceeded(f"request {req.id}: no time left for the cloud"))
            return
        P = self._protocol
        try:
            frames = P.encode(P.infer(req.id, self.bundle.id, req.cut, req.encoded, deadline_ms=remaining_ms,
                                      reply_codec=self.config.reply_codec))
        except ProtocolError as exc:  # nothing a server could answer: finish it here
            log.error("request %s cannot be encoded: %s", req.id, exc)
            self._give_up_cloud(req, "cannot encode", exc)
            return
        if not self._send(s, frames):
            # the send queue is full: the server is not keeping up; try another or give up
            self._count("send_full")
            other = self._pick(now, s)
            if other is None or not self._send(other, frames):
                self._no_server(req)
                return
            s = other
        req.server = s
        req.sent_to.add(s.index)
        req.sent_at = now
        req.attempts += 1
        if req.attempts > 1:
            self._count("resent")
        s.inflight[req.id] = req
        if req.id not in self._pending:
            self._pending[req.id] = req
            heapq.heappush(self._timers, (req.cloud_deadline, req.seq, req))

    def _cancel_remote(self, req: _Request) -> None:
        """Tell the server we no longer want this answer (best effort: it may be computing)."""
        s = req.server
        if s is not None and s.sock is not None and req.id in s.inflight:
            try:
                self._send(s, self._protocol.encode(self._protocol.cancel(req.id)))
            except ProtocolError:
                pass

    def _forget(self, req: _Request) -> None:
        self._pending.pop(req.id, None)
        if req.server is not None:
            req.server.inflight.pop(req.id, None)
            if req.sent_at:
                req.waited_ms += (time.perf_counter() - req.sent_at) * 1e3
                req.sent_at = 0.0

    def _reroute_all(self, s: _Server, now: float, reason: str) -> None:
        for req in list(s.inflight.values()):
            self._reroute(req, s, reason)

    def _reroute(self, req: _Request, failed: _Server, reason: str) -> None:
        """A failed hop: resend to another live server, or finish per the fallback policy."""
        self._forget(req)
        now = time.perf_counter()
        if req.attempts <= self.config.max_resends and req.cloud_deadline > now and self._pick(now, failed):
            self._dispatch(req, exclude=failed)
        else:
            self._no_server(req, reason)

    def _no_server(self, req: _Request, reason: str = "link down") -> None:
        self._forget(req)
        policy = self.config.fallback
        if policy == "wait" and not self._closed:  # held until a server can take it, or its deadline
            self._waiting.append(req)
            return
        self._give_up_cloud(req, reason, LinkDownError(f"request {req.id}: {reason}"))

    def _give_up_cloud(self, req: _Request, reason: str, exc: BaseException) -> None:
        if req.done:
            return
        if self.config.fallback == "local" and req.cut_tensors is not None:
            try:
                self._local_pool.submit(self._finish_local, req, reason)
                return
            except RuntimeError:  # the pool is shut down (closing): finish right here
                self._finish_local(req, reason)
                return
        self._finish(req, exc=exc)

    # --- replies

    def _read_monitor(self, s: _Server, mon: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while mon in s.monitors:
            try:
                ev = recv_monitor_message(mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            event = ev["event"]
            now = time.perf_counter()
            if event == zmq.EVENT_DISCONNECTED:
                self._set_down(s, now, "connection closed")
            elif event & (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                if not s.handshake_failed:  # once, not on every reconnect attempt
                    log.warning("handshake with %s failed: %s", s.address,
                                "the server refused this agent's CURVE key" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                else "the peer does not speak ZMTP with matching security (CURVE keys?)")
                s.handshake_failed = True
                self._count("handshake_failed")
                self._set_down(s, now, "handshake failed")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # usually the connection closed mid-handshake (a proxy whose server is gone)
                log.debug("handshake with %s did not complete", s.address)
                self._set_down(s, now, "handshake did not complete")

    def _read_waiting(self, s: _Server) -> None:
        for sock in (s.ctrl, s.sock):
            if sock is not None and s.sock is not None and sock.poll(0, zmq.POLLIN):
                self._read_socket(s, sock)

    def _read_socket(self, s: _Server, sock: zmq.Socket) -> None:
        P = self._protocol
        for _ in range(256):
            if s.sock is None:  # closed while reading (the server went down)
                return
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.perf_counter()
            s.last_seen = now
            try:
                msg = P.decode(frames, self._limits())
            except ProtocolError as exc:
                self._ban(s, now, f"undecodable message ({exc})")
                continue
            kind = msg.kind
            if kind == "pong":
                sent = s.pings.pop(msg.id, None)
                if sent is not None:
                    rtt = (now - sent) * 1e3
                    s.rtt_ms = rtt if s.rtt_ms is None else s.rtt_ms + self.config.ewma_alpha * (rtt - s.rtt_ms)
                    self._link.observe(0, 0, rtt_s=rtt / 1e3)
                load = msg.meta.get("load")
                if isinstance(load, dict):
                    if load.get("workers", 1) == 0 and s.load.get("workers", 1) != 0:
                        log.warning("server %s has no live worker; not sending it requests", s.address)
                    s.load = load
                self._set_up(s, now)
            elif kind == "welcome":
                held = msg.meta.get("held")
                s.held = bool(held) if held is not None else None
                prof = msg.meta.get("profile")
                if isinstance(prof, dict):
                    s.profile = prof
                    self._set_cloud_profile(prof.get("segment_ms"))
                if isinstance(msg.meta.get("load"), dict):
                    s.load = msg.meta["load"]
                if s.held is False:
                    log.warning("server %s does not hold bundle %s (%s); not sending it requests",
                                s.address, self.bundle.name, self.bundle.id[:12])
                self._set_up(s, now)
            elif kind in ("result", "error"):
                self._on_reply(s, msg, frames, now)
            else:
                log.debug("ignoring a %r message from %s", kind, s.address)

    def _set_cloud_profile(self, segment_ms) -> None:
        """The server told us its per-segment times: price the tail with them from now on."""
        n = self.bundle.num_segments
        if not (isinstance(segment_ms, list) and len(segment_ms) == n
                and all(isinstance(t, (int, float)) and t >= 0 for t in segment_ms)):
            return
        old = self._cost
        model = self._cost_model_cls.from_bundle(self.bundle, old.edge_ms, [float(t) for t in segment_ms],
                                                 codec=self.codec_spec, reply_codec=self.config.reply_codec)
        model.edge_scale = old.edge_scale
        self._cost = self._chooser.model = model

    def _limits(self):
        lim = getattr(self, "_limits_obj", None)
        if lim is None:
            lim = self._limits_obj = self._protocol.Limits()
        return lim

    def _is_ours(self, rid: str) -> bool:
        tag, _, seq = rid.partition("-")
        return tag == self._tag and seq.isdigit() and 0 < int(seq) <= self._max_seq

    def _on_reply(self, s: _Server, msg, frames, now: float) -> None:
        rid = msg.id
        req = self._pending.get(rid)
        if req is None:
            if isinstance(rid, str) and rid.startswith("h"):
                return  # an error answer to hello: a server without the handshake
            if isinstance(rid, str) and self._is_ours(rid):
                self._count("late_replies")
                return
            self._ban(s, now, f"reply for unknown request id {rid!r}")
            return
        if s.index not in req.sent_to:
            self._ban(s, now, f"reply for request {rid}, which was never sent to it")
            return
        if msg.kind == "error":
            self._on_error(s, req, msg, now)
            return
        try:
            self._protocol.check_tensors(msg, self.bundle.outputs)
            t = time.perf_counter()
            outs = {name: self._codecs.decode(enc) for name, enc in msg.tensors.items()}
            bind_shapes(self.bundle.outputs, outs, f"reply to {rid}", bound=req.binding)
            decode_ms = (time.perf_counter() - t) * 1e3
        except (ProtocolError, CodecError, UserError) as exc:
            self._ban(s, now, f"reply to {rid} rejected: {exc}")
            return
        s.ban_ms = 0.0  # a good reply: the next bad one starts the ban over
        rt_ms = (now - req.sent_at) * 1e3 if req.sent_at else 0.0
        req.sent_at = 0.0  # this wait is network time, not time wasted on a failed hop
        self._forget(req)
        st = msg.meta.get("timings") if isinstance(msg.meta.get("timings"), dict) else {}
        srv_ms = {k: float(st.get(k) or 0.0) for k in ("queue_ms", "decode_ms", "compute_ms", "encode_ms")}
        server_total = sum(srv_ms.values())
        network = max(0.0, rt_ms - server_total)
        bytes_down = sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames[1:])
        self._link.observe(req.bytes_up, bytes_down, total_s=network / 1e3)
        if self._fixed_cut is None and srv_ms["compute_ms"] > 0:
            self._cost.observe_cloud(req.cut, srv_ms["compute_ms"] / max(1, req.batch))
        req.timings.update(network=network + req.waited_ms, tail=srv_ms["compute_ms"], queue=srv_ms["queue_ms"],
                           decode=decode_ms)
        self._finish(req, InferenceResult(outs, "cloud", req.cut, self._total(req), s.address, None))

    def _on_error(self, s: _Server, req: _Request, msg, now: float) -> None:
        code = str(msg.meta.get("code", "internal"))
        text = str(msg.meta.get("message", ""))
        self._count(f"remote_{code}")
        err = RemoteError(code, text, msg.meta.get("retry_after_ms"))
        if code == "busy":
            # the server asked for a pause: route around it for that long (not a bad server)
            pause = msg.meta.get("retry_after_ms")
            if isinstance(pause, (int, float)) and 0 < pause < 60_000:
                s.banned_until = max(s.banned_until, now + pause / 1e3)
                self._update_eligible(now)
        if code == "unknown_bundle":
            log.warning("server %s does not hold bundle %s: %s", s.address, self.bundle.id[:12], text)
            s.held = False
            self._update_eligible(now)
        elif code not in RemoteError.RETRYABLE and code != "deadline":
            log.warning("server %s refused request %s: %s", s.address, req.id, err)
        if code == "deadline":
            self._forget(req)
            self._give_up_cloud(req, "deadline", DeadlineExceeded(f"request {req.id}: {text or 'deadline'}"))
        elif err.retryable or code == "unknown_bundle":
            self._reroute(req, s, f"server error {code}")
        else:
            self._forget(req)
            self._give_up_cloud(req, f"server error {code}", err)


def _key(k: str | bytes) -> bytes:
    return k.encode("ascii") if isinstance(k, str) else k
