"""A worker's stateful sessions: per session its client, the next step and the state of the tail's segments.

A session is named by the edge (a random id) and owned by the client token that started it;
a step must be the next one (step 0 starts afresh), anything else is refused with
`session_state` and the step this worker can continue from (`have`, 0 when it holds nothing),
so the edge can replay what is missing. Sessions idle longer than `session_idle_s` expire, and
when their state passes `session_memory_bytes` the least recently used go first; every eviction
is logged and counted (the worker's status carries the counts to the broker's metrics), never
silent. The serving thread steps sessions; the heartbeat thread reads the counts: one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import numpy as np

__all__ = ["SessionRefused", "SessionStore"]

log = logging.getLogger(__name__)


class SessionRefused(Exception):
    """A step this worker will not run: `code` is the wire error code, `have` the step it can continue from."""

    def __init__(self, code: str, message: str, have: int | None = None):
        super().__init__(message)
        self.code = code
        self.have = have


class _Session:
    __slots__ = ("client", "bundle", "cut", "next_step", "state", "nbytes", "last_use")

    def __init__(self, client: str, bundle: str, cut: int):
        self.client, self.bundle, self.cut = client, bundle, cut
        self.next_step = 0
        self.state: dict[str, np.ndarray] = {}
        self.nbytes = 0
        self.last_use = 0.0


class SessionStore:
    """The sessions one worker holds, least recently used first.

    Args:
        idle_s: a session unused this long is dropped (ServerConfig.session_idle_s).
        budget_bytes: the most state bytes all sessions together may hold (ServerConfig.session_memory_bytes).
        name: the worker's name, for the log.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, idle_s: float, budget_bytes: int, name: str = "worker",
                 clock: Callable[[], float] = time.monotonic):
        self.idle_s = idle_s
        self.budget_bytes = budget_bytes
        self.name = name
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.evicted = {"memory": 0, "idle": 0}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: str) -> bool:
        return sid in self._sessions

    def begin(self, sid: str, client: str, step: int, bundle: str, cut: int,
              initial: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The state to run step `step` of session `sid` with; raises SessionRefused (nothing changes then)."""
        with self._lock:
            self._expire(self._clock())
            s = self._sessions.get(sid)
            if s is not None and s.client != client:
                raise SessionRefused("forbidden", f"session {sid[:8]}... belongs to another client")
            if step == 0:
                return initial()  # a fresh start (a replay from the beginning replaces what was held)
            if s is None:
                raise SessionRefused("session_state", f"this worker holds no state for session {sid[:8]}... "
                                                      f"(step {step}): replay from step 0", have=0)
            if (s.bundle, s.cut) != (bundle, cut):
                raise SessionRefused("bad_request", f"session {sid[:8]}... runs bundle {s.bundle[:12]} from cut "
                                                    f"{s.cut}, not {bundle[:12]} from cut {cut}")
            if step != s.next_step:
                raise SessionRefused("session_state", f"session {sid[:8]}... is at step {s.next_step}, got step "
                                                      f"{step}", have=s.next_step)
            return s.state

    def commit(self, sid: str, client: str, step: int, bundle: str, cut: int, state: dict[str, np.ndarray]) -> None:
        """Step `step` ran: keep its next state (then evict the least recently used sessions over the budget)."""
        with self._lock:
            s = self._sessions.get(sid)
            if s is None or step == 0:
                if s is not None:
                    self.nbytes -= s.nbytes
                s = self._sessions[sid] = _Session(client, bundle, cut)
            s.state = state
            self.nbytes -= s.nbytes
            s.nbytes = sum(a.nbytes for a in state.values())
            self.nbytes += s.nbytes
            s.next_step = step + 1
            s.last_use = self._clock()
            self._sessions.move_to_end(sid)
            while self.nbytes > self.budget_bytes and self._sessions:
                # the least recently used first; the session just stepped goes last, and only
                # when it alone is over the budget (its next step then finds nothing held)
                victim = next(iter(self._sessions))
                self._drop(victim, "memory", f"over the session memory budget of {self.budget_bytes} bytes "
                                             f"({self.nbytes} held)")

    def end(self, sid: str, client: str) -> bool:
        """The edge is done with `sid`: drop it (only its own client may); True when something was dropped."""
        with self._lock:
            s = self._sessions.get(sid)
            if s is None or s.client != client:
                return False
            del self._sessions[sid]
            self.nbytes -= s.nbytes
            return True

    def report(self) -> dict:
        """What the broker is told (after dropping idle sessions): count, bytes, evictions by reason."""
        with self._lock:
            self._expire(self._clock())
            return {"count": len(self._sessions), "bytes": self.nbytes, "evicted": dict(self.evicted)}

    def _expire(self, now: float) -> None:
        while self._sessions:
            sid, s = next(iter(self._sessions.items()))
            if now - s.last_use < self.idle_s:
                return
            self._drop(sid, "idle", f"idle for {now - s.last_use:.1f} s (session_idle_s {self.idle_s:g})")

    def _drop(self, sid: str, reason: str, why: str) -> None:
        s = self._sessions.pop(sid)
        self.nbytes -= s.nbytes
        self.evicted[reason] += 1
        log.warning("%s: session %s... evicted at step %d (%d bytes of state): %s", self.name, sid[:8],
                    s.next_step, s.nbytes, why)
