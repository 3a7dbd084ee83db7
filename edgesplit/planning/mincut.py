"""Partition-time choice of cuts over the whole DAG: a min-cut per bandwidth (DADS, INFOCOM 2019).

For one link, the cheapest split of a model is a minimum s-t cut of this flow network
(s = the device, t = the cloud; a node on the s side runs on the device)::

    s --cloud_time(v) + download(model outputs of v)--> v     cut when v runs in the cloud
    v --edge_time(v)--> t                                   cut when v runs on the device
    producer(x) --transfer(x)--> x' --inf--> each reader of x   x is sent once if any reader is remote
    reader --inf--> producer                                 no tail node feeds a head node

so the cut's capacity is exactly: device compute + cloud compute + bytes sent / bandwidth (+
the reply). Graph inputs are made by s (the sensor is on the device). Constant nodes (weights
only) and dead nodes never cross a cut and are left out. One RTT is added to every split that
uses the cloud, so all-edge is compared with the min-cut afterwards.

Unlike the chain order of Neurosurgeon, the head may be any closed set: on a branching model
the best cut often goes through several tensors that no prefix of a topological order gives.
:func:`choose_cuts` runs the min-cut over a bandwidth range and keeps the few distinct heads
that win somewhere and nest (a bundle's cuts form a chain), as tensor lists for
:func:`edgesplit.graph.partition`.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from edgesplit.errors import ConfigError

__all__ = ["MaxFlow", "MinCutResult", "SplitProblem", "min_cut", "choose_cuts", "CutChoice"]

_INF = 1 << 62


class MaxFlow:
    """Dinic's max-flow on integer capacities; small and dependency-free.

    Vertices are 0..n-1. :meth:`source_side` after :meth:`run` gives the minimum cut.
    """

    def __init__(self, n: int):
        self.n = n
        self.head: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[int] = []

    def add_edge(self, u: int, v: int, cap: int) -> None:
        if cap < 0:
            raise ValueError("capacities must be >= 0")
        self.head[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(cap)
        self.head[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0)

    def _bfs(self, s: int, t: int) -> list[int] | None:
        level = [-1] * self.n
        level[s] = 0
        q = deque([s])
        while q:
            u = q.popleft()
            for e in self.head[u]:
                v = self.to[e]
                if self.cap[e] > 0 and level[v] < 0:
                    level[v] = level[u] + 1
                    q.append(v)
        return level if level[t] >= 0 else None

    def run(self, s: int, t: int) -> int:
        """The maximum flow from s to t (= the minimum cut's capacity)."""
        flow = 0
        to, cap, head = self.to, self.cap, self.head
        while True:
            level = self._bfs(s, t)
            if level is None:
                return flow
            it = [0] * self.n
            while True:
                # Iterative DFS for one augmenting path in the level graph.
                path: list[int] = []
                u = s
                while u != t:
                    advanced = False
                    while it[u] < len(head[u]):
                        e = head[u][it[u]]
                        v = to[e]
                        if cap[e] > 0 and level[v] == level[u] + 1:
                            path.append(e)
                            u = v
                            advanced = True
                            break
                        it[u] += 1
                    if not advanced:
                        if u == s:
                            break
                        level[u] = -1          # dead end: prune it
                        e = path.pop()
                        u = to[e ^ 1]
                        it[u] += 1
                if u != t:
                    break
                push = min(cap[e] for e in path)
                for e in path:
                    cap[e] -= push
                    cap[e ^ 1] += push
                flow += push

    def source_side(self, s: int) -> set[int]:
        """Vertices reachable from s in the residual graph (after :meth:`run`)."""
        seen = {s}
        q = deque([s])
        while q:
            u = q.popleft()
            for e in self.head[u]:
                v = self.to[e]
                if self.cap[e] > 0 and v not in seen:
                    seen.add(v)
                    q.append(v)
        return seen


@dataclass(frozen=True)
class MinCutResult:
    """The best split on one link: which nodes run on the device and what crosses.

    Attributes:
        head: indices (into model.graph.node) of the compute nodes on the device.
        tensors: the tensors to cut at, for edgesplit.graph.partition (empty for all-cloud,
            and for all-edge).
        latency_ms: predicted latency of this split (compute + transfer + RTT).
        bandwidth_bps / rtt_s: the link it was computed for.
        kind: "split", "all-cloud" or "all-edge".
    """

    head: frozenset[int]
    tensors: tuple[str, ...]
    latency_ms: float
    bandwidth_bps: float
    rtt_s: float
    kind: str


class SplitProblem:
    """A model, the per-node times on both sides, and the size of every tensor that may cross.

    Args:
        model: onnx.ModelProto (weights not needed) or a path.
        edge_ms / cloud_ms: per-node times (index = position in model.graph.node), or
            NodeProfiles (checked against the model).
        codec: the codec the edge sends with (nominal ratio, see codec_ratio).
        reply_codec: the codec of the reply.
        batch: samples per request.
        shapes: input shapes/dim sizes for byte counts (as edgesplit.graph.infer_shapes).
    """

    def __init__(self, model, edge_ms, cloud_ms, codec: str = "raw", reply_codec: str = "raw",
                 batch: int = 1, shapes: dict | None = None):
        import onnx

        from edgesplit.graph import GraphIndex, infer_shapes, load_model
        from edgesplit.planning.cost import codec_ratio
        from edgesplit.planning.profile import NodeProfile

        if not isinstance(model, onnx.ModelProto):
            self.path = os.fspath(model)
            model = load_model(model, load_weights=False)
        else:
            self.path = None
        self.model = model
        n_nodes = len(model.graph.node)
        times = []
        for what, prof in (("edge", edge_ms), ("cloud", cloud_ms)):
            if isinstance(prof, NodeProfile):
                prof.check_model(model)
                prof = prof.node_ms
            prof = [float(t) for t in prof]
            if len(prof) != n_nodes:
                raise ConfigError(f"{what} profile has {len(prof)} nodes; the model has {n_nodes}")
            times.append(prof)
        self.edge_ms, self.cloud_ms = times
        self.index = index = GraphIndex(model)
        info = infer_shapes(model, shapes)
        self.batch = batch
        self.nodes = list(index.order)              # live, non-constant compute nodes
        node_set = set(self.nodes)
        self.readers: dict[str, list[int]] = {}
        for n in self.nodes:
            for v in index.variable_reads(n):
                self.readers.setdefault(v, []).append(n)
        # Sizes shape inference could not pin down (a Reshape to computed dims, ...) come from
        # one ONNX Runtime run, as the partitioner does for its candidate cuts.
        from edgesplit.graph import fill_unknown

        fill_unknown(index, info, sorted(set(self.readers) | set(index.outputs)), self.path)
        self.bytes: dict[str, float] = {}
        for v in set(self.readers) | set(index.outputs):
            nbytes, _ = info.bytes_per_sample(v)
            dtype = info.dtype(v) or "float32"
            self.bytes[v] = batch * nbytes * codec_ratio(codec, dtype)
        self.reply_bytes: dict[str, float] = {}
        for v in index.outputs:
            nbytes, _ = info.bytes_per_sample(v)
            self.reply_bytes[v] = batch * nbytes * codec_ratio(reply_codec, info.dtype(v) or "float32")
        self.producer = {v: p for v, p in index.producer.items() if p in node_set}
        self.inputs = [v for v in index.inputs if v in self.readers]

    # -- costs ---------------------------------------------------------------------------------
    def cost_ms(self, head: set[int] | frozenset[int], bandwidth_bps: float, rtt_s: float) -> float:
        """Predicted latency with `head` on the device (any closed set of compute nodes)."""
        head = set(head)
        if head >= set(self.nodes):
            return sum(self.edge_ms[n] for n in self.nodes)
        ms = sum(self.edge_ms[n] if n in head else self.cloud_ms[n] for n in self.nodes)
        ms += rtt_s * 1e3
        for v, readers in self.readers.items():
            made_on_edge = v in self.inputs or self.producer.get(v) in head
            if made_on_edge and any(r not in head for r in readers):
                ms += self.bytes[v] * 8 / bandwidth_bps * 1e3
        for v in self.index.outputs:
            if v in self.producer and self.producer[v] not in head:
                ms += self.reply_bytes[v] * 8 / bandwidth_bps * 1e3
        return ms

    def is_closed(self, head) -> bool:
        """True when no node outside `head` feeds a node inside it."""
        head = set(head)
        return all(self.producer.get(v) in head or v not in self.producer
                   for n in head for v in self.index.variable_reads(n))

    def cut_tensors(self, head) -> tuple[str, ...]:
        """The tensors to name for partition(): made in `head` and read outside it, or outputs."""
        head = set(head)
        out = []
        for n in self.nodes:
            if n not in head:
                continue
            for v in self.index.outputs_of(n):
                if v in self.index.outputs or any(r not in head for r in self.readers.get(v, ())):
                    out.append(v)
        return tuple(out)

    def chain_heads(self) -> list[frozenset[int]]:
        """The heads of the chain-order cuts (Neurosurgeon): every prefix of the topological order."""
        return [frozenset(self.nodes[:i]) for i in range(1, len(self.nodes))]

    # -- the min-cut ---------------------------------------------------------------------------
    def min_cut(self, bandwidth_bps: float, rtt_s: float) -> MinCutResult:
        """The best split on this link (all-edge when nothing beats it)."""
        if not bandwidth_bps or bandwidth_bps <= 0:
            raise ConfigError("bandwidth must be > 0")
        ns = 1e6  # capacities in nanoseconds (integers keep the max-flow exact)
        vid = {n: 2 + i for i, n in enumerate(self.nodes)}
        tensors = list(self.readers)
        aux = {v: 2 + len(vid) + i for i, v in enumerate(tensors)}
        g = MaxFlow(2 + len(vid) + len(aux))
        S, T = 0, 1
        per_bit_ms = 1e3 / bandwidth_bps
        reply = {n: 0.0 for n in self.nodes}
        for v in self.index.outputs:
            if v in self.producer:
                reply[self.producer[v]] += self.reply_bytes[v] * 8 * per_bit_ms
        for n in self.nodes:
            g.add_edge(S, vid[n], round((self.cloud_ms[n] + reply[n]) * ns))
            g.add_edge(vid[n], T, round(self.edge_ms[n] * ns))
        for v, readers in self.readers.items():
            src = S if v in self.inputs else vid[self.producer[v]]
            g.add_edge(src, aux[v], round(self.bytes[v] * 8 * per_bit_ms * ns))
            for r in readers:
                g.add_edge(aux[v], vid[r], _INF)
                if src != S:
                    g.add_edge(vid[r], src, _INF)
        g.run(S, T)
        side = g.source_side(S)
        head = frozenset(n for n in self.nodes if vid[n] in side)
        split = self.cost_ms(head, bandwidth_bps, rtt_s)
        everything = frozenset(self.nodes)
        all_edge = self.cost_ms(everything, bandwidth_bps, rtt_s)
        if all_edge <= split:
            return MinCutResult(everything, (), all_edge, bandwidth_bps, rtt_s, "all-edge")
        kind = "all-cloud" if not head else ("all-edge" if head == everything else "split")
        return MinCutResult(head, self.cut_tensors(head) if kind == "split" else (), split,
                            bandwidth_bps, rtt_s, kind)


def min_cut(model, edge_ms, cloud_ms, bandwidth_bps: float, rtt_s: float = 0.0, **kw) -> MinCutResult:
    """The best split of `model` on one link; see :class:`SplitProblem` for the arguments."""
    return SplitProblem(model, edge_ms, cloud_ms, **kw).min_cut(bandwidth_bps, rtt_s)


@dataclass
class CutChoice:
    """What :func:`choose_cuts` picked.

    Attributes:
        cuts: tensor lists in chain order, for edgesplit.graph.partition.
        heads: the node sets of those cuts (nested, growing).
        table: per bandwidth: (bandwidth_bps, min-cut latency ms, its kind, index into `cuts`
            of the cut the min-cut chose or None if it was all-edge/all-cloud/dropped,
            best latency with only the chosen cuts + all-edge + all-cloud).
        dropped: min-cut heads left out because they did not nest with the chosen ones.
    """

    cuts: list[tuple[str, ...]]
    heads: list[frozenset[int]]
    table: list[tuple[float, float, str, int | None, float]] = field(default_factory=list)
    dropped: int = 0


def choose_cuts(model, edge_ms, cloud_ms, bandwidths: tuple[float, float] | Sequence[float],
                rtt_s: float = 0.02, points: int = 25, max_cuts: int | None = None,
                **kw) -> CutChoice:
    """The few cuts that are optimal somewhere in a bandwidth range.

    Args:
        model, edge_ms, cloud_ms, codec=, batch=, shapes=: as :class:`SplitProblem`.
        bandwidths: (low, high) in bit/s, sampled at `points` log-spaced values; or an
            explicit list of bandwidths (more than two values).
        rtt_s: the round trip assumed.
        max_cuts: keep at most this many interior cuts (those that win most often).
    """
    problem = SplitProblem(model, edge_ms, cloud_ms, **kw)
    bws = list(bandwidths)
    if len(bws) == 2:
        lo, hi = sorted(bws)
        if lo <= 0:
            raise ConfigError("bandwidths must be > 0")
        if points < 2 or lo == hi:
            bws = [lo] if lo == hi else [lo, hi]
        else:
            bws = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
    if not bws or min(bws) <= 0:
        raise ConfigError("bandwidths must be > 0")
    results = [problem.min_cut(b, rtt_s) for b in bws]
    wins: dict[frozenset[int], int] = {}
    for r in results:
        if r.kind == "split":
            wins[r.head] = wins.get(r.head, 0) + 1
    # Most frequent winners first; a head joins if it nests with every head already taken.
    chosen: list[frozenset[int]] = []
    dropped = 0
    for head, _ in sorted(wins.items(), key=lambda kv: (-kv[1], len(kv[0]))):
        if max_cuts is not None and len(chosen) >= max_cuts:
            dropped += 1
            continue
        if all(head < h or h < head for h in chosen):
            chosen.append(head)
        else:
            dropped += 1
    chosen.sort(key=len)
    everything = frozenset(problem.nodes)
    options = [frozenset(), *chosen, everything]
    table = []
    for b, r in zip(bws, results):
        idx = chosen.index(r.head) if r.kind == "split" and r.head in chosen else None
        best = min(problem.cost_ms(h, b, rtt_s) for h in options)
        table.append((b, r.latency_ms, r.kind, idx, best))
    return CutChoice([problem.cut_tensors(h) for h in chosen], chosen, table, dropped)
