"""Online estimates of the link's bandwidth and round-trip time from the requests it carries."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from edgesplit.errors import ConfigError

__all__ = ["LinkEstimator"]


class LinkEstimator:
    """Estimates of bandwidth (EWMA with level-shift detection) and RTT (windowed minimum).

    Feed it with :meth:`observe` after each request::

        est.observe(bytes_sent=len_up, bytes_recv=len_down, rtt_s=None,
                    total_s=wall_s - server_s)     # network time: wall minus the server's time
        est.observe(0, 0, rtt_s=ping_s)            # a ping: an RTT sample only

    A request's transfer time is its network time less one RTT; its bandwidth sample is
    (bytes_sent + bytes_recv) x 8 / transfer time. A transfer too short to time (under
    `min_transfer_s`) only says the link is at least that fast, so it can raise a low estimate
    but never lower one. A sample below `shift_ratio` x the estimate (the link got worse) is
    followed with the larger `drop_alpha`, and `shift_samples` consecutive samples beyond
    `shift_ratio` on the same side (a level shift, up or down) replace the estimate with their
    mean: a bandwidth change shows within two requests, while one outlier moves it only partly.

    Args:
        alpha: EWMA weight of a new sample.
        drop_alpha: weight of a sample below `shift_ratio` x the current estimate.
        shift_ratio / shift_samples: what counts as a level shift (see above).
        rtt_window_s: the RTT is the least sample of this many recent seconds, so pings that
            queued behind bulk data do not inflate it (and a longer path shows after the window).
        min_transfer_s: transfer times below this are too short to measure a bandwidth.
        initial_bandwidth_bps / initial_rtt_s: estimates before any sample (None: unknown).

    Thread-safe. Times come from ``time.monotonic``.
    """

    def __init__(self, alpha: float = 0.3, drop_alpha: float = 0.7, min_transfer_s: float = 0.002,
                 initial_bandwidth_bps: float | None = None, initial_rtt_s: float | None = None,
                 shift_ratio: float = 0.6, shift_samples: int = 2, rtt_window_s: float = 10.0):
        if not 0 < alpha <= 1 or not 0 < drop_alpha <= 1:
            raise ConfigError("alpha and drop_alpha must be in (0, 1]")
        if not 0 < shift_ratio < 1 or shift_samples < 1:
            raise ConfigError("shift_ratio must be in (0, 1) and shift_samples >= 1")
        if min_transfer_s < 0:
            raise ConfigError("min_transfer_s must be >= 0")
        self.alpha = alpha
        self.drop_alpha = drop_alpha
        self.min_transfer_s = min_transfer_s
        self.shift_ratio = shift_ratio
        self.rtt_window_s = rtt_window_s
        self._rtt_window: deque[tuple[float, float]] = deque()
        self.shift_samples = shift_samples
        self._shift: list[float] = []
        self._shift_side = 0
        self._bw = initial_bandwidth_bps
        self._rtt = initial_rtt_s
        self._lock = threading.Lock()
        self.bandwidth_samples = 0
        self.rtt_samples = 0
        self.last_bandwidth_at: float | None = None   # monotonic time of the last bandwidth sample
        self.last_rtt_at: float | None = None

    @property
    def bandwidth_bps(self) -> float | None:
        """Estimated bits per second (None before any sample or initial value)."""
        return self._bw

    @property
    def rtt_s(self) -> float | None:
        """Estimated round-trip time in seconds (None before any sample or initial value)."""
        return self._rtt

    def bandwidth_age_s(self, now: float | None = None) -> float:
        """Seconds since the last bandwidth sample (inf when none): probe when this grows."""
        if self.last_bandwidth_at is None:
            return math.inf
        return (time.monotonic() if now is None else now) - self.last_bandwidth_at

    def observe(self, bytes_sent: int, bytes_recv: int = 0, rtt_s: float | None = None,
                total_s: float | None = None) -> None:
        """Fold in one exchange.

        Args:
            bytes_sent / bytes_recv: payload bytes that crossed the link each way.
            rtt_s: a measured round trip of a small message (a ping), or None.
            total_s: network time of the exchange (wall time minus the server's queue and
                compute time), or None.
        """
        now = time.monotonic()
        with self._lock:
            if rtt_s is not None and math.isfinite(rtt_s) and rtt_s >= 0:
                self._add_rtt(rtt_s, now)
            nbytes = max(0, int(bytes_sent)) + max(0, int(bytes_recv))
            if total_s is None or not math.isfinite(total_s) or total_s <= 0 or nbytes == 0:
                return
            rtt = self._rtt
            if rtt is None:
                if nbytes < 4096:
                    # No RTT yet: a small exchange is mostly RTT; take it as the first estimate.
                    self._add_rtt(total_s, now)
                    return
                rtt = 0.0  # a big one without an RTT: a conservative (low) bandwidth sample
            transfer = total_s - rtt
            bits = nbytes * 8
            if transfer < self.min_transfer_s:
                floor = bits / max(self.min_transfer_s, 1e-9)
                if self._bw is not None and self._bw < floor:
                    self._bw = (1 - self.alpha) * self._bw + self.alpha * floor
                    self.last_bandwidth_at = now
                # An exchange faster than the RTT estimate also says the RTT is lower.
                if total_s < rtt:
                    self._add_rtt(total_s, now)
                return
            sample = bits / transfer
            if self._bw is None:
                self._bw = sample
            else:
                # Level shifts: `shift_samples` consecutive samples all off by more than
                # `shift_ratio` on the same side replace the estimate outright.
                side = (-1 if sample < self.shift_ratio * self._bw
                        else 1 if sample * self.shift_ratio > self._bw else 0)
                if side and side == self._shift_side:
                    self._shift.append(sample)
                else:
                    self._shift = [sample] if side else []
                self._shift_side = side
                if side and len(self._shift) >= self.shift_samples:
                    self._bw = sum(self._shift) / len(self._shift)
                    self._shift, self._shift_side = [], 0
                else:
                    a = self.drop_alpha if side < 0 else self.alpha
                    self._bw = (1 - a) * self._bw + a * sample
            self.bandwidth_samples += 1
            self.last_bandwidth_at = now

    def _add_rtt(self, rtt_s: float, now: float) -> None:
        # The RTT is the minimum over a window (as BBR's min_rtt): a ping that waited behind a
        # bulk transfer in a queue measures the queue, not the path, and must not inflate it.
        samples = self._rtt_window
        samples.append((now, rtt_s))
        while samples and now - samples[0][0] > self.rtt_window_s:
            samples.popleft()
        self._rtt = min(r for _, r in samples)
        self.rtt_samples += 1
        self.last_rtt_at = now

    def reset(self) -> None:
        """Forget everything (e.g. after the link came back from an outage)."""
        with self._lock:
            self._bw = self._rtt = None
            self._shift, self._shift_side = [], 0
            self._rtt_window.clear()
            self.bandwidth_samples = self.rtt_samples = 0
            self.last_bandwidth_at = self.last_rtt_at = None

    def __repr__(self) -> str:
        bw = f"{self._bw / 1e6:.2f} Mbit/s" if self._bw else "?"
        rtt = f"{self._rtt * 1e3:.1f} ms" if self._rtt is not None else "?"
        return f"LinkEstimator(bandwidth={bw}, rtt={rtt})"
