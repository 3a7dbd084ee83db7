"""Link estimates from real traffic (EWMA) and the agent's choice of cut for cut="auto"."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["Ewma", "LinkEstimate", "CutPlanner"]

# Encoded size / raw size, before any traffic has measured it.
_CODEC_RATIO = {"raw": 1.0, "fp16": 0.5, "int8": 0.25}


def codec_ratio_guess(spec: str) -> float:
    stages = spec.split("+")
    ratio = _CODEC_RATIO.get(stages[0], 1.0)
    if len(stages) > 1:  # an entropy stage (zstd, lz4): a conservative guess until measured
        ratio *= 0.8
    return ratio


class Ewma:
    """Exponentially weighted moving average; None until the first sample."""

    def __init__(self, alpha: float, initial: float | None = None):
        self.alpha = alpha
        self.value = initial
        self.samples = 0

    def add(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.samples += 1
        return self.value


class LinkEstimate:
    """RTT (from ping/pong) and bandwidth (from infer round trips), both EWMAs. Thread-safe."""

    def __init__(self, alpha: float, min_transfer_ms: float, min_sample_bytes: int):
        self.rtt_ms = Ewma(alpha)
        self.bandwidth_bps = Ewma(alpha)
        self.min_transfer_ms = min_transfer_ms
        self.min_sample_bytes = min_sample_bytes
        self._lock = threading.Lock()

    def add_rtt(self, ms: float) -> None:
        with self._lock:
            self.rtt_ms.add(ms)

    def add_transfer(self, nbytes: int, network_ms: float) -> None:
        """One round trip that moved `nbytes` and spent `network_ms` outside the server's compute."""
        with self._lock:
            rtt = self.rtt_ms.value or 0.0
            transfer = network_ms - rtt
            if transfer >= self.min_transfer_ms and nbytes >= self.min_sample_bytes:
                self.bandwidth_bps.add(nbytes * 8 / (transfer / 1e3))


@dataclass
class _Choice:
    cut: int
    predicted_ms: float
    at: float


class CutPlanner:
    """Chooses the cut with the lowest predicted latency, with hysteresis.

    latency(k) = edge segments [0, k) + encoded bytes(k) / bandwidth + RTT + server wait
                 + cloud segments [k, n);   latency(n) = every segment on the device.
    """

    def __init__(self, bundle, edge_ms: list[float], codec: str, hysteresis: float, replan_ms: float,
                 cloud_speedup: float, allow_local: bool = True):
        self.bundle = bundle
        self.n = bundle.num_segments
        self.edge_ms = list(edge_ms)
        self.cloud_ms: list[float] | None = None
        self.cloud_speedup = cloud_speedup
        self.hysteresis = hysteresis
        self.replan_s = replan_ms / 1e3
        self.allow_local = allow_local
        guess = codec_ratio_guess(codec)
        self.ratio = {k: Ewma(0.2, guess) for k in range(self.n + 1)}
        self._choice: _Choice | None = None
        self._lock = threading.Lock()

    def set_cloud_profile(self, segment_ms) -> None:
        if segment_ms and len(segment_ms) == self.n and all(isinstance(t, (int, float)) for t in segment_ms):
            self.cloud_ms = [float(t) for t in segment_ms]

    def observe_ratio(self, k: int, raw_bytes: int, encoded_bytes: int) -> None:
        if raw_bytes > 0:
            self.ratio[k].add(encoded_bytes / raw_bytes)

    def predict(self, bandwidth_bps: float, rtt_ms: float, wait_ms: float = 0.0,
                batch: int = 1) -> dict[int, float]:
        """Predicted ms per cut 0..n (n = all on the device)."""
        cloud = self.cloud_ms or [t / self.cloud_speedup for t in self.edge_ms]
        out = {}
        for k in range(self.n):
            nbytes = self.bundle.cut(k).bytes_per_sample * batch * (self.ratio[k].value or 1.0)
            out[k] = (sum(self.edge_ms[:k]) + nbytes * 8 / bandwidth_bps * 1e3 + rtt_ms + wait_ms
                      + sum(cloud[k:]) * batch)
        if self.allow_local:
            out[self.n] = sum(self.edge_ms) * batch
        return out

    def choose(self, bandwidth_bps: float, rtt_ms: float, wait_ms: float = 0.0, batch: int = 1) -> int:
        now = time.monotonic()
        with self._lock:
            c = self._choice
            if c is not None and now - c.at < self.replan_s:
                return c.cut
            pred = self.predict(bandwidth_bps, rtt_ms, wait_ms, batch)
            best = min(pred, key=pred.get)
            if c is None or (best != c.cut and pred[best] < pred[c.cut] * (1 - self.hysteresis)):
                self._choice = _Choice(best, pred[best], now)
            else:
                self._choice = _Choice(c.cut, pred[c.cut], now)
            return self._choice.cut

    @property
    def current(self) -> int | None:
        return self._choice.cut if self._choice else None
