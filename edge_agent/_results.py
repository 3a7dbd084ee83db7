"""What the agent hands back: one answer (InferenceResult) and the link monitor's view (LinkStats)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["InferenceResult", "LinkStats", "ServerStats"]


@dataclass(frozen=True)
class InferenceResult:
    """One answer.

    Attributes:
        outputs: the model's outputs by name.
        where: "cloud" (the tail ran on a server) or "local" (it ran on this device).
        cut: the cut used (segments [0, cut) ran on the device first).
        timings: milliseconds: head, encode, network, tail, total (+ queue, decode when cloud).
            For "cloud", network is the round trip minus the server's own time, and tail is
            the server's compute time; for "local", network is the time spent waiting for a
            cloud answer that did not come (0 if none was tried).
        server: the address that answered ("cloud"), else None.
        reason: why a "local" answer is local (e.g. "link down", "deadline"), else None.
    """

    outputs: dict[str, np.ndarray]
    where: str
    cut: int
    timings: dict[str, float]
    server: str | None = None
    reason: str | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass(frozen=True)
class ServerStats:
    """What the link monitor knows about one server."""

    address: str
    state: str  # "up", "connecting", "down", "banned"
    rtt_ms: float | None
    load: dict
    in_flight: int
    holds_bundle: bool | None


@dataclass(frozen=True)
class LinkStats:
    """Estimates from real traffic, and the counters of what happened so far."""

    rtt_ms: float | None
    bandwidth_bps: float | None
    cut: int | None
    servers: tuple[ServerStats, ...]
    counters: dict[str, int]
