"""The device's share of the work: the core's SegmentRunner, or one slowed down to stand in for a weaker board."""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from edgesplit.bundle import Bundle
from edgesplit.runtime import SegmentRunner

__all__ = ["open_device"]


def open_device(bundle: Bundle, runner: str, intra_op_threads: int | None, slowdown: float = 1.0) -> SegmentRunner:
    """The segment runner the agent runs its heads and local tails on.

    With `slowdown` 1 this is the core's SegmentRunner itself; above 1 it emulates a device that
    many times slower (AgentConfig.edge_slowdown).
    """
    if slowdown == 1.0:
        return SegmentRunner(bundle, runner, intra_op_threads)
    return SlowSegmentRunner(bundle, runner, intra_op_threads, factor=slowdown)


class SlowSegmentRunner(SegmentRunner):
    """A SegmentRunner whose every segment takes `factor` times the fastest time it ever ran here.

    The rest of that time is slept once the range has run. Scaling the fastest time rather than
    each measured one keeps the host's load noise from being multiplied by `factor` too; a run
    that is slower than its target on its own is not shortened. `profile` times through `run`,
    so the profile sees the same emulated device as the requests do.
    """

    # Fastest ms per segment file and the shapes entering it, in this process: every agent of a
    # benchmark emulates the same device, whatever else the host is doing while one of them warms
    # up. The shapes count: a 320x320 image is not as fast as the 1x1 one of the start-up profile.
    _best_ms: dict[tuple, float] = {}

    def __init__(self, bundle: Bundle, runner: str, intra_op_threads: int | None, factor: float):
        super().__init__(bundle, runner, intra_op_threads)
        self.factor = factor
        self._files = [str(seg.path) for seg in self.bundle.segments]

    def run(self, tensors: Mapping[str, np.ndarray], start: int, stop: int,
            times: list[float] | None = None, extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
        if start == stop:
            return super().run(tensors, start, stop, times, extra)
        # one segment at a time, so that each is known by the shapes that enter it; what the
        # caller passed in (state inputs a later segment reads) stays available all the way
        env: dict[str, np.ndarray] = dict(tensors)
        kept: dict[str, np.ndarray] = {}
        extra_ms = 0.0
        for i in range(start, stop):
            key = (self._files[i], tuple(sorted((name, np.shape(arr)) for name, arr in env.items())))
            took: list[float] = []
            mine = [e for e in extra if e in self.bundle.segments[i].outputs]
            out = super().run(env, i, i + 1, times=took, extra=mine)
            kept.update({e: out[e] for e in mine})
            env.update(out)
            ms = took[0]
            best = self._best_ms[key] = min(ms, self._best_ms.get(key, ms))
            target = self.factor * best
            extra_ms += max(0.0, target - ms)
            if times is not None:
                times.append(max(ms, target))
        if extra_ms > 0:
            time.sleep(extra_ms / 1e3)
        return {**{t: env[t] for t in self.bundle.cut(stop).tensors}, **kept}
