"""The broker's state as the admin endpoints see it: one consistent dict, rebuilt by the broker's thread.

The broker thread builds it when something changed (and on every tick) and swaps it in under
the lock; the admin thread only reads the last one, so it never sees a half-updated registry.
"""

from __future__ import annotations

import threading

from cloud_server.dispatch import Dispatcher
from cloud_server.metrics import Metrics
from cloud_server.registry import BundleCatalog, WorkerRegistry

__all__ = ["AdminView"]


class AdminView:
    """Builds the snapshot (and the gauges that mirror it); `get` is thread-safe.

    Args:
        metrics: the live-worker, queue and in-flight gauges are set here.
        lock: the lock shared with the registry.
        registry / dispatcher / catalog: what the snapshot shows.
    """

    def __init__(self, metrics: Metrics, lock: threading.Lock, registry: WorkerRegistry, dispatcher: Dispatcher,
                 catalog: BundleCatalog):
        self.metrics = metrics
        self._lock = lock
        self.registry, self.dispatcher, self.catalog = registry, dispatcher, catalog
        self._snapshot: dict = {}

    def update(self, addresses: dict, draining: bool, curve: bool, stopped: bool = False) -> None:
        """Rebuild; `addresses`: front, back, remote."""
        m = self.metrics
        d = self.dispatcher
        workers = []
        for w in self.registry:
            workers.append(w.describe())
            m.worker_inflight.labels(w.name).set(len(w.inflight))
        m.live_workers.set(sum(1 for w in workers if not w["draining"]))
        m.queued.set(len(d.pending))
        m.inflight.set(len(d.reqs) - len(d.pending))
        bundles = []
        for bid, s in sorted(self.catalog.bundles.items()):
            bundles.append({**s, "loaded_on": [w["name"] for w in workers if bid in w["loaded"]],
                            "available_on": [w["name"] for w in workers if bid in w["available"]],
                            "profile": self.catalog.profiles.get(bid)})
        snap = {**addresses, "workers": workers, "bundles": bundles, "pipelines": d.pipelines.describe() if d.pipelines else [],
                "load": d.load(), "draining": draining, "stopped": stopped, "lost": list(self.registry.lost),
                "ready": any(w["loaded"] or w["stages"] for w in workers if not w["draining"]) and not draining,
                "curve": curve}
        with self._lock:
            self._snapshot = snap

    def get(self) -> dict:
        with self._lock:
            return self._snapshot
