"""An adaptive failure detector: when has a silent peer been silent for too long?

A fixed "N missed heartbeats" rule is either slow (N large) or cries wolf on a busy machine,
where a process that is merely descheduled for a second looks dead. This detector follows
the phi-accrual detector (Hayashibara et al. 2004; Akka, Cassandra): it learns how the gaps
between a peer's messages are distributed and suspects the peer when the current silence
would be improbable for a live one, ``phi = -log10(P(a gap this long))`` above `threshold`.
A peer whose messages come like clockwork is suspected soon after its first missing
heartbeat; one whose heartbeats arrive late now and then (a loaded box) gets a longer limit.

Three rules make it fit a link that carries traffic as well as heartbeats:

* Any message counts as life (`heartbeat`). A gap shorter than the peer's promised
  `interval_s` says nothing about how late the peer can be, so it is recorded as `interval_s`:
  busy traffic does not shrink the limit below what the heartbeats alone would give.
* The limit is clamped to ``[min_silence_s, max_silence_s]``: never faster than the floor
  (whatever the history), and a dead peer is always found within the ceiling (however
  jittery it was).
* `expect_traffic(until)` says "bytes are still moving until then" (a large request on a
  slow link): silence is counted from `until` instead of the last message, still bounded
  by ``max_silence_s`` after the last message.

Pure logic (stdlib only) with an injected clock (every method takes ``now``), so it is tested with
synthetic times.
"""

from __future__ import annotations

import math
from collections import deque

from edgesplit.errors import ConfigError

__all__ = ["FailureDetector", "StallGuard", "phi_of"]


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def phi_of(gap_s: float, mean_s: float, std_s: float) -> float:
    """-log10 of the probability that a normal(mean, std) gap is longer than `gap_s`."""
    p = _normal_sf((gap_s - mean_s) / std_s)
    if p <= 0.0:
        # past double precision (z > ~38): the log of the asymptotic tail
        z = (gap_s - mean_s) / std_s
        return (z * z / 2 + math.log(z * math.sqrt(2 * math.pi))) / math.log(10)
    return -math.log10(p)


def _z_for(threshold: float) -> float:
    """The z with -log10(P(Z > z)) == threshold (bisection; phi grows with z)."""
    lo, hi = -10.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if phi_of(mid, 0.0, 1.0) < threshold:
            lo = mid
        else:
            hi = mid
    return hi


class FailureDetector:
    """Phi-accrual liveness of one peer.

    Args:
        interval_s: how often the peer promises to say something (its heartbeat interval).
        threshold: phi at which the peer is suspected (8: a live peer's gap is that long
            once in 10^8; Akka and Cassandra use 8).
        min_std_s: floor on the gaps' standard deviation (the jitter of a quiet machine), so
            a clockwork history does not make the limit razor-thin.
        min_silence_s: never suspect after less silence than this.
        max_silence_s: always suspect after this much silence.
        window: how many recent gaps the statistics cover.
        now: when the peer was first heard of (its silence starts here).
    """

    __slots__ = ("interval_s", "threshold", "min_std_s", "min_silence_s", "max_silence_s", "_z", "_gaps",
                 "_sum", "_sumsq", "last", "_busy_until")

    def __init__(self, interval_s: float, threshold: float = 8.0, min_std_s: float = 0.025,
                 min_silence_s: float = 0.0, max_silence_s: float = math.inf, window: int = 100,
                 now: float = 0.0):
        if not interval_s > 0 or not min_std_s > 0 or not threshold > 0 or window < 2:
            raise ConfigError("FailureDetector needs interval_s, min_std_s, threshold > 0 and window >= 2")
        if not 0 <= min_silence_s <= max_silence_s:
            raise ConfigError("FailureDetector needs 0 <= min_silence_s <= max_silence_s")
        self.interval_s = interval_s
        self.threshold = threshold
        self.min_std_s = min_std_s
        self.min_silence_s = min_silence_s
        self.max_silence_s = max_silence_s
        self._z = _z_for(threshold)
        self._gaps: deque[float] = deque(maxlen=window)
        self._sum = self._sumsq = 0.0
        self.last = now
        self._busy_until = -math.inf
        # Before any gap is seen: the promise itself, with a quarter of it as spread (Akka's
        # first-heartbeat estimate), so the first limit is neither razor-thin nor endless.
        self._add(interval_s)
        self._add(interval_s * 1.5)

    # -- what happened -------------------------------------------------------------------------
    def heartbeat(self, now: float) -> None:
        """A message from the peer arrived at `now` (any message: it is alive)."""
        gap = now - self.last
        if gap < 0:
            return  # an older clock reading: no news
        self._add(max(gap, self.interval_s))
        self.last = now

    def expect_traffic(self, until: float) -> None:
        """Bytes to or from the peer are still moving until `until`: silence counts from then."""
        self._busy_until = max(self._busy_until, until)

    def reset(self, now: float) -> None:
        """Forget the history (a new connection to the peer): start over from the promise."""
        self._gaps.clear()
        self._sum = self._sumsq = 0.0
        self._busy_until = -math.inf
        self.last = now
        self._add(self.interval_s)
        self._add(self.interval_s * 1.5)

    def _add(self, gap: float) -> None:
        if len(self._gaps) == self._gaps.maxlen:
            old = self._gaps[0]
            self._sum -= old
            self._sumsq -= old * old
        self._gaps.append(gap)
        self._sum += gap
        self._sumsq += gap * gap

    # -- the statistics ------------------------------------------------------------------------
    @property
    def mean_s(self) -> float:
        return self._sum / len(self._gaps)

    @property
    def std_s(self) -> float:
        """The gaps' standard deviation, floored at min_std_s."""
        n = len(self._gaps)
        var = max(0.0, self._sumsq / n - (self._sum / n) ** 2)
        return max(math.sqrt(var), self.min_std_s)

    def limit_s(self) -> float:
        """The silence after which the peer is suspected (before `expect_traffic`)."""
        return min(max(self.mean_s + self._z * self.std_s, self.min_silence_s), self.max_silence_s)

    def deadline(self) -> float:
        """When the peer becomes suspect if nothing arrives meanwhile."""
        start = max(self.last, self._busy_until)
        return min(start + self.limit_s(), self.last + self.max_silence_s)

    # -- the verdict ---------------------------------------------------------------------------
    def silence_s(self, now: float) -> float:
        return now - self.last

    def phi(self, now: float) -> float:
        """How unlikely the current silence is for a live peer (-log10 of its probability)."""
        if now < self._busy_until:
            return 0.0
        start = max(self.last, self._busy_until)
        return phi_of(now - start, self.mean_s, self.std_s)

    def suspect(self, now: float) -> bool:
        """The peer has been silent too long: treat it as dead."""
        return now > self.deadline()

    def describe(self, now: float) -> str:
        """One line for logs: the silence, and the limit it passed."""
        return (f"{self.silence_s(now) * 1e3:.0f} ms silent, limit {(self.deadline() - self.last) * 1e3:.0f} ms "
                f"(gaps {self.mean_s * 1e3:.0f} +/- {self.std_s * 1e3:.0f} ms)")


class StallGuard:
    """Whether the observer itself was awake: no verdict right after its own stall.

    A process that was descheduled for a second wakes to find every peer "silent": their
    messages wait in the kernel or in ZeroMQ's I/O thread, not yet where the loop reads them.
    Call `on_time(now)` on every check; after a gap longer than `tolerance_s` since the
    previous call it answers False until `grace_s` has passed, so the loop reads first.
    """

    __slots__ = ("tolerance_s", "grace_s", "_last", "_resume_at", "stalls")

    def __init__(self, tolerance_s: float, grace_s: float, now: float = 0.0):
        self.tolerance_s = tolerance_s
        self.grace_s = grace_s
        self._last = now
        self._resume_at = -math.inf
        self.stalls = 0  # how many times the observer found itself late

    def on_time(self, now: float) -> bool:
        if now - self._last > self.tolerance_s:
            self._resume_at = now + self.grace_s
            self.stalls += 1
        self._last = now
        return now >= self._resume_at
