"""The cut: a fixed one, or cut="auto" — the planning layer's cost model and chooser fed with live estimates.

Every request asks `choose()` for its cut. With a fixed cut that is the answer; with "auto" the
CutChooser re-prices every cut with the LinkEstimator's bandwidth and RTT, the servers'
reported queueing and the request's deadline, and moves only on a steady, clear gain
(AgentConfig.chooser).

The prices are those of the request's own input shape: the first request of a shape not seen
yet is profiled on the device with its own inputs (segment times, and the bytes every cut
takes after the codec), and that shape gets its own cost model and chooser (`ShapePlan`). The
start-up profile (every symbolic dim 1) stands in where shapes are not profiled. The cost
models learn online: the device's head times and the cloud's tail times correct them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

import numpy as np

from edgesplit.bundle import Bundle
from edgesplit.planning import CostModel, CutChooser, LinkEstimator, codec_ratio

from edge_agent.config import AgentConfig

__all__ = ["AutoCut", "ShapePlan", "shape_key"]

log = logging.getLogger("edge_agent")

ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]


def shape_key(feeds: Mapping[str, np.ndarray]) -> ShapeKey:
    """The input shapes of a request, as a hashable key."""
    return tuple(sorted((name, tuple(int(d) for d in np.shape(arr))) for name, arr in feeds.items()))


class ShapePlan:
    """One input shape's device profile, the cost model priced with it, and its chooser.

    Times and bytes are per request of this shape (its batch included).
    """

    def __init__(self, key: ShapeKey, edge_ms: list[float], cost: CostModel, chooser: CutChooser, batch: int = 1):
        self.key = key
        self.edge_ms = edge_ms
        self.cost = cost
        self.chooser = chooser
        self.batch = batch  # samples per request of this shape
        self.size = sum(int(np.prod(shape)) for _, shape in key)

    def tail_ms(self, k: int) -> float:
        """The device's time for segments [k, n): what a local fallback at cut k takes."""
        return sum(self.edge_ms[k:]) * self.cost.edge_scale


class AutoCut:
    """The cut of each request, and the estimates that choose it.

    Args:
        bundle: the bundle being split.
        edge_ms: the start-up device profile, ms per segment (batch 1, symbolic dims 1).
        fixed: the cut the user pinned, or None for "auto".
        codec: the codec spec the cut tensors travel with (prices the transfer).
        config: the agent's settings (chooser, EWMA, reply codec, cloud speed prior, profiling).
        device: the segment runner that profiles a new shape (None: no per-shape profiles).
        encode: `encode(name, array)` -> an encoded tensor with `nbytes` (the agent's codec).
    """

    def __init__(self, bundle: Bundle, edge_ms: list[float], fixed: int | None, codec: str, config: AgentConfig,
                 device=None, encode: Callable | None = None):
        self.bundle = bundle
        self.fixed = fixed
        self.codec = codec
        self.config = config
        self._device = device
        self._encode = encode
        self._cloud_segment_ms: list[float] | None = None  # the server's profile (its welcome)
        self._lock = threading.Lock()
        self.link = LinkEstimator(alpha=config.ewma_alpha, min_transfer_s=config.min_transfer_ms / 1e3)
        self._start_ms = list(edge_ms)
        base_key = tuple(sorted((s.name, tuple(d if isinstance(d, int) and d >= 0 else 1 for d in s.shape))
                                for s in bundle.inputs))
        cost = CostModel.from_bundle(bundle, edge_ms, None, codec=codec, reply_codec=config.reply_codec,
                                     cloud_speedup=config.cloud_speedup)
        self.base = ShapePlan(base_key, list(edge_ms), cost, CutChooser(cost, config=config.chooser))
        self.plans: dict[ShapeKey, ShapePlan] = {base_key: self.base}
        self.last = self.base  # the plan of the latest request
        self._all_edge_count = 0

    # --- compatibility with one model: the latest request's

    @property
    def cost(self) -> CostModel:
        return self.last.cost

    @property
    def chooser(self) -> CutChooser:
        return self.last.chooser

    @property
    def current(self) -> int:
        """The cut in use now (the fixed one, or the chooser's of the latest shape)."""
        return self.fixed if self.fixed is not None else self.last.chooser.cut

    def estimates(self, wait_ms: float) -> tuple[float, float, float]:
        """(bandwidth bps, RTT ms, server wait ms); the assumed bandwidth before any traffic."""
        bw = self.link.bandwidth_bps or self.config.chooser.assumed_bandwidth_bps
        rtt = (self.link.rtt_s or 0.0) * 1e3
        return bw, rtt, wait_ms

    # --- per-shape plans

    def plan_for(self, feeds: Mapping[str, np.ndarray]) -> tuple[ShapePlan, float]:
        """The plan for a request with these inputs, profiling its shape first if it is new.

        Returns the plan and the factor its per-request figures need for this request (1 for the
        request's own shape; the batch, or the size ratio, where another shape stands in).
        """
        key = shape_key(feeds)
        plan = self.plans.get(key)
        if plan is None:
            with self._lock:  # one profile per new shape, even with several head threads
                plan = self.plans.get(key)
                if plan is None and self._can_profile():
                    plan = self.plans[key] = self._profile(key, feeds)
        if plan is None:  # not profiled: the nearest profiled shape stands in, scaled by size
            size = sum(int(np.prod(shape)) for _, shape in key)
            plan = min(self.plans.values(), key=lambda p: abs(np.log(max(size, 1) / max(p.size, 1))))
            self.last = plan
            return plan, size / max(plan.size, 1)
        self.last = plan
        return plan, 1.0

    def _can_profile(self) -> bool:
        # A fixed cut needs a shape's times only for the fallback reserve: the start-up profile
        # scaled by size does for that, without a profile's delay on each new shape.
        cfg = self.config
        return (self.fixed is None and self._device is not None and cfg.profile_runs > 0
                and len(self.plans) - 1 < cfg.shape_profiles)

    def _profile(self, key: ShapeKey, feeds: Mapping[str, np.ndarray]) -> ShapePlan:
        """Time every segment and size every cut (after the codec) on this request's own inputs."""
        n = self.bundle.num_segments
        runs = self.config.profile_runs
        t0 = time.perf_counter()
        seg_passes, enc_passes = [], []
        bytes_up = [0.0] * (n + 1)
        outputs: dict[str, np.ndarray] = {}
        for rep in range(runs + 1):  # the first pass warms up (new shapes re-plan inside ORT)
            env: Mapping[str, np.ndarray] = feeds
            seg: list[float] = []
            enc: list[float] = []
            for k in range(n):
                t = time.perf_counter()
                sizes = [self._encode(name, arr).nbytes for name, arr in env.items()] if self._encode else \
                    [arr.nbytes * codec_ratio(self.codec, str(arr.dtype)) for arr in env.values()]
                enc.append((time.perf_counter() - t) * 1e3)
                bytes_up[k] = float(sum(sizes))
                env = self._device.run(env, k, k + 1, times=seg)
            outputs = dict(env)
            if rep:
                seg_passes.append(seg)
                enc_passes.append(enc + [0.0])
        edge_ms = [float(x) for x in np.median(np.asarray(seg_passes), axis=0)]
        encode_ms = [float(x) for x in np.median(np.asarray(enc_passes), axis=0)]
        reply = self.config.reply_codec
        bytes_down = float(sum(a.nbytes * codec_ratio(reply, str(a.dtype)) for a in outputs.values()))
        cost = CostModel(edge_ms, self._cloud_ms_for(edge_ms), bytes_up, bytes_down, encode_ms, None)
        bw, rtt, _ = self.estimates(0.0)
        initial = cost.best(bw, rtt / 1e3, objective=self.config.chooser.objective).cut \
            if self.fixed is None else self.base.chooser.cut
        first = self.bundle.inputs[0]
        batch = int(np.shape(feeds[first.name])[0]) if first.shape and not isinstance(first.shape[0], int) else 1
        plan = ShapePlan(key, edge_ms, cost, CutChooser(cost, initial=initial, config=self.config.chooser), batch)
        log.info("device profile for input shape %s (%.0f ms to measure): %s ms per segment; cut bytes %s",
                 ", ".join(f"{name} {list(shape)}" for name, shape in key), (time.perf_counter() - t0) * 1e3,
                 ", ".join(f"{t:.2f}" for t in edge_ms), ", ".join(f"{b:.0f}" for b in bytes_up[:n]))
        return plan

    def _cloud_ms_for(self, edge_ms: list[float]) -> list[float]:
        """The cloud's segment times at a shape: its profile (taken at the start-up shape) scaled
        segment by segment as the device's times scaled; without one, the device's / cloud_speedup."""
        if self._cloud_segment_ms is None:
            return [t / self.config.cloud_speedup for t in edge_ms]
        return [c * (e / s) if s > 0 else c for c, e, s in zip(self._cloud_segment_ms, edge_ms, self._start_ms)]

    # --- the choice

    def choose(self, plan: ShapePlan, factor: float, cloud_reachable: bool, wait_ms: float,
               deadline_ms: float | None = None) -> int:
        """The cut for the next request (of `plan`'s shape; `factor` scales a stand-in plan)."""
        if self.fixed is not None:
            return self.fixed
        n = self.bundle.num_segments
        bw, rtt, wait = self.estimates(wait_ms)
        # the chooser prices per request of the plan's shape: a stand-in's budget scales back
        k = plan.chooser.update(bw, rtt / 1e3, wait / 1e3,
                                deadline_ms=None if deadline_ms is None else deadline_ms / factor)
        if k == n:
            self._all_edge_count += 1
            if cloud_reachable and self._all_edge_count % self.config.auto_probe_every == 0:
                # everything runs here: send one request to the cloud now and then, so the
                # bandwidth estimate stays fresh and the chooser can see the link got better
                costs = plan.cost.costs(bw, rtt / 1e3, wait / 1e3, allowed=range(n))
                k = min(costs, key=lambda c: c.total_ms).cut
        return k

    def cloud_ms(self, plan: ShapePlan, factor: float, k: int, wait_ms: float) -> float:
        """The predicted time from sending cut k to its answer: transfer, RTT, queue, tail, decode."""
        bw, rtt, wait = self.estimates(wait_ms)
        c = plan.cost.cost(k, bw, rtt / 1e3, wait / 1e3)
        return (c.transfer_ms + c.cloud_ms + c.decode_ms) * factor + c.rtt_ms + c.queue_ms

    def predicted_ms(self, batch: int, wait_ms: float) -> dict[int, float]:
        """The cost model's latency per cut 0..n with the current estimates (the latest shape)."""
        bw, rtt, wait = self.estimates(wait_ms)
        plan = self.last
        model = plan.cost if batch == 1 or plan is not self.base else CostModel.from_bundle(
            self.bundle, plan.cost.edge_ms, plan.cost.cloud_ms, codec=self.codec,
            reply_codec=self.config.reply_codec, batch=batch)
        return {c.cut: c.total_ms for c in model.costs(bw, rtt / 1e3, wait / 1e3)}

    # --- what traffic teaches

    def observe_head(self, plan: ShapePlan, k: int, ms: float) -> None:
        """A measured head time, per request of `plan`'s shape."""
        if self.fixed is None:
            plan.cost.observe_edge(k, ms)

    def observe_rtt(self, rtt_s: float) -> None:
        self.link.observe(0, 0, rtt_s=rtt_s)

    def observe_exchange(self, k: int, bytes_up: int, bytes_down: int, network_ms: float,
                         compute_ms_per_sample: float) -> None:
        """One answered request: its transfer times the link, the server's compute the tail."""
        self.link.observe(bytes_up, bytes_down, total_s=network_ms / 1e3)
        if self.fixed is None and compute_ms_per_sample > 0:
            # the shape it came from: the plan whose cut k is nearest in bytes (shapes differ a lot)
            plan = min(self.plans.values(),
                       key=lambda p: abs(np.log(max(bytes_up, 1) / max(p.cost.bytes_up[k], 1))))
            # (the base plan prices one sample; the others one request of their shape)
            plan.cost.observe_cloud(k, compute_ms_per_sample * (1 if plan is self.base else plan.batch))

    def set_cloud_profile(self, segment_ms) -> None:
        """A server told us its per-segment times: price every shape's tail with them from now on."""
        n = self.bundle.num_segments
        if not (isinstance(segment_ms, list) and len(segment_ms) == n
                and all(isinstance(t, (int, float)) and t >= 0 for t in segment_ms)):
            return
        with self._lock:
            self._cloud_segment_ms = [float(t) for t in segment_ms]
            for plan in self.plans.values():
                old = plan.cost
                if plan is self.base:
                    model = CostModel.from_bundle(self.bundle, old.edge_ms, self._cloud_segment_ms,
                                                  codec=self.codec, reply_codec=self.config.reply_codec)
                else:
                    model = CostModel(old.edge_ms, self._cloud_ms_for(list(old.edge_ms)), old.bytes_up,
                                      old.bytes_down, old.encode_ms, old.decode_ms)
                model.edge_scale = old.edge_scale
                plan.cost = plan.chooser.model = model
