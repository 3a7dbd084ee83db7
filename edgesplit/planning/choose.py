"""Choosing the cut at run time, with hysteresis so that noise in the estimates never flaps it."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Iterable

from edgesplit.errors import ConfigError
from edgesplit.planning.cost import CostModel, CutCost

__all__ = ["ChooserConfig", "CutChooser"]


@dataclass(frozen=True)
class ChooserConfig:
    """How eager :class:`CutChooser` is to move the cut. Validated on construction (ConfigError).

    The edge agent embeds one as ``AgentConfig.chooser``; these defaults are the agent's.
    """

    # A cut must be predicted at least this fraction cheaper than the current one ...
    margin: float = 0.05
    # ... on this many consecutive updates before the chooser moves to it (so noise never flaps it).
    patience: int = 3
    # A cut this much cheaper (a link that collapsed or came back) wins sooner:
    fast_margin: float = 0.30
    # ... after this many consecutive updates.
    fast_patience: int = 1
    # "latency" or "energy" (needs the cost model's DevicePower).
    objective: str = "latency"
    # The link assumed until real traffic has measured it: it picks the initial cut, and the
    # edge agent prices cuts with this bandwidth (bits per second) while it has no estimate.
    assumed_bandwidth_bps: float = 100e6
    assumed_rtt_s: float = 0.020

    def __post_init__(self):
        for name in ("margin", "fast_margin", "assumed_bandwidth_bps", "assumed_rtt_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ConfigError(f"ChooserConfig.{name} must be a number, got {v!r}")
        for name in ("patience", "fast_patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"ChooserConfig.{name} must be an integer, got {v!r}")
        if not 0 <= self.margin < 1 or not 0 <= self.fast_margin < 1:
            raise ConfigError("ChooserConfig.margin and fast_margin must be in [0, 1)")
        if self.patience < 1 or self.fast_patience < 1:
            raise ConfigError("ChooserConfig.patience and fast_patience must be >= 1")
        if self.objective not in ("latency", "energy"):
            raise ConfigError(f"ChooserConfig.objective must be latency or energy, not {self.objective!r}")
        if not 0 < self.assumed_bandwidth_bps < float("inf") or not 0 <= self.assumed_rtt_s < float("inf"):
            raise ConfigError("ChooserConfig.assumed_bandwidth_bps must be > 0 and assumed_rtt_s >= 0 (finite)")

    def replace(self, **changes) -> "ChooserConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"ChooserConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


class CutChooser:
    """Keeps a current cut and moves it only when another is clearly and steadily better.

    Call :meth:`update` with fresh estimates (e.g. after each request, from a
    :class:`~edgesplit.planning.LinkEstimator` and the server's ``load.est_wait_ms``); it
    returns the cut to use next. A cut replaces the current one after it was predicted
    cheaper by more than ``margin`` on ``patience`` consecutive updates (or by more than
    ``fast_margin`` on ``fast_patience`` updates). :meth:`link_down` moves to all-edge at once.

    With a deadline, a cut predicted to answer within it beats every cut predicted to miss it,
    whatever their latencies (and moving from a late cut to an on-time one is a fast gain);
    among on-time cuts, or when none is, the objective decides.

    Args:
        model: the cost model of the bundle (it may learn online; see CostModel.observe_*).
        initial: the first cut (default: the best one on the assumed link).
        config: the hysteresis settings.
        allowed: the cuts that may be chosen (default: every cut 0..n).
        deadline_ms: the budget the initial cut is chosen for (None: none).

    Thread-safe.
    """

    def __init__(self, model: CostModel, initial: int | None = None,
                 config: ChooserConfig | None = None, allowed: Iterable[int] | None = None,
                 deadline_ms: float | None = None):
        self.model = model
        self.config = config or ChooserConfig()
        n = model.num_segments
        self.allowed = sorted(set(range(n + 1) if allowed is None else allowed))
        if not self.allowed or any(not 0 <= k <= n for k in self.allowed):
            raise ConfigError(f"allowed cuts must be a non-empty subset of 0..{n}")
        if initial is None:
            initial = model.best(self.config.assumed_bandwidth_bps, self.config.assumed_rtt_s,
                                 objective=self.config.objective, allowed=self.allowed,
                                 deadline_ms=deadline_ms).cut
        elif initial not in self.allowed:
            raise ConfigError(f"initial cut {initial} is not among the allowed cuts {self.allowed}")
        self._cut = initial
        self._streak = 0
        self._lock = threading.Lock()
        self.switches = 0
        self.history: list[tuple[float, int]] = [(time.monotonic(), initial)]  # (when, new cut)
        self.last_costs: list[CutCost] = []

    @property
    def cut(self) -> int:
        """The cut in use."""
        return self._cut

    @property
    def all_edge(self) -> int:
        return self.model.num_segments

    def update(self, bandwidth_bps: float | None, rtt_s: float | None, queue_s: float = 0.0,
               deadline_ms: float | None = None) -> int:
        """Re-evaluate with the latest estimates; returns the cut to use now.

        Args:
            bandwidth_bps: estimated link bandwidth (None: unknown, the cut stays).
            rtt_s: estimated round trip (None: unknown, the cut stays).
            queue_s: the cloud's expected queueing delay (its pong's ``est_wait_ms`` / 1000).
            deadline_ms: the request's budget (None: none): on-time cuts come first.
        """
        if bandwidth_bps is None or rtt_s is None:
            return self._cut
        obj = self.config.objective
        with self._lock:
            costs = self.model.costs(bandwidth_bps, rtt_s, queue_s, self.allowed)
            self.last_costs = costs
            by_cut = {c.cut: c for c in costs}
            best = min(reversed(costs), key=lambda c: _rank(c, obj, deadline_ms))
            here = by_cut[self._cut]
            current = here.objective(obj)
            new = best.objective(obj)
            if best.cut == self._cut or not current > 0:
                self._streak = 0
                return self._cut
            if _late(here, deadline_ms) and not _late(best, deadline_ms):
                gain = 1.0  # late -> on time: as clear a gain as there is
            else:
                gain = 1.0 - new / current if current != float("inf") else 1.0
            cfg = self.config
            if gain > cfg.margin:
                self._streak += 1
            else:
                self._streak = 0
                return self._cut
            if (gain > cfg.fast_margin and self._streak >= cfg.fast_patience) or self._streak >= cfg.patience:
                self._switch(best.cut)
            return self._cut

    def link_down(self) -> int:
        """The cloud is unreachable: run everything on the device, now."""
        # All-edge needs no link, so it is always possible, allowed or not.
        with self._lock:
            self._switch(self.all_edge)
            return self._cut

    def force(self, k: int) -> None:
        """Set the cut (e.g. the user pinned one); the hysteresis starts over."""
        if not 0 <= k <= self.model.num_segments:
            raise ConfigError(f"cut {k} is outside 0..{self.model.num_segments}")
        with self._lock:
            self._switch(k)

    def _switch(self, k: int) -> None:
        self._streak = 0
        if k != self._cut:
            self._cut = k
            self.switches += 1
            self.history.append((time.monotonic(), k))

    def __repr__(self) -> str:
        return f"CutChooser(cut={self._cut}, switches={self.switches})"


def _late(c: CutCost, deadline_ms: float | None) -> bool:
    return deadline_ms is not None and c.total_ms > deadline_ms


def _rank(c: CutCost, objective: str, deadline_ms: float | None) -> tuple[bool, float]:
    """Sort key: on-time cuts first, then by the objective."""
    return _late(c, deadline_ms), c.objective(objective)
