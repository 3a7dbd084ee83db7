"""Pipeline stages: one bundle's segments over several workers (model parallelism), placed by the broker.

A bundle is served in stages when no live worker can hold its weights whole within its memory
budget (ServerConfig.worker_memory_bytes, reported by each worker), or when
ServerConfig.pipeline_stages asks for at least that many. `plan_stages` cuts the segments
[0, n) into contiguous ranges, each within the budget, so that the slowest stage (which sets
the pipeline's throughput) is as fast as it can be, from the segments' profiled times (their
weight bytes when no profile is known). `Pipelines` gives each stage a worker of its own (it
sends it a "load" of that range), gives the spare workers to the slowest stages as replicas,
and mends a placement when a worker is lost: a stage left without a worker gets a spare one, or
a replica taken from the stage that can best lose one.

A request at cut k enters at the stage holding segment k; each stage runs its hop and answers
with the next hop's request, which the broker sends on (cloud_server.dispatch): the broker
keeps owning the request between hops, so a lost stage costs only its own hop again.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

from cloud_server.config import ServerConfig
from cloud_server.metrics import Metrics
from cloud_server.registry import BundleCatalog, WorkerRecord, WorkerRegistry

__all__ = ["plan_stages", "Stage", "Placement", "Pipelines"]

log = logging.getLogger(__name__)


def plan_stages(sizes: Sequence[int], costs: Sequence[float], budget: float, stages: int) -> list[tuple[int, int]] | None:
    """Contiguous ranges covering segments [0, n): exactly `stages` of them (fewer when n is smaller),
    each of at most `budget` bytes (0: no limit), with the largest stage cost as small as it can be.

    None when no such split exists (a segment larger than the budget). Dynamic programming over
    (stages, prefix): O(stages * n^2), n being a bundle's segment count.
    """
    n = len(sizes)
    if n == 0 or len(costs) != n:
        return None
    limit = budget if budget > 0 else math.inf
    stages = max(1, min(stages, n))
    pre_b = [0]
    pre_c = [0.0]
    for b, c in zip(sizes, costs):
        pre_b.append(pre_b[-1] + b)
        pre_c.append(pre_c[-1] + c)
    inf = math.inf
    # best[s][i]: the smallest bottleneck covering segments [0, i) with s stages; cut[s][i]: its last stage's start
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                if best[s - 1][j] == inf or pre_b[i] - pre_b[j] > limit:
                    continue
                v = max(best[s - 1][j], pre_c[i] - pre_c[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    if best[stages][n] == inf:
        return None
    ranges, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        ranges.append((j, i))
        i = j
    return ranges[::-1]


def fewest_stages(sizes: Sequence[int], budget: float) -> int | None:
    """The fewest contiguous ranges within `budget` bytes each (greedy is optimal here); None if a segment is larger."""
    if budget <= 0:
        return 1
    count, acc = 1, 0
    for b in sizes:
        if b > budget:
            return None
        if acc + b > budget:
            count, acc = count + 1, 0
        acc += b
    return count


class Stage:
    """Segments [start, stop) of a placed bundle and the workers given them (loading or loaded)."""

    __slots__ = ("index", "start", "stop", "weight_bytes", "est_ms", "workers", "hops")

    def __init__(self, index: int, start: int, stop: int, weight_bytes: int, est_ms: float):
        self.index, self.start, self.stop = index, start, stop
        self.weight_bytes, self.est_ms = weight_bytes, est_ms
        self.workers: list[WorkerRecord] = []
        self.hops = 0

    def ready(self, bundle: str) -> list[WorkerRecord]:
        """The stage's workers that hold its segments now (their last status said so)."""
        return [w for w in self.workers if w.holds(bundle, self.start, self.stop)]

    def load_per_worker(self) -> float:
        return self.est_ms / max(1, len(self.workers))


class Placement:
    """One bundle's stages, in segment order."""

    def __init__(self, bundle: str, name: str, stages: list[Stage]):
        self.bundle, self.name, self.stages = bundle, name, stages

    def stage_at(self, k: int) -> Stage | None:
        """The stage holding segment k (where a hop starting at k runs)."""
        for st in self.stages:
            if st.start <= k < st.stop:
                return st
        return None

    def holds(self, w: WorkerRecord) -> Stage | None:
        return next((st for st in self.stages if w in st.workers), None)

    def describe(self) -> dict:
        """The placement as /v1/models shows it."""
        return {"bundle": self.bundle, "name": self.name,
                "stages": [{"stage": st.index, "segments": [st.start, st.stop], "weight_bytes": st.weight_bytes,
                            "est_ms": round(st.est_ms, 4), "workers": [w.name for w in st.workers],
                            "ready": [w.name for w in st.ready(self.bundle)], "hops": st.hops}
                           for st in self.stages]}


class Pipelines:
    """The broker's placements of staged bundles: made on first need, mended when workers come and go.

    Args:
        config: the ServerConfig (pipeline_stages).
        registry: the workers to place on.
        catalog: the bundles (segment sizes, profiles).
        metrics: per-stage gauges and hop counters.
        send_load: orders a worker to load a range: send_load(worker, bundle, start, stop).
        stopping: True once the broker shuts down.
    """

    def __init__(self, config: ServerConfig, registry: WorkerRegistry, catalog: BundleCatalog, metrics: Metrics,
                 send_load: Callable[[WorkerRecord, str, int, int], None], stopping: Callable[[], bool] = lambda: False):
        self.config = config
        self.stopping = stopping  # the broker is shutting down: workers leave, nothing is placed again
        self.registry = registry
        self.catalog = catalog
        self.metrics = metrics
        self.send_load = send_load
        self.placed: dict[str, Placement] = {}
        # bundle -> why it is staged: "budget" (no worker holds it whole), "asked" (pipeline_stages),
        # or None (whole workers serve it); cleared when the workers change
        self._staged: dict[str, str | None] = {}
        self._stuck: set[str] = set()  # bundles that could not be placed (logged once)
        self.why_not: dict[str, str] = {}  # bundle -> why it could not be placed yet (in "deadline" errors)

    # -- which bundles --------------------------------------------------------------------------
    def plan(self, bundle: str, quiet: bool = False) -> Placement | None:
        """The placement to dispatch `bundle`'s requests on, made now if it is needed; None: whole workers serve it.

        `quiet`: a placement that cannot be made yet is not logged (the pool is still coming up).
        """
        if bundle not in self._staged:
            self._staged[bundle] = self._needs_stages(bundle)
        why = self._staged[bundle]
        if why is None:
            return None
        p = self.placed.get(bundle) or self._place(bundle, quiet)
        # stages asked for but not possible now (too few workers): whole workers serve it meanwhile
        return None if p is None and why == "asked" else p

    def _sizes(self, bundle: str) -> list[int] | None:
        info = self.catalog.bundles.get(bundle) or {}
        sizes, n = info.get("segment_bytes"), info.get("segments")
        if type(n) is not int or type(sizes) is not list or len(sizes) != n or \
                not all(type(b) is int and b >= 0 for b in sizes):
            return None  # an old or odd summary: served whole
        return sizes

    def _needs_stages(self, bundle: str) -> str | None:
        info = self.catalog.bundles.get(bundle) or {}
        sizes = self._sizes(bundle)
        if sizes is None or info.get("stateful") or len(sizes) < 2:
            return None  # a session's state lives with one worker: stateful bundles are never staged
        holders = self._eligible(bundle)
        if holders and not any(w.fits_whole(sum(sizes)) or bundle in w.loaded for w in holders):
            return "budget"
        return "asked" if self.config.pipeline_stages >= 2 else None

    def _eligible(self, bundle: str) -> list[WorkerRecord]:
        return [w for w in self.registry.live() if bundle in w.available or w.fetches]

    # -- placing ------------------------------------------------------------------------------
    def _costs(self, bundle: str, sizes: list[int]) -> list[float]:
        prof = self.catalog.profiles.get(bundle)
        ms = prof.get("segment_ms") if isinstance(prof, dict) else None
        if type(ms) is list and len(ms) == len(sizes) and all(type(x) in (int, float) and x >= 0 for x in ms):
            return [float(x) for x in ms]
        return [float(b) for b in sizes]  # no profile yet: time follows the weights (a MatMul's does)

    def _place(self, bundle: str, quiet: bool = False) -> Placement | None:
        sizes = self._sizes(bundle)
        workers = self._eligible(bundle)
        if sizes is None or not workers:
            return None
        costs = self._costs(bundle, sizes)
        budget = max(w.free_memory() for w in workers)
        fewest = fewest_stages(sizes, 0 if budget == math.inf else budget)
        count = max(fewest or 0, self.config.pipeline_stages)
        ranges = plan_stages(sizes, costs, 0 if budget == math.inf else budget, count) if fewest is not None else None
        why = None
        if ranges is None:
            why = f"a segment is larger than any worker's free memory ({budget / 1e6:.1f} MB)"
        elif len(ranges) > len(workers):
            why = f"it needs {len(ranges)} stages and only {len(workers)} workers can hold one"
        if why is not None:
            self.why_not[bundle] = why
            if not quiet and bundle not in self._stuck:
                self._stuck.add(bundle)
                log.warning("cannot place bundle %s in pipeline stages yet: %s", bundle[:12], why)
            return None
        stages = [Stage(i, a, b, sum(sizes[a:b]), sum(costs[a:b])) for i, (a, b) in enumerate(ranges)]
        info = self.catalog.bundles.get(bundle) or {}
        p = Placement(bundle, str(info.get("name", "?"))[:64], stages)
        # the biggest stages first, each to the worker with the most room that it fits
        free, chosen = set(workers), []
        for st in sorted(stages, key=lambda st: -st.weight_bytes):
            w = max((w for w in free if w.free_memory() >= st.weight_bytes), key=lambda w: w.free_memory(),
                    default=None)
            if w is None:
                self.why_not[bundle] = (f"no worker has {st.weight_bytes / 1e6:.1f} MB free for segments "
                                        f"[{st.start}, {st.stop})")
                if not quiet:
                    log.warning("cannot place bundle %s in pipeline stages yet: %s", bundle[:12], self.why_not[bundle])
                return None
            free.discard(w)
            chosen.append((st, w))
        for st, w in chosen:
            self._assign(p, st, w)
        self._stuck.discard(bundle)
        self.why_not.pop(bundle, None)
        self.placed[bundle] = p
        self._add_replicas(p, free)
        log.info("bundle %s placed in %d stages: %s", p.name, len(stages),
                 ", ".join(f"[{st.start}, {st.stop}) {st.weight_bytes / 1e6:.1f} MB on "
                           f"{'+'.join(w.name for w in st.workers)}" for st in stages))
        return p

    def _assign(self, p: Placement, st: Stage, w: WorkerRecord) -> None:
        st.workers.append(w)
        w.assigned[p.bundle] = (st.start, st.stop, st.weight_bytes)
        self.send_load(w, p.bundle, st.start, st.stop)
        self.metrics.stage_workers.labels(p.bundle, p.name, str(st.index)).set(len(st.workers))

    def _add_replicas(self, p: Placement, spare) -> None:
        """Spare workers become replicas of the stages that are slowest per worker."""
        for w in sorted(spare, key=lambda w: -w.free_memory()):
            fits = [st for st in p.stages if w.free_memory() >= st.weight_bytes]
            if fits:
                self._assign(p, max(fits, key=Stage.load_per_worker), w)

    # -- mending ------------------------------------------------------------------------------
    def workers_changed(self) -> None:
        """A worker joined, left or changed what it holds: decide again which bundles are staged,
        and give every stage left without a worker another one."""
        self._staged.clear()
        if self.stopping():
            return
        live = set(self.registry.live())
        for bundle, p in list(self.placed.items()):
            for st in p.stages:
                st.workers = [w for w in st.workers if w in live]
            if not self.plan(bundle) is p:  # no longer staged (a worker that holds it whole came)
                self._forget(p)
                continue
            spare = [w for w in self._eligible(bundle) if p.holds(w) is None]
            for st in p.stages:
                if not st.workers:
                    self._mend(p, st, spare)  # takes the spare it uses out of the list
            self._add_replicas(p, spare)
            for st in p.stages:
                self.metrics.stage_workers.labels(bundle, p.name, str(st.index)).set(len(st.workers))
        for bundle in list(self.catalog.bundles):  # place what is needed as soon as it can be
            if bundle not in self.placed:
                self.plan(bundle, quiet=True)

    def _mend(self, p: Placement, st: Stage, spare: list[WorkerRecord]) -> None:
        w = max((w for w in spare if w.free_memory() >= st.weight_bytes), key=lambda w: w.free_memory(), default=None)
        if w is not None:
            spare.remove(w)
        else:  # take a replica from the stage that can best lose one (it frees that stage's weights)
            donors = [(o, d) for o in p.stages if len(o.workers) > 1 for d in o.workers
                      if d.free_memory() + o.weight_bytes >= st.weight_bytes]
            if not donors:
                log.warning("bundle %s: stage [%d, %d) has no worker left and none can take it over",
                            p.name, st.start, st.stop)
                return
            other, w = min(donors, key=lambda od: (od[0].est_ms / (len(od[0].workers) - 1), od[1].free_memory()))
            other.workers.remove(w)
            w.memory_used = max(0, w.memory_used - other.weight_bytes)  # it gives that range back on loading ours
        log.warning("bundle %s: stage [%d, %d) lost its workers; placed again on %s", p.name, st.start, st.stop,
                    w.name)
        self._assign(p, st, w)

    def not_held(self, w: WorkerRecord, bundle: str) -> None:
        """`w` said it does not hold the stage it was sent a hop for: ask it to load it again."""
        w.stages.pop(bundle, None)
        want = w.assigned.get(bundle)
        if want is not None:
            self.send_load(w, bundle, want[0], want[1])

    def hop(self, bundle: str, st: Stage) -> None:
        """Stage `st` of `bundle` computed a hop (passed on, or answered the edge)."""
        st.hops += 1
        p = self.placed.get(bundle)
        if p is not None:
            self.metrics.stage_hops.labels(bundle, p.name, str(st.index)).inc()

    def _forget(self, p: Placement) -> None:
        self.placed.pop(p.bundle, None)
        for st in p.stages:
            for w in st.workers:  # what was placed on it no longer counts against its memory
                w.assigned.pop(p.bundle, None)
            self.metrics.stage_workers.remove(p.bundle, p.name, str(st.index))

    def describe(self) -> list[dict]:
        return [p.describe() for p in self.placed.values()]
