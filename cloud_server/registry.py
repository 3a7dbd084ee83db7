"""Who serves what: the broker's worker registry (status, liveness, drop) and its catalogue of bundles.

`WorkerRegistry.is_lost` is the one place that decides when a silent worker is gone: each
worker has an adaptive failure detector (edgesplit.liveness) fed by every message it sends, so
a worker whose heartbeats come late on a loaded box gets a longer limit while a dead one on a
quiet box is found within about heartbeat_interval_s + 5.6 * liveness_min_std_s.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Iterator

from edgesplit import protocol as P
from edgesplit.liveness import FailureDetector, StallGuard

from cloud_server.config import ServerConfig
from cloud_server.metrics import Metrics
from cloud_server.repository import Repository, bundle_summary

__all__ = ["WorkerRecord", "WorkerRegistry", "BundleCatalog", "SocketLink"]

log = logging.getLogger(__name__)


class SocketLink:
    """The way to the workers on one broker ROUTER socket."""

    __slots__ = ("sock",)

    def __init__(self, sock):
        self.sock = sock

    def send(self, ident: bytes, frames: list, small: int = 1) -> None:
        """[ident, *frames]: identity and the first `small` frames as copies, the rest zero-copy."""
        P.send_frames(self.sock, [ident, *frames], small + 1)


class WorkerRecord:
    """What the broker knows of one worker: who it is, what it holds, what it computes now."""

    __slots__ = ("ident", "name", "device", "runner", "pid", "capacity", "available", "loaded", "inflight",
                 "last_heard", "draining", "queued", "joined", "host", "link", "liveness", "fetches", "stages",
                 "assigned", "memory_budget", "memory_used", "unfit")

    def __init__(self, ident: bytes, info: dict, capacity: int, now: float, link,
                 liveness: FailureDetector | None = None):
        self.ident = ident
        self.name = str(info.get("name") or ident.hex())[:128]
        self.device = str(info.get("device") or "?")[:64]
        self.runner = str(info.get("runner") or "?")[:64]
        self.host = str(info.get("host") or "?")[:128]
        self.pid = info.get("pid")
        cap = info.get("capacity")
        self.capacity = cap if isinstance(cap, int) and 0 < cap <= 4096 else capacity
        self.available: set[str] = set()
        self.fetches = info.get("fetch") is True  # fetches a bundle it does not hold from the broker
        self.loaded: set[str] = set()
        self.inflight: dict[bytes, Any] = {}  # rkey -> the broker's Request
        self.last_heard = now
        self.draining = False
        self.queued = 0
        self.joined = time.time()
        self.link = link  # how the broker reaches it: a SocketLink, or the inline worker
        self.liveness = liveness  # its failure detector (None: judged by last_heard alone)
        # pipeline stages (cloud_server.placement): what it says it holds, what the broker gave it
        self.stages: dict[str, tuple[int, int]] = {}  # bundle -> [start, stop) loaded
        self.assigned: dict[str, tuple[int, int, int]] = {}  # bundle -> (start, stop, weight bytes) placed here
        self.memory_budget = 0  # bytes of segment weights it may hold (0: no limit), and holds now
        self.memory_used = 0
        self.unfit: set[str] = set()  # bundles it did not load whole: over its budget

    def send(self, frames: list, small: int = 1) -> None:
        self.link.send(self.ident, frames, small)

    def heard(self, now: float) -> None:
        """Any message from the worker: it is alive."""
        self.last_heard = now
        if self.liveness is not None:
            self.liveness.heartbeat(now)

    @property
    def has_room(self) -> bool:
        return not self.draining and len(self.inflight) < self.capacity

    def holds(self, bundle: str, start: int, stop: int) -> bool:
        """Segments [start, stop) of `bundle` are loaded here (as a stage, or the whole bundle)."""
        if bundle in self.loaded:
            return True
        st = self.stages.get(bundle)
        return st is not None and st[0] <= start and stop <= st[1]

    def free_memory(self) -> float:
        """Bytes of weights it can still take (infinite without a budget); stages placed here
        but not loaded yet count as taken."""
        if not self.memory_budget:
            return math.inf
        coming = sum(b for bundle, (a, z, b) in self.assigned.items() if self.stages.get(bundle) != (a, z))
        return self.memory_budget - self.memory_used - coming

    def fits_whole(self, nbytes: int) -> bool:
        """A bundle of `nbytes` of weights fits it whole now."""
        return nbytes <= self.free_memory()

    def apply_status(self, status: dict, catalog: "BundleCatalog") -> bool:
        """Take in a worker's status (untrusted shapes are ignored); True when what it serves changed."""
        before = (self.loaded, self.available, self.draining, self.stages)
        avail = status.get("available")
        if isinstance(avail, list):
            ids = set()
            for s in avail:
                if isinstance(s, dict) and isinstance(s.get("id"), str) and isinstance(s.get("segments"), int):
                    ids.add(s["id"])
                    catalog.announce(s)
            self.available = ids
        loaded = status.get("loaded")
        if isinstance(loaded, list):
            self.loaded = {b for b in loaded if isinstance(b, str)}
        runner = status.get("runner")
        if isinstance(runner, str):
            self.runner = runner[:64]
        q = status.get("queued")
        if isinstance(q, int):
            self.queued = q
        cap = status.get("capacity")  # a worker serving several brokers grants each what it can give now
        if isinstance(cap, int) and not isinstance(cap, bool) and 0 <= cap <= 4096:
            self.capacity = cap
        profiles = status.get("profiles")
        if isinstance(profiles, dict):
            for bid, prof in profiles.items():
                if isinstance(prof, dict) and isinstance(prof.get("segment_ms"), list):
                    catalog.profiles[bid] = {"segment_ms": prof["segment_ms"],
                                             "device": str(prof.get("device", self.device))}
        stages = status.get("stages")
        if isinstance(stages, dict):
            held = {}
            for bid, st in list(stages.items())[:256]:
                if type(st) is list and len(st) == 3 and type(st[0]) is int and type(st[1]) is int \
                        and 0 <= st[0] < st[1]:
                    held[bid] = (st[0], st[1])
                    catalog.stage_profile(bid, st[0], st[2], self.device)
            self.stages = held
        unfit = status.get("unfit")
        if isinstance(unfit, list):
            self.unfit = {b for b in unfit[:4096] if isinstance(b, str)}
        mem = status.get("memory")
        if type(mem) is list and len(mem) == 2 and all(type(x) is int and x >= 0 for x in mem):
            self.memory_budget, self.memory_used = mem
        if status.get("draining"):
            self.draining = True
        return (self.loaded, self.available, self.draining, self.stages) != before

    def describe(self) -> dict:
        """The worker as /v1/models shows it."""
        return {"name": self.name, "device": self.device, "runner": self.runner, "host": self.host, "pid": self.pid,
                "inflight": len(self.inflight), "queued": self.queued, "capacity": self.capacity,
                "loaded": sorted(self.loaded), "available": sorted(self.available), "draining": self.draining,
                "stages": {b: list(r) for b, r in self.stages.items()},
                "memory": {"budget": self.memory_budget, "used": self.memory_used}, "unfit": sorted(self.unfit),
                "joined": self.joined}


class WorkerRegistry:
    """The workers the broker knows, and the decision of when a silent one is lost.

    Args:
        config: the ServerConfig (capacity default, heartbeat interval and liveness).
        metrics: gauges of live workers are kept here.
        lock: guards the dict against the admin thread's reads.
    """

    def __init__(self, config: ServerConfig, metrics: Metrics, lock: threading.Lock):
        self.config = config
        self.metrics = metrics
        self._lock = lock
        self._workers: dict[bytes, WorkerRecord] = {}
        self.lost: list[dict] = []  # the last workers dropped for silence (for /v1/models)
        # bundles a worker may fetch from the broker when none holds them (the broker sets it)
        self.fetchable: Callable[[str], bool] = lambda bundle: False
        # the weight bytes of a bundle, for workers with a memory budget (the broker sets it)
        self.bundle_bytes: Callable[[str], int] = lambda bundle: 0
        # The broker's own wake-ups: after it slept past a check (a loaded box), it reads its
        # sockets before judging anyone silent.
        self._awake = StallGuard(max(0.1, config.heartbeat_interval_s / 2), 0.02, time.monotonic())

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(list(self._workers.values()))

    def get(self, ident: bytes) -> WorkerRecord | None:
        return self._workers.get(ident)

    def add(self, ident: bytes, info: dict, now: float, link, catalog: BundleCatalog) -> WorkerRecord:
        w = WorkerRecord(ident, info, self.config.worker_capacity, now, link, self.config.failure_detector(now))
        with self._lock:
            self._workers[ident] = w
        w.apply_status(info, catalog)
        self.metrics.worker_up.labels(w.name, w.device).set(1)
        log.info("worker %s joined (%s, %s, pid %s, %d bundles)", w.name, w.device, w.runner, w.pid,
                 len(w.available))
        return w

    def remove(self, w: WorkerRecord, why: str, lost: bool = True) -> list:
        """Forget a worker; returns its requests in flight, oldest first (the caller re-routes them)."""
        with self._lock:
            self._workers.pop(w.ident, None)
        m = self.metrics
        m.worker_up.remove(w.name, w.device)
        m.worker_inflight.remove(w.name)
        if lost:
            m.workers_lost.inc()
            log.warning("worker %s %s; re-dispatching %d requests", w.name, why, len(w.inflight))
        else:
            log.info("worker %s %s", w.name, why)
        orphans = sorted(w.inflight.values(), key=lambda r: r.t0)
        w.inflight.clear()
        return orphans

    # -- liveness ---------------------------------------------------------------------------------
    def is_lost(self, w: WorkerRecord, now: float) -> bool:
        """The liveness decision: the worker's failure detector suspects it."""
        if w.liveness is None:
            return now - w.last_heard > self.config.liveness_max_silence_s
        return w.liveness.suspect(now)

    def next_verdict(self) -> float:
        """The earliest time a worker can become lost if nothing arrives (the broker's next check)."""
        return min((w.liveness.deadline() for w in self._workers.values() if w.liveness is not None),
                   default=math.inf)

    def silent(self, now: float, unread: bool = False) -> list[tuple[WorkerRecord, str]]:
        """The workers lost by now, each with why; they are recorded for /v1/models.

        `unread`: messages from workers wait to be read, so nobody is judged now.
        """
        if not self._awake.on_time(now) or unread:
            return []
        gone = []
        for w in self:
            if self.is_lost(w, now):
                silent_ms = (now - w.last_heard) * 1e3
                self.lost.append({"name": w.name, "pid": w.pid, "silent_ms": round(silent_ms, 1),
                                  "inflight": len(w.inflight), "at": time.time()})
                del self.lost[:-32]
                why = w.liveness.describe(now) if w.liveness is not None else f"{silent_ms:.0f} ms silent"
                gone.append((w, f"silent too long ({why})"))
        return gone

    @property
    def broker_stalls(self) -> int:
        """How often the broker found itself asleep past a liveness check."""
        return self._awake.stalls

    # -- choosing ---------------------------------------------------------------------------------
    def pick(self, bundle: str) -> WorkerRecord | None:
        """The least-loaded live worker with room that holds `bundle` (loaded ones first on a tie)."""
        best, best_key = None, None
        for w in self._workers.values():
            if w.draining or bundle not in w.available:
                continue
            load = len(w.inflight)
            if load >= w.capacity:
                continue
            if w.memory_budget and bundle not in w.loaded and not w.fits_whole(self.bundle_bytes(bundle)):
                continue  # it would refuse to load it (pipeline stages serve such a bundle)
            key = (load, bundle not in w.loaded)
            if best_key is None or key < best_key:
                best, best_key = w, key
        if best is None and self.fetchable(bundle) and not self.serves(bundle):
            # nobody holds it: a worker that fetches bundles gets it from this broker's repository
            room = [w for w in self._workers.values() if w.fetches and not w.draining and len(w.inflight) < w.capacity]
            best = min(room, key=lambda w: len(w.inflight), default=None)
        return best

    def live(self) -> list[WorkerRecord]:
        return [w for w in self._workers.values() if not w.draining]

    def any_room(self) -> bool:
        return any(w.has_room for w in self._workers.values())

    def serves(self, bundle: str) -> bool:
        """Some worker holds `bundle` (loaded or on disk)."""
        return any(bundle in w.available for w in self._workers.values())

    def has_loaded(self, bundle: str) -> bool:
        return any(bundle in w.loaded for w in self._workers.values())


class BundleCatalog:
    """Every bundle the broker knows (its repository's and what workers announce), and their profiles."""

    def __init__(self, repository: Repository | None, rescan_interval_s: float):
        self.repository = repository
        self.rescan_interval_s = rescan_interval_s
        self.bundles: dict[str, dict] = {}  # id -> summary
        self.profiles: dict[str, dict] = {}  # id -> {"segment_ms": [...], "device": str}
        self._stage_ms: dict[str, list] = {}  # id -> per segment ms from pipeline stages (None: not yet timed)
        self.on_new: Callable[[str, dict], None] = lambda bundle, summary: None  # a bundle first heard of
        self._last_scan = -math.inf

    def get(self, bundle: str) -> dict | None:
        """The summary of `bundle`; an unknown id re-reads the repository first (rate-limited)."""
        info = self.bundles.get(bundle)
        if info is None and self.rescan():
            info = self.bundles.get(bundle)
        return info

    def stage_profile(self, bundle: str, start: int, ms, device: str) -> None:
        """A stage's times of its segments [start, ...): once every segment is timed, the bundle's profile."""
        info = self.bundles.get(bundle)
        n = info.get("segments") if info else None
        if type(n) is not int or type(ms) is not list or start + len(ms) > n \
                or not all(type(x) in (int, float) for x in ms):
            return
        got = self._stage_ms.setdefault(bundle, [None] * n)
        got[start:start + len(ms)] = ms
        if None not in got and bundle not in self.profiles:
            self.profiles[bundle] = {"segment_ms": list(got), "device": device}

    def bytes_of(self, bundle: str) -> int:
        """Weight bytes of a bundle from its summary (0 when unknown)."""
        sizes = (self.bundles.get(bundle) or {}).get("segment_bytes")
        return sum(b for b in sizes if type(b) is int) if type(sizes) is list else 0

    def announce(self, summary: dict) -> None:
        if summary["id"] not in self.bundles:
            self.bundles[summary["id"]] = summary
            self.on_new(summary["id"], summary)

    def rescan(self, force: bool = False) -> bool:
        """Re-read the repository (rate-limited); True when it was read."""
        if self.repository is None:
            return False
        now = time.monotonic()
        if not force and now - self._last_scan < self.rescan_interval_s:
            return False
        self._last_scan = now
        self.repository.scan()
        for bid in self.repository.ids():
            if bid not in self.bundles:
                self.bundles[bid] = bundle_summary(self.repository.manifest(bid))
                self.on_new(bid, self.bundles[bid])
        return True
