"""The tail itself: check and decode requests, form dynamic batches, run segments [k, n), encode and reply.

`TailBatcher` knows nothing of sockets: requests come in through `add_request` / `add_load`,
answers go out through the `send(frames)` it was given, and waiting for batch-mates goes
through the optional `wait(timeout_s)` (a worker with its own socket receives meanwhile; a
worker driven from another loop has none and never waits). `TailWorker` owns one.

A pipeline stage (cloud_server.placement) holds only segments [a, b) of a bundle and runs one
hop [k, stop) of a request: its answer is then not a result but the `infer` message of the
next hop, at cut `stop`, encoded with ServerConfig.stage_codec (outcome "hop"). No worker loads
past ServerConfig.worker_memory_bytes of segment weights.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from edgesplit import protocol as P
from edgesplit.bundle import Bundle
from edgesplit.codecs import decode as decode_tensor
from edgesplit.codecs import get_codec
from edgesplit.errors import BackendError, BundleError, CodecError, ConfigError, EdgeSplitError, ProtocolError

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.repository import Repository
from cloud_server.sessions import SessionRefused, SessionStore

__all__ = ["TailBatcher", "LoadedBundle"]

log = logging.getLogger(__name__)


class _Job:
    __slots__ = ("rkey", "msg", "deadline", "arrived", "received", "arrays", "samples", "decode_ms", "t_start",
                 "batch_wait_ms", "load", "stop")

    def __init__(self, rkey: bytes, msg: P.Message | None, deadline: float | None, arrived: float, received: float,
                 load: str | None = None, stop: int | None = None):
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
        # a request: the end of its hop (None: the last segment); a load: the stage (start, stop) or None
        self.stop = stop


# What a hop's request carries on from the edge's (the last stage answers with the edge's reply codec).
_HOP_META = ("reply_codec",)


class _Failure(Exception):
    def __init__(self, code: str, message: str, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason  # a REFUSALS reason for the broker's metrics, or None


class LoadedBundle:
    """A bundle ready to run: one SegmentRunner, so any tail [k, n) reuses the same sessions.

    A stage holds segments [start, stop) only (the whole bundle by default) and runs nothing else.
    """

    def __init__(self, bundle: Bundle, runner: str, threads: int | None, start: int = 0, stop: int | None = None):
        from edgesplit.runtime import SegmentRunner

        self.bundle = bundle
        n = bundle.num_segments
        self.start, self.stop = start, n if stop is None else stop
        self.weight_bytes = bundle.weight_bytes(self.start, self.stop)
        self.segments = SegmentRunner(bundle, runner=runner, intra_op_threads=threads).activate(self.start, self.stop)
        self.batchable = {k: _batch_symbol(bundle, k) is not None for k in range(n)}
        self.budgets: dict[int, int] = {}  # cut -> raw bytes a request may declare (TailBatcher._budget)
        self.profile: dict | None = None

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.bundle.num_segments

    def covers(self, k: int, stop: int) -> bool:
        """Segments [k, stop) are all held here."""
        return self.start <= k and stop <= self.stop

    @property
    def runner_name(self) -> str:
        return self.segments.runner_name

    def run(self, k: int, feeds: dict[str, np.ndarray], stop: int | None = None) -> dict[str, np.ndarray]:
        return self.segments.run(feeds, k, self.bundle.num_segments if stop is None else stop)

    def measure(self, device: str, runs: int = 2) -> None:
        """Per-segment times at batch 1 on zeros (after a warm-up pass): the profile for "welcome".

        A stage times its own segments [start, stop) only (the broker joins the stages' profiles).
        """
        seg = self.segments.profile(runs, start=self.start, stop=self.stop)
        self.profile = {"segment_ms": [round(x, 4) for x in seg], "device": device, "runner": self.runner_name,
                        "batch": 1}

    def close(self) -> None:
        self.segments.close()


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _check_finite(arrays: dict[str, np.ndarray]) -> None:
    """Refuse NaN and infinity in float inputs (min and max propagate both; no temporary array)."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
            raise _Failure("bad_request", f"tensor {name!r} holds NaN or infinity; this server refuses non-finite "
                                          f"inputs (ServerConfig.allow_non_finite)", reason="non_finite")


def _batch_symbol(bundle: Bundle, k: int) -> str | None:
    """The symbol of the shared leading batch dim of cut k's tensors and the outputs, if any."""
    specs = list(bundle.cut(k).specs) + list(bundle.outputs)
    if not specs or not all(s.shape and isinstance(s.shape[0], str) for s in specs):
        return None
    syms = {s.shape[0] for s in specs}
    return syms.pop() if len(syms) == 1 else None


class TailBatcher:
    """The queue of one worker and what it computes; every answer goes out through `send`.

    Args:
        config: the ServerConfig (batching, limits, runner threads, profiling).
        repository: the bundles this worker can load.
        device / runner / name: describe the worker (runner: the kind to load bundles with).
        send: delivers [ctl, *frames] to the broker.
        rescan: called when a request names a bundle the repository did not list (look again).
        to_local: maps a broker monotonic time onto this process's clock.
        stopping: True once the worker is stopping (then no time is spent filling a batch).
    """

    def __init__(self, config: ServerConfig, repository: Repository, device: str, runner: str, name: str,
                 send: Callable[[list], None], rescan: Callable[[], None], to_local: Callable[[float], float],
                 stopping: Callable[[], bool]):
        self.config = config
        self.repository = repository
        self.device, self.runner, self.name = device, runner, name
        self.send = send
        self._rescan, self._to_local, self._stopping = rescan, to_local, stopping
        self.loaded: dict[str, LoadedBundle] = {}
        # bundles that could not load: id -> (when, why); reported in the status, tried again
        # only after rescan_interval_s (a broken bundle must not cost a hash and a load per request)
        self.failed: dict[str, tuple[float, str]] = {}
        self.queue: deque[_Job] = deque()  # received, not yet run (only the serving thread touches it)
        self.version = 0  # bumped when loaded bundles or profiles change: triggers a heartbeat
        self._codecs: dict[str, Any] = {}
        self._crowded: dict[tuple, float] = {}  # (bundle, cut) -> until when to wait for batch-mates
        # stateful sessions: the state of segments [k, n) per session (cloud_server.sessions)
        self.sessions = SessionStore(config.session_idle_s, config.session_memory_bytes, name)
        # park(job) -> True: the job's bundle is not here and is being fetched (the worker sets it)
        self.park: Callable[[_Job], bool] | None = None
        self.memory_budget = config.worker_memory_bytes  # bytes of segment weights held at most (0: no limit)
        self.unfit: set[str] = set()  # bundles not loaded whole because they exceed the budget

    @property
    def weight_bytes(self) -> int:
        """Bytes of segment weights held now (every loaded bundle and stage)."""
        return sum(b.weight_bytes for b in list(self.loaded.values()))

    def holdings(self) -> dict:
        """What the worker's status says this batcher holds: whole bundles and their profiles,
        pipeline stages (with their segments' times), the memory budget and what is over it."""
        loaded = list(self.loaded.items())
        return {"loaded": sorted(b for b, l in loaded if l.whole),
                "profiles": {b: l.profile for b, l in loaded if l.profile and l.whole},
                "stages": {b: [l.start, l.stop, l.profile["segment_ms"] if l.profile else None]
                           for b, l in loaded if not l.whole},
                "memory": [self.memory_budget, self.weight_bytes],
                "unfit": sorted(self.unfit)}  # not loaded whole: over the budget (served as stages)

    # -- what comes in -------------------------------------------------------------------------
    def add_request(self, rkey: bytes, msg: P.Message, deadline: float | None, now: float, received: float,
                    stop: int | None = None) -> None:
        """Queue a request; `stop`: run only the hop [msg.cut, stop) (a pipeline stage)."""
        self.queue.append(_Job(rkey, msg, deadline, now, received, stop=stop))

    def add_load(self, bundle: str, stage: tuple[int, int] | None = None) -> None:
        """Queue loading `bundle` (only segments [start, stop) with `stage`)."""
        self.queue.append(_Job(b"", None, None, time.monotonic(), 0.0, load=bundle, stop=stage))

    def has_requests(self) -> bool:
        return any(j.load is None for j in self.queue)

    def send_error(self, rkey: bytes, rid: str, code: str, message: str, reason: str | None = None,
                   **meta: Any) -> None:
        """Answer a request with an error; `reason` (cloud_server.metrics.REFUSALS) is counted by the broker."""
        frames = P.encode(P.error(rid, code, message, worker=self.name, **meta))
        self.send([W.ctl(W.REPLY, rkey, (code, None, 0, reason)), *frames])

    # -- one step -------------------------------------------------------------------------------
    def step(self, wait: Callable[[float], None] | None = None) -> bool:
        """Run the next job (a batch, or a bundle to load); False when the queue was empty.

        Args:
            wait: receives from the broker for up to that many seconds (batch-mates join the
                queue meanwhile); None never waits.
        """
        if not self.queue:
            return False
        batch = self._take_batch(wait)
        if batch:
            self._run_batch(batch)
        return True

    def _take_batch(self, wait) -> list[_Job]:
        """The next batch: the oldest request and others of the same bundle and cut (may be [])."""
        cfg = self.config
        first = self.queue.popleft()
        if first.load is not None:
            self.load_bundle(first.load, first.stop)
            return []
        if not self._prepare(first):
            return []
        loaded = self.loaded[first.msg.bundle]
        if "session" in first.msg.meta:
            return [first]  # a session step runs alone, on its own state
        if not loaded.batchable[first.msg.cut] or cfg.max_batch <= 1 or first.samples >= cfg.max_batch:
            return [first]
        batch, samples = [first], first.samples
        window_end = first.arrived + cfg.max_queue_delay_ms / 1e3
        key = (first.msg.bundle, first.msg.cut, first.stop)
        # Wait for batch-mates only while several clients are sending this key: a lone client
        # would only wait out the window for a request that comes after its answer.
        t_wait = time.monotonic()
        may_wait = wait is not None and self._crowded.get(key, 0.0) > t_wait
        while samples < cfg.max_batch:
            job = None
            for i, j in enumerate(self.queue):
                if j.msg is not None and (j.msg.bundle, j.msg.cut, j.stop) == key and "session" not in j.msg.meta:
                    job = j
                    del self.queue[i]
                    break
            if job is None:
                left = window_end - time.monotonic()
                if left <= 0 or not may_wait or self._stopping():
                    break
                wait(left)
                continue
            if not self._prepare(job):
                continue
            if samples + job.samples > cfg.max_batch:
                self.queue.appendleft(job)  # the next batch; already decoded
                break
            batch.append(job)
            samples += job.samples
        now = time.monotonic()
        first.batch_wait_ms = (now - t_wait) * 1e3 if may_wait else 0.0
        if len(batch) > 1:
            self._crowded[key] = now + cfg.batch_crowd_memory_s
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
            loaded = self.loaded.get(msg.bundle)
            if job.stop is not None:
                self._check_hop(job, loaded)
            elif loaded is None or not loaded.whole:
                loaded = self.load_bundle(msg.bundle)
            if loaded is None and msg.bundle not in self.repository and self.park is not None \
                    and self.park(job):
                return False  # waits for the bundle to arrive (cloud_server.fetch), then queued again
            if loaded is None:
                why = self.failed.get(msg.bundle)
                raise _Failure("unknown_bundle", f"this worker cannot load bundle {msg.bundle[:64]!r}"
                                                 + (f": {why[1]}" if why else ""))
            n = loaded.bundle.num_segments
            if not 0 <= msg.cut < n:
                raise _Failure("bad_cut", f"cut {msg.cut} is outside 0..{n - 1} for bundle {loaded.bundle.name}")
            if "session" not in msg.meta and loaded.bundle.state_of(msg.cut, n):
                raise _Failure("bad_request", f"bundle {loaded.bundle.name} keeps state in segments [{msg.cut}, {n}): "
                                              f"send its steps in a session (session, step, client)")
            # Bound the work before doing it: the declared shapes, the batch and the raw bytes
            # they imply are checked against the cut's specs at max_request_batch before anything is
            # decompressed (each decoder then writes into a buffer of exactly the declared size).
            P.check_tensors(msg, loaded.bundle.cut(msg.cut).specs, max_batch=self.config.max_request_batch,
                            max_bytes=self._budget(loaded, msg.cut))
            spec = msg.meta.get("reply_codec", "raw")
            if not isinstance(spec, str) or self._codec(spec) is None:
                raise _Failure("bad_request", f"unknown reply_codec {str(spec)[:40]!r}")
            t = time.perf_counter()
            try:
                job.arrays = {name: decode_tensor(enc) for name, enc in msg.tensors.items()}
            except CodecError as exc:
                raise _Failure("bad_request", str(exc), reason="bad_payload") from None
            job.decode_ms = (time.perf_counter() - t) * 1e3
            if not self.config.allow_non_finite:
                _check_finite(job.arrays)
            if loaded.batchable[msg.cut]:
                job.samples = int(next(iter(job.arrays.values())).shape[0]) if job.arrays else 1
        except _Failure as exc:
            job.arrays = None
            self.send_error(job.rkey, msg.id, exc.code, str(exc), exc.reason)
            return False
        except ProtocolError as exc:
            self.send_error(job.rkey, msg.id, "bad_request", str(exc), getattr(exc, "reason", None))
            return False
        return True

    def _check_hop(self, job: _Job, loaded: LoadedBundle | None) -> None:
        """A hop [cut, stop) runs only on a stage holding those segments, never on a session."""
        msg = job.msg
        if "session" in msg.meta:
            raise _Failure("bad_request", "a session step is never split into pipeline stages")
        if loaded is None or not (type(job.stop) is int and msg.cut < job.stop) or not loaded.covers(msg.cut, job.stop):
            held = "nothing" if loaded is None else f"segments [{loaded.start}, {loaded.stop})"
            # "not_held": the broker sends the hop to another worker of the stage (never to the edge)
            raise _Failure("internal", f"this worker holds {held} of bundle {msg.bundle[:12]}, not the hop "
                                       f"[{msg.cut}, {job.stop})", reason="not_held")

    def _budget(self, loaded: LoadedBundle, k: int) -> int:
        """Raw bytes a request at cut k may declare: its specs at max_request_batch (cached per bundle and cut)."""
        b = loaded.budgets.get(k)
        if b is None:
            b = loaded.budgets[k] = P.tensors_budget(loaded.bundle.cut(k).specs, self.config.max_request_batch,
                                                     self.config.limits)
        return b

    def _codec(self, spec: str):
        c = self._codecs.get(spec)
        if c is None and len(self._codecs) < 64:
            try:
                c = self._codecs[spec] = get_codec(spec)
            except (CodecError, ConfigError, ValueError):
                return None
        return c

    def load_bundle(self, bid: str, stage: tuple[int, int] | None = None) -> LoadedBundle | None:
        """Load `bundle` (only segments [start, stop) with `stage`), within the memory budget; None when it cannot."""
        have = self.loaded.get(bid)
        if have is not None and (have.whole if stage is None else have.covers(*stage)):
            return have
        failed = self.failed.get(bid)
        if failed is not None and time.monotonic() - failed[0] < self.config.rescan_interval_s:
            return None
        if bid not in self.repository:
            self._rescan()
            self.version += 1  # announce what the rescan found
            if bid not in self.repository:
                return None
        n = self.repository.manifest(bid).num_segments
        start, stop = stage if stage is not None else (0, n)
        if stage is not None and not 0 <= start < stop <= n:
            log.error("%s: cannot load segments [%d, %d) of bundle %s: it has %d", self.name, start, stop, bid[:12], n)
            return None
        if not self._fits(bid, start, stop, have):
            return None
        if have is not None:  # another range of the same bundle: this one replaces it
            self.loaded.pop(bid).close()
            self.version += 1
        t = time.perf_counter()
        try:
            loaded = LoadedBundle(self.repository.load(bid), self.runner, self.config.intra_op_threads, start, stop)
        except (BundleError, BackendError, ConfigError) as exc:
            log.error("%s: cannot load bundle %s: %s", self.name, bid[:12], exc)
            self.failed[bid] = (time.monotonic(), str(exc)[:500])
            self.version += 1  # the broker hears of it at once (readiness does not wait for it)
            return None
        self.failed.pop(bid, None)
        if self.config.profile_on_load:
            try:
                loaded.measure(self.device)
            except (EdgeSplitError, ValueError, TypeError) as exc:
                log.warning("%s: could not profile %s: %s", self.name, loaded.bundle.name, exc)
        if self.device != "cpu" and loaded.runner_name == "ort-cpu":
            log.warning("%s: asked for %s but %s runs on the CPU (no usable GPU runner: pip install "
                        "'edgesplit[gpu]' or '[trt]')", self.name, self.device, loaded.bundle.name)
        self.loaded[bid] = loaded
        if loaded.whole:
            self.unfit.discard(bid)
        self.version += 1
        part = "" if loaded.whole else f" segments [{loaded.start}, {loaded.stop})"
        log.info("%s: loaded %s%s (%s, %s of weights) in %.0f ms", self.name, loaded.bundle.name, part,
                 loaded.runner_name, _mb(loaded.weight_bytes), (time.perf_counter() - t) * 1e3)
        return loaded

    def _fits(self, bid: str, start: int, stop: int, replaced: LoadedBundle | None) -> bool:
        """Segments [start, stop) of `bid` fit the memory budget (what `replaced` holds is given back)."""
        if not self.memory_budget:
            return True
        manifest = self.repository.manifest(bid)
        n = manifest.num_segments
        need = manifest.weight_bytes(start, stop)
        free = self.memory_budget - self.weight_bytes + (replaced.weight_bytes if replaced is not None else 0)
        if need > free:
            if (start, stop) == (0, n):
                self.unfit.add(bid)
                self.version += 1
            what = "it" if (start, stop) == (0, n) else f"segments [{start}, {stop})"
            log.info("%s: %s of %s needs %s of weights, %s of this worker's budget of %s are free: not loaded "
                     "(a bundle that fits no worker is served as pipeline stages)", self.name, what, manifest.name,
                     _mb(need), _mb(max(free, 0)), _mb(self.memory_budget))
            return False
        return True

    def _run_batch(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if job.deadline is not None and now >= job.deadline:
                self.send_error(job.rkey, job.msg.id, "deadline",
                                "the deadline passed before the request could be computed")
            else:
                live.append(job)
        if not live:
            return
        first = live[0].msg
        loaded = self.loaded[first.bundle]
        if "session" in first.meta:
            self._run_session(live[0], loaded)
            return
        names = list(live[0].arrays)
        t = time.perf_counter()
        try:
            if len(live) == 1:
                feeds = live[0].arrays
            else:
                feeds = {n: np.concatenate([j.arrays[n] for j in live], axis=0) for n in names}
            outs = loaded.run(first.cut, feeds, live[0].stop)
        except (BackendError, ValueError) as exc:
            if len(live) > 1:  # one bad request must not fail its batch-mates: run each alone
                for job in live:
                    self._run_batch([job])
                return
            self.send_error(live[0].rkey, first.id, "internal", f"the tail failed: {exc}")
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
            hop = job.stop is not None and job.stop < loaded.bundle.num_segments
            try:
                codec = self._codec(self.config.stage_codec if hop else job.msg.meta.get("reply_codec", "raw"))
                tensors = {n: codec.encode(np.ascontiguousarray(a)) for n, a in mine.items()}
            except (CodecError, ValueError) as exc:
                self.send_error(job.rkey, job.msg.id, "internal", f"cannot encode the outputs: {exc}")
                continue
            encode_ms = (time.perf_counter() - t) * 1e3
            # broker receipt to the start of decoding, socket buffers included
            queue_ms = max(0.0, (job.t_start - self._to_local(job.received)) * 1e3)
            times = [queue_ms, job.decode_ms, compute_ms, encode_ms]
            if hop:  # the next hop's request, at cut `stop`: the broker sends it to the next stage
                meta = {k: job.msg.meta[k] for k in _HOP_META if k in job.msg.meta}
                frames = P.encode(P.infer(job.msg.id, job.msg.bundle, job.stop, tensors, **meta))
                self.send([W.ctl(W.REPLY, job.rkey, ("hop", times, len(live) if i == 0 else 0)), *frames])
                continue
            timings = {"queue_ms": round(queue_ms, 4), "decode_ms": round(job.decode_ms, 4),
                       "compute_ms": round(compute_ms, 4), "encode_ms": round(encode_ms, 4)}
            frames = P.encode(P.result(job.msg.id, tensors, timings=timings, worker=self.name, batch=len(live),
                                       batch_wait_ms=round(live[0].batch_wait_ms, 4)))
            stats = ("ok", times, len(live) if i == 0 else 0)
            self.send([W.ctl(W.REPLY, job.rkey, stats), *frames])

    # -- stateful sessions ----------------------------------------------------------------------
    def _run_session(self, job: _Job, loaded: LoadedBundle) -> None:
        """One step of a session: its state from the store, segments [k, n) stepped, the next state kept."""
        msg = job.msg
        sid, step, client = msg.meta["session"], msg.meta["step"], msg.meta["client"]
        bundle, n = loaded.bundle, loaded.bundle.num_segments
        kept = bundle.state_of(msg.cut, n)
        bound = P.check_tensors(msg, bundle.cut(msg.cut).specs)  # checked in _prepare: the symbol sizes

        def initial() -> dict:
            return {st.input: st.initial(bound) for st in kept}

        try:
            state = self.sessions.begin(sid, client, step, msg.bundle, msg.cut, initial)
        except SessionRefused as exc:
            meta = {} if exc.have is None else {"have": exc.have}
            self.send_error(job.rkey, msg.id, exc.code, str(exc), **meta)
            return
        t = time.perf_counter()
        try:
            outs, nxt = loaded.segments.step(job.arrays, msg.cut, n, state)
        except (BackendError, ConfigError, ValueError) as exc:
            self.send_error(job.rkey, msg.id, "internal", f"the tail failed on session step {step}: {exc}")
            return
        compute_ms = (time.perf_counter() - t) * 1e3
        self.sessions.commit(sid, client, step, msg.bundle, msg.cut, nxt)
        t = time.perf_counter()
        try:
            codec = self._codec(msg.meta.get("reply_codec", "raw"))
            tensors = {name: codec.encode(np.ascontiguousarray(a)) for name, a in outs.items()}
        except (CodecError, ValueError) as exc:
            self.send_error(job.rkey, msg.id, "internal", f"cannot encode the outputs: {exc}")
            return
        encode_ms = (time.perf_counter() - t) * 1e3
        queue_ms = max(0.0, (job.t_start - self._to_local(job.received)) * 1e3)
        timings = {"queue_ms": round(queue_ms, 4), "decode_ms": round(job.decode_ms, 4),
                   "compute_ms": round(compute_ms, 4), "encode_ms": round(encode_ms, 4)}
        frames = P.encode(P.result(msg.id, tensors, timings=timings, worker=self.name, batch=1, step=step))
        self.send([W.ctl(W.REPLY, job.rkey, ("ok", [queue_ms, job.decode_ms, compute_ms, encode_ms], 1)), *frames])

    def end_session(self, msg: P.Message) -> None:
        """A session_end from its edge: drop the session's state (never answered)."""
        sid, client = msg.meta.get("session"), msg.meta.get("client")
        if isinstance(sid, str) and isinstance(client, str):
            self.sessions.end(sid, client)

    def close(self) -> None:
        for b in self.loaded.values():
            b.close()
