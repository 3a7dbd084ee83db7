"""The broker's session routes: each stateful session's steps go to the worker that holds its state.

A session is bound to a worker by its first dispatched step and stays there while that worker
lives (the registry still knows it). A lost worker's sessions simply find no live holder: their
next step goes to another worker, which holds nothing and answers `session_state` with have=0,
and the edge replays. Routes idle past ServerConfig.session_idle_s are forgotten like the
workers' sessions. The workers' session counts and evictions (from their heartbeats) become
the broker's metrics here.
"""

from __future__ import annotations

from typing import Any

from cloud_server.config import ServerConfig
from cloud_server.metrics import Metrics
from cloud_server.registry import WorkerRecord, WorkerRegistry

__all__ = ["SessionRoutes"]


class SessionRoutes:
    """Session id -> the worker that holds it, and the pool's session metrics."""

    def __init__(self, config: ServerConfig, registry: WorkerRegistry, metrics: Metrics):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self._where: dict[str, tuple[bytes, float]] = {}  # session -> (worker ident, last step dispatched)
        self._counts: dict[bytes, int] = {}  # worker -> sessions it reported holding
        self._evicted: dict[bytes, dict[str, int]] = {}  # worker -> its eviction counters (cumulative)

    def __len__(self) -> int:
        return len(self._where)

    def holder(self, sid: str) -> WorkerRecord | None:
        """The live worker holding `sid`, or None (never bound, expired, or its worker was lost)."""
        got = self._where.get(sid)
        if got is None:
            return None
        w = self.registry.get(got[0])
        if w is None or w.draining:
            del self._where[sid]
            return None
        return w

    def bind(self, sid: str, w: WorkerRecord, now: float) -> None:
        self._where[sid] = (w.ident, now)

    def end(self, sid: str) -> WorkerRecord | None:
        """Forget `sid`; the worker that held it (to tell), if it lives."""
        w = self.holder(sid)
        self._where.pop(sid, None)
        return w

    def expire(self, now: float) -> None:
        idle = self.config.session_idle_s
        for sid in [s for s, (_, t) in self._where.items() if now - t > idle]:
            del self._where[sid]

    def observe(self, w: WorkerRecord, status: dict) -> None:
        """A worker's heartbeat: its sessions count towards the gauge, new evictions to the counter."""
        rep: Any = status.get("sessions")
        if not isinstance(rep, dict):
            return
        count = rep.get("count")
        if type(count) is int and 0 <= count:
            self._counts[w.ident] = count
        evicted = rep.get("evicted")
        if isinstance(evicted, dict):
            before = self._evicted.setdefault(w.ident, {})
            for reason in ("memory", "idle"):
                n = evicted.get(reason)
                if type(n) is int and n > before.get(reason, 0):
                    self.metrics.sessions_evicted.labels(reason).inc(n - before.get(reason, 0))
                    before[reason] = n
        for ident in [i for i in self._counts if self.registry.get(i) is None]:
            self._counts.pop(ident, None)
            self._evicted.pop(ident, None)
        self.metrics.sessions.set(sum(self._counts.values()))
