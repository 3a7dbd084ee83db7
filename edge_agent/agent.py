"""EdgeAgent: run the head on the device, ship the cut to a live cloud server, never lose a request.

Threads (all named ``edgesplit-agent-*``, all joined by close()):

* the caller (``infer``) or one head thread (``submit``/``infer_async``) runs segments [0, k)
  and encodes the cut tensors;
* one I/O thread (edge_agent/_io.py) owns every ZeroMQ socket (two DEALERs per server:
  requests, and control = hello + pings): it sends requests, reads replies, pings the servers,
  watches deadlines and reconnects;
* local worker thread(s) finish requests on the device when the cloud cannot.

The rooms: this module is the public face (sync and asyncio, one core: admit, then the head);
edge_agent/_requests.py the request life cycle; _io.py the I/O loop; _link.py one server's
state machine; _auto.py the cut; _checks.py what inputs and replies must look like;
_device.py the segments that run here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
import zmq

from edgesplit import codecs
from edgesplit.bundle import Bundle
from edgesplit.errors import ConfigError, LinkDownError, UserError

from edge_agent._auto import AutoCut
from edge_agent._device import open_device
from edge_agent._io import IOLoop
from edge_agent._requests import Request, Requests
from edge_agent._results import InferenceResult, LinkStats, ServerStats
from edge_agent._session import Session, StepResult
from edge_agent.config import AgentConfig

__all__ = ["EdgeAgent", "InferenceResult", "LinkStats", "ServerStats", "Session", "StepResult"]

log = logging.getLogger("edge_agent")


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
                 runner: str = "auto", codec: str = "int8+delta+zstd", cut: int | str = "auto",
                 config: AgentConfig | None = None):
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
            fixed = None
        elif isinstance(cut, int) and not isinstance(cut, bool) and 0 <= cut <= n - 1:
            fixed = cut
        else:
            raise ConfigError(f"cut must be 'auto' or an integer in 0..{n - 1} for {self.bundle.name}, got {cut!r}")
        self.codec_spec = codec
        self._codec = codecs.get_codec(codec)
        self._calibration = self.bundle.get("calibration") or {}

        self._device = open_device(self.bundle, runner, cfg.intra_op_threads, cfg.edge_slowdown)
        # The start-up device profile: median ms per segment at batch 1, every symbolic dim 1
        # (1.0 each when profile_runs is 0). Each new input shape is profiled again (AutoCut).
        if cfg.profile_runs:
            edge_ms = self._device.profile(cfg.profile_runs)
            log.info("device profile (%s): %s ms per segment", self._device.runner_name,
                     ", ".join(f"{t:.2f}" for t in edge_ms))
        else:
            edge_ms = [1.0] * n
        self.runner_name = self._device.runner_name
        log.info("edge runner: %s (asked for %r)", self.runner_name, runner)
        self._auto = AutoCut(self.bundle, edge_ms, fixed, codec, cfg, device=self._device, encode=self._encode)
        self._requests = Requests(self.bundle, cfg, self._device)
        if cfg.tracing:
            from edge_agent._trace import AgentTrace

            self._requests.trace = AgentTrace(self.bundle.id)
        self._head_pool = ThreadPoolExecutor(1, thread_name_prefix="edgesplit-agent-head")
        self._io = IOLoop(self.bundle, self.servers, cfg, self._requests, self._auto)
        if self.servers and cfg.connect_timeout_ms > 0:
            if not self._io.became_eligible.wait(cfg.connect_timeout_ms / 1e3):
                log.warning("no server of %s answered within %.0f ms; answering locally until one does",
                            ", ".join(self.servers), cfg.connect_timeout_ms)

    # ------------------------------------------------------------------ public API

    def infer(self, feeds: Mapping[str, np.ndarray], deadline_ms: float | None = None) -> InferenceResult:
        """Run the model on `feeds` and return one answer (cloud or local)."""
        self._stateless()
        req = self._requests.admit(feeds, deadline_ms, copy=False, block=True)
        self._run_head(req)
        return req.future.result()

    def submit(self, feeds: Mapping[str, np.ndarray], deadline_ms: float | None = None) -> Future:
        """Start a request and return a Future of its InferenceResult.

        Up to ``config.max_in_flight`` requests may be pending at once (then submit blocks), so a
        camera loop keeps several frames in flight. The arrays are copied; reuse them freely.
        """
        self._stateless()
        req = self._requests.admit(feeds, deadline_ms, copy=True, block=True)
        self._head_pool.submit(self._run_head, req)
        return req.future

    async def infer_async(self, feeds: Mapping[str, np.ndarray],
                          deadline_ms: float | None = None) -> InferenceResult:
        """The asyncio face of infer(): same arguments, same answer."""
        self._stateless()
        requests = self._requests
        req = requests.admit(feeds, deadline_ms, copy=True, block=False)
        if req is None:  # every slot busy: wait for one without blocking the event loop
            got = asyncio.get_running_loop().run_in_executor(None, requests.slots.acquire)
            try:
                await asyncio.shield(got)
            except asyncio.CancelledError:
                # the slot will still be acquired in the executor: hand it back then
                got.add_done_callback(lambda f: requests.slots.release() if not f.cancelled() else None)
                raise
            try:
                req = requests.admit(feeds, deadline_ms, copy=True, block=None)
            except BaseException:
                requests.slots.release()
                raise
        self._head_pool.submit(self._run_head, req)
        return await asyncio.wrap_future(req.future)

    def _stateless(self) -> None:
        if self.bundle.state:
            raise UserError(f"bundle {self.bundle.name} keeps state between steps ({len(self.bundle.state)} state "
                            f"pairs): run it with agent.session(), whose step() carries the state")

    def session(self, cut: int | None = None, deadline_ms: float | None = None) -> Session:
        """A stateful session (edge_agent/_session.py): ``with agent.session() as s: r = s.step(feeds)``.

        Each side keeps its own segments' state; the cut is pinned for the whole session.
        """
        return Session(self, cut, deadline_ms)

    def link_stats(self) -> LinkStats:
        """RTT and bandwidth EWMAs from real traffic, each server's state, and counters."""
        now = time.perf_counter()
        rtt = self._auto.link.rtt_s
        return LinkStats(rtt * 1e3 if rtt is not None else None, self._auto.link.bandwidth_bps, self._auto.current,
                         tuple(s.stats(now) for s in self._io.links), self._requests.counters())

    @property
    def edge_ms(self) -> list[float]:
        """The device profile, ms per segment, of the latest request's input shape (before any
        request: the start-up profile, batch 1 and every symbolic dim 1)."""
        return list(self._auto.last.edge_ms)

    @property
    def cut(self) -> int | str:
        """The fixed cut, or "auto"."""
        return "auto" if self._auto.fixed is None else self._auto.fixed

    def estimates(self) -> tuple[float, float, float]:
        """(bandwidth bps, RTT ms, the least server wait ms) the cost model prices cuts with now.

        Before any traffic the bandwidth is ``config.chooser.assumed_bandwidth_bps``.
        """
        return self._auto.estimates(self._io.least_wait_ms())

    def predicted_ms(self, batch: int = 1) -> dict[int, float]:
        """The cost model's latency per cut 0..n (n = all on the device) with the current estimates."""
        return self._auto.predicted_ms(batch, self._io.least_wait_ms())

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until some server can take requests; False on timeout."""
        return self._io.became_eligible.wait(timeout_s)

    def is_connected(self) -> bool:
        return self._io.connected()

    @property
    def zmq_context(self) -> zmq.Context:
        """The ZeroMQ context of the agent's sockets; close() terminates it."""
        return self._io.ctx

    def close(self) -> None:
        """Let requests in flight finish (up to config.close_timeout_ms), then stop every thread."""
        if not self._requests.begin_close():
            return
        self._head_pool.shutdown(wait=True)
        self._requests.wait_idle(self.config.close_timeout_ms / 1e3)
        self._io.stop()
        self._requests.shutdown()
        self._device.close()

    def __enter__(self) -> "EdgeAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EdgeAgent({self.bundle.name!r}, servers={list(self.servers)}, cut={self.cut!r}, "
                f"runner={self.runner_name!r}, codec={self.codec_spec!r})")

    # ------------------------------------------------------------------ the head (caller / head thread)

    def _run_head(self, req: Request) -> None:
        """Choose the cut, run segments [0, cut) here, encode the cut and hand it to the I/O thread."""
        requests, cfg = self._requests, self.config
        try:
            if req.future.cancelled():
                requests.finish(req, exc=CancelledError())
                return
            n = self.bundle.num_segments
            # the prices of this request's own input shape (a new shape is profiled first)
            plan, factor = self._auto.plan_for(req.feeds)
            left_ms = (req.deadline - time.perf_counter()) * 1e3
            k = req.cut = self._auto.choose(plan, factor, self._io.eligible, self._io.least_wait_ms(), left_ms)
            t = time.perf_counter()
            cut_tensors = self._device.run(req.feeds, 0, k)
            req.timings["head"] = (time.perf_counter() - t) * 1e3
            req.feeds = None
            req.cut_tensors = cut_tensors
            if k == n:
                requests.finish_local(req, "chosen")
                return
            if not self._io.connected():
                if cfg.fallback == "local":
                    requests.count("local_link_down")
                    requests.finish_local(req, "link down")
                    return
                if cfg.fallback == "error":
                    raise LinkDownError(f"no live server among {', '.join(self.servers) or '(none given)'}")
            t = time.perf_counter()
            enc = {name: self._encode(name, arr) for name, arr in cut_tensors.items()}
            req.timings["encode"] = (time.perf_counter() - t) * 1e3
            req.encoded = enc
            req.bytes_up = sum(e.nbytes for e in enc.values())
            self._auto.observe_head(plan, k, req.timings["head"] / factor)
            if cfg.fallback == "local" and not self._fallback_deadline(req, plan, factor, k):
                requests.count("local_fallback_reserve")
                requests.finish_local(req, "fallback reserve")
                return
            if requests.trace is not None:
                requests.trace.sending(req)
            self._io.post(("send", req))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            requests.finish(req, exc=exc)

    def _fallback_deadline(self, req: Request, plan, factor: float, k: int) -> bool:
        """Under fallback "local": until when the I/O thread waits for the cloud; False: do not send.

        The agent keeps back the device's tail time (and fallback_margin_ms) so that a local
        answer still lands by the deadline, but only where the cloud's predicted answer fits in
        what is left: a reserve that leaves the cloud no time would turn every request local.
        Without room for both, it waits for the cloud up to the deadline, unless the cloud
        cannot make it and the device is quicker: then it finishes here at once.
        """
        tail_ms = plan.tail_ms(k) * factor
        cloud_ms = self._auto.cloud_ms(plan, factor, k, self._io.least_wait_ms())
        reserve_s = (tail_ms + self.config.fallback_margin_ms) / 1e3
        left_s = req.deadline - time.perf_counter()
        if left_s - reserve_s >= cloud_ms / 1e3:
            req.cloud_deadline = req.deadline - reserve_s  # room for the cloud and the fallback
        elif left_s >= cloud_ms / 1e3 or cloud_ms <= tail_ms:
            req.cloud_deadline = req.deadline  # the cloud, or nothing, answers in time
        else:
            return False
        return True

    def _encode(self, name: str, arr: np.ndarray):
        # The codec leaves non-float tensors (ids, masks) exact by itself.
        cal = self._calibration.get(name) if isinstance(self._calibration, dict) else None
        return self._codec.encode(arr, calibration=cal)
