"""The request life cycle: admission and in-flight slots, and the one place a request is answered, exactly once.

A request is admitted (checked, given a slot and an id), runs its head, then either goes to the
cloud through the I/O loop or is finished here on the device. Whichever path ends it calls
`finish`, which answers the future once; every later attempt is a no-op. The I/O thread alone
decides whether a request still waits for the cloud (edge_agent/_io.py), so two answers cannot race.
"""

from __future__ import annotations

import collections
import itertools
import secrets
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Mapping

import numpy as np

from edgesplit.bundle import Bundle
from edgesplit.errors import EdgeSplitError, UserError

from edge_agent._checks import bind_shapes
from edge_agent._results import InferenceResult
from edge_agent.config import AgentConfig

__all__ = ["Request", "Requests"]


class Request:
    """One inference on its way: its inputs, its cut tensors, where it went and what it cost."""

    __slots__ = ("id", "seq", "feeds", "binding", "batch", "future", "t0", "deadline", "cloud_deadline",
                 "cut", "cut_tensors", "encoded", "bytes_up", "timings", "server", "sent_at",
                 "attempts", "waited_ms", "done", "lock", "sent_to", "meta", "prefer")

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
        self.server = None                # the ServerLink it was last sent to
        self.sent_at = 0.0
        self.attempts = 0
        self.sent_to: set[int] = set()    # servers this request went to: only they may answer it
        self.waited_ms = 0.0
        self.done = False
        self.lock = threading.Lock()
        self.meta: dict | None = None     # more header fields (a session step: session, step, client)
        self.prefer: int | None = None    # the server to use while it is usable (a session's broker)


class Requests:
    """Admits requests, answers them once, and finishes on the device what the cloud did not.

    Args:
        bundle: the bundle the requests run.
        config: max_in_flight, deadline_ms, fallback, local_workers.
        device: the segment runner that finishes tails locally.
    """

    def __init__(self, bundle: Bundle, config: AgentConfig, device):
        self.bundle = bundle
        self.config = config
        self._device = device
        self._tag = secrets.token_hex(4)  # request ids are "<tag>-<seq>": a reply names its agent
        self._seq = itertools.count(1)
        self._max_seq = 0
        self._counters: collections.Counter = collections.Counter()
        self._counter_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(config.max_in_flight)
        self._outstanding = 0
        self._idle = threading.Condition()
        self.closed = False
        self._close_lock = threading.Lock()
        self._local_pool = ThreadPoolExecutor(config.local_workers, thread_name_prefix="edgesplit-agent-local")
        self.trace = None  # an edge_agent._trace.AgentTrace when AgentConfig.tracing

    # --- counters

    def count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self._counters[key] += n

    def counters(self) -> dict[str, int]:
        with self._counter_lock:
            return dict(self._counters)

    # --- admission

    def admit(self, feeds, deadline_ms, copy: bool, block: bool | None) -> Request | None:
        """Check `feeds`, take a slot (block: wait for one; False: None if none free; None: held already)."""
        if self.closed:
            raise EdgeSplitError("the agent is closed")
        if not isinstance(feeds, Mapping):
            raise UserError(f"feeds must be a dict of name -> numpy array, got {type(feeds).__name__}")
        binding = bind_shapes(self.bundle.inputs, feeds, f"{self.bundle.name} inputs")
        if deadline_ms is None:
            deadline_ms = self.config.deadline_ms
        elif not isinstance(deadline_ms, (int, float)) or not deadline_ms > 0:
            raise UserError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
        if block is not None and not self.slots.acquire(blocking=block):
            return None
        feeds = {k: (np.array(v, copy=True) if copy else v) for k, v in feeds.items()}
        first = self.bundle.inputs[0].shape
        batch = feeds[self.bundle.inputs[0].name].shape[0] if first and not isinstance(first[0], int) else 1
        seq = next(self._seq)
        self._max_seq = seq
        req = Request(f"{self._tag}-{seq}", seq, feeds, binding, batch, time.perf_counter() + deadline_ms / 1e3)
        with self._idle:
            self._outstanding += 1
        return req

    def is_ours(self, rid: str) -> bool:
        """Whether `rid` names a request this agent made (answered or not)."""
        tag, _, seq = rid.partition("-")
        return tag == self._tag and seq.isdigit() and 0 < int(seq) <= self._max_seq

    # --- answers

    def finish(self, req: Request, result: InferenceResult | None = None, exc: BaseException | None = None) -> bool:
        """Answer `req` with `result` or `exc`, unless it was answered already; True if this call did."""
        with req.lock:
            if req.done:
                return False
            req.done = True
        req.cut_tensors = req.encoded = req.feeds = None
        if self.trace is not None:
            self.trace.finished(req, result.where if result is not None else None)
        try:
            if exc is not None:
                self.count("errors")
                req.future.set_exception(exc)
            else:
                self.count(result.where)
                req.future.set_result(result)
        except InvalidStateError:  # the caller cancelled the future (or its asyncio task)
            self.count("cancelled")
        self.slots.release()
        with self._idle:
            self._outstanding -= 1
            if not self._outstanding:
                self._idle.notify_all()
        return True

    def timings(self, req: Request) -> dict[str, float]:
        t = dict(req.timings)
        t["total"] = (time.perf_counter() - req.t0) * 1e3
        return t

    def finish_local(self, req: Request, reason: str) -> None:
        """Run segments [cut, n) on the device and answer (in the calling thread)."""
        try:
            t = time.perf_counter()
            if req.cut_tensors is None:
                raise EdgeSplitError(f"request {req.id} has no head output to finish locally")
            out = self._device.run(req.cut_tensors, req.cut, self.bundle.num_segments)
            req.timings["tail"] = (time.perf_counter() - t) * 1e3
            req.timings["network"] = req.waited_ms
            self.finish(req, InferenceResult(out, "local", req.cut, self.timings(req), None, reason))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            self.finish(req, exc=exc)

    def give_up_cloud(self, req: Request, reason: str, exc: BaseException) -> None:
        """The cloud will not answer `req`: finish it per the fallback policy (local, or `exc`)."""
        if req.done:
            return
        if self.config.fallback == "local" and req.cut_tensors is not None:
            try:
                self._local_pool.submit(self.finish_local, req, reason)
                return
            except RuntimeError:  # the pool is shut down (closing): finish right here
                self.finish_local(req, reason)
                return
        self.finish(req, exc=exc)

    # --- closing

    def begin_close(self) -> bool:
        """Refuse new requests from now on; False if closing had begun already."""
        with self._close_lock:
            if self.closed:
                return False
            self.closed = True
            return True

    def wait_idle(self, timeout_s: float) -> None:
        """Wait until every admitted request is answered, or `timeout_s` passed."""
        end = time.monotonic() + timeout_s
        with self._idle:
            while self._outstanding and time.monotonic() < end:
                self._idle.wait(max(0.0, end - time.monotonic()))

    def shutdown(self) -> None:
        self._local_pool.shutdown(wait=True)
