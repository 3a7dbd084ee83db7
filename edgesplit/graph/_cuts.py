"""Candidate cuts: the closed cuts along a topological order, and the narrow ones among them.

Cutting after position i of a topological order always gives a closed cut (no edge from the
tail back to the head). Its tensors are the ones alive there: made in the head (or model
inputs) and read by the tail, or model outputs. Inside a block (a residual branch, an
inception module, attention) the cut carries several tensors; at block boundaries it is
narrow. `narrow` keeps the local minima of bytes per sample along the order.
"""

from __future__ import annotations

import os
from typing import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgesplit.bundle import TensorSpec
from edgesplit.graph._index import GraphIndex
from edgesplit.graph._state import StatePlan
from edgesplit.graph._shapes import (WIRE_DTYPES, ShapeInfo, UnknownNamer, infer_shapes, name_batch_axes,
                                     probe_with_onnxruntime)


@dataclass(frozen=True)
class CandidateCut:
    """A closed cut: `tensors` cross it, `bytes_per_sample` at batch 1.

    Attributes:
        index: 1-based position in the candidate list.
        tensors: every tensor the tail needs from the head (and model inputs the tail reads).
        bytes_per_sample: sum of their sizes at batch 1, other symbolic dims as bound.
        specs: dtype and (symbolic) shape of each tensor.
        head_nodes: how many compute nodes lie before the cut (of `total_nodes`).
        total_nodes: compute nodes in the model (constants not counted).
        exact: False when some dim was unknown and counted as 1.
    """

    index: int
    tensors: tuple[str, ...]
    bytes_per_sample: int
    specs: tuple[TensorSpec, ...] = field(default=(), compare=False)
    head_nodes: int = 0
    total_nodes: int = 0
    exact: bool = True

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "tensors": list(self.tensors),
            "bytes_per_sample": self.bytes_per_sample,
            "specs": [s.to_json() for s in self.specs],
            "head_nodes": self.head_nodes,
            "total_nodes": self.total_nodes,
            "exact": self.exact,
        }


def crossing_spec(info: ShapeInfo, name: str, namer: UnknownNamer) -> TensorSpec | None:
    dtype = info.dtype(name)
    dims = info.spec_dims(name, namer)
    if dtype is None or dims is None:
        return None
    return TensorSpec(name, dtype, dims)


def all_closed_cuts(index: GraphIndex, local: frozenset = frozenset()) -> list[tuple[int, tuple[str, ...]]]:
    """(head size, crossing tensors) after each position of the order, without duplicates.

    Tensors in `local` (state inputs and outputs: each side keeps its own) never cross.
    """
    order = index.order
    outputs = set(index.outputs) - local
    last_use: dict[str, int] = {}
    for i, n in enumerate(order):
        for v in index.variable_reads(n):
            last_use[v] = i
    live: dict[str, None] = {}
    for v in index.inputs:
        if v in last_use or v in outputs:
            live[v] = None
    cuts: list[tuple[int, tuple[str, ...]]] = []
    seen: set[frozenset] = set()
    for i, n in enumerate(order[:-1]):
        for v in index.outputs_of(n):
            if v in outputs or last_use.get(v, -1) > i:
                live[v] = None
        for v in index.variable_reads(n):
            if last_use.get(v) == i and v not in outputs:
                live.pop(v, None)
        key = frozenset(live) - local
        if key in seen:
            continue
        seen.add(key)
        cuts.append((i + 1, tuple(v for v in live if v not in local)))
    return cuts


# Sizes within this fraction (or _SAME_BYTES) count as equal: a few int64 shape tensors that
# exporters compute early and keep alive must not make spurious minima.
_SAME_FRACTION = 0.02
_SAME_BYTES = 64
# A minimum is dropped when cuts both before and after it are this many times smaller: it is
# a dip inside a wide block (attention, an FPN level), not a block boundary.
_DOMINANCE = 2.0


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= max(_SAME_BYTES, _SAME_FRACTION * max(a, b))


def _narrow(sizes: list[int], counts: list[int], before_weights: list[bool], first: float, last: float) -> list[int]:
    """Indices of the local minima of `sizes` (`first`/`last`: what lies left of the first / right of the last).

    A plateau of (nearly) equal sizes (Conv -> Relu -> ...) gives the cuts with the fewest
    tensors that lie just before a layer with weights, or else its last cut with the fewest
    tensors. Minima with much smaller cuts on both sides are dropped (_DOMINANCE).
    """
    m = len(sizes)
    before_min = [float("inf")] * m
    after_min = [float("inf")] * m
    for k in range(1, m):
        before_min[k] = min(before_min[k - 1], sizes[k - 1])
    for k in range(m - 2, -1, -1):
        after_min[k] = min(after_min[k + 1], sizes[k + 1])
    keep = []
    i = 0
    while i < m:
        j = i
        while j + 1 < m and _same(sizes[j + 1], sizes[i]):
            j += 1
        low = min(sizes[i:j + 1])
        left = sizes[i - 1] if i > 0 else first
        right = sizes[j + 1] if j + 1 < m else last
        # a cut no smaller than the model inputs (a Pad, a Cast) is no better than cut 0
        left_ok = (low <= left or _same(low, left)) if i > 0 else (low < left and not _same(low, left))
        if left_ok and (low <= right or _same(low, right)):
            fewest = min(counts[i:j + 1])
            run = [k for k in range(i, j + 1) if counts[k] == fewest]
            layered = [k for k in run if before_weights[k]]
            for k in layered or run[-1:]:
                if not (before_min[k] * _DOMINANCE <= sizes[k] and after_min[k] * _DOMINANCE <= sizes[k]):
                    keep.append(k)
        i = j + 1
    return keep


def candidate_cuts(model_or_path: "onnx.ModelProto | str | os.PathLike", shapes: dict | None = None,
                   narrow: bool = True, run: bool = True, state: Sequence[tuple[str, str]] = ()) -> list[CandidateCut]:
    """The closed cuts along a topological order, deduplicated.

    Args:
        model_or_path: an onnx.ModelProto or a path (weights are not needed).
        shapes: input name -> dims, or dim symbol -> size, to count bytes (batch is 1).
        narrow: keep only the local minima of bytes per sample (block boundaries); False
            lists every distinct closed cut.
        run: when shape inference leaves a type or size unknown, run the model once in ONNX
            Runtime to measure it (False: unknown dims count as 1, such cuts are marked inexact).
        state: (OUT, IN) state pairs besides the present.* -> past_key_values.* ones found by
            name; state tensors never cross a cut.

    Cuts whose tensors cannot travel (strings, sequences, bfloat16) are left out.
    """
    from edgesplit.graph._load import load_model

    model = model_or_path
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model_or_path, load_weights=False)
    path = None if isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return cuts_from_index(GraphIndex(model), infer_shapes(model, shapes), narrow, path, run, state)


def fill_unknown(index: GraphIndex, info: ShapeInfo, names, model_path) -> None:
    """Ask ONNX Runtime about crossing tensors that inference left unknown: dtype, rank, or
    (when every input dim is bound) a size needed for bytes per sample."""
    unknown = sorted({t for t in names if (info.symbolic.get(t) is None or info.symbolic[t].dims is None
                                           or info.symbolic[t].dtype is None
                                           or not info.bytes_per_sample(t)[1])})
    if unknown:
        probe_with_onnxruntime(model_path, index.model, info, unknown)


def _weighted_nodes(index: GraphIndex) -> set[int]:
    """Compute nodes that read weights (initializers or constants with more than 16 values)."""
    big = set()
    for t in index.model.graph.initializer:
        numel = 1
        for d in t.dims:
            numel *= d
        if numel > 16:
            big.add(t.name)
    for n in index.topo:  # weight-only chains (DequantizeLinear, Transpose of weights) carry weights too
        if n not in index.constant:
            continue
        node = index.nodes[n]
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and int(np.prod(value.dims)) > 16:
                big.update(index.outputs_of(n))
        elif any(v in big for v in index.reads[n]):
            big.update(index.outputs_of(n))
    return {n for n in index.order if any(v in big for v in index.reads[n])}


def cuts_from_index(index: GraphIndex, info: ShapeInfo, narrow: bool = True, model_path=None,
                    run: bool = True, state: Sequence[tuple[str, str]] = ()) -> list[CandidateCut]:
    """candidate_cuts() over an already built GraphIndex and ShapeInfo (what `inspect` needs to
    describe the model beside its cuts)."""
    plan = StatePlan(index, info, state)
    namer = UnknownNamer()
    total = len(index.order)
    rows = []
    closed = all_closed_cuts(index, frozenset(plan.inputs | plan.outputs))
    if run:
        fill_unknown(index, info, (t for _, ts in closed for t in ts), model_path)
    for head, tensors in closed:
        specs = [crossing_spec(info, t, namer) for t in tensors]
        if any(s is None or s.dtype not in WIRE_DTYPES for s in specs):
            continue
        size, exact = 0, True
        for t in tensors:
            b, e = info.bytes_per_sample(t)
            size += b
            exact &= e
        rows.append((head, tensors, size, tuple(specs), exact))
    if narrow and rows:
        weighted = _weighted_nodes(index)
        before = [index.order[r[0]] in weighted if r[0] < total else False for r in rows]
        first = sum(info.bytes_per_sample(v)[0] for v in index.inputs)
        picked = _narrow([r[2] for r in rows], [len(r[1]) for r in rows], before, first, float("inf"))
        if picked:  # else (a chain as wide as its input, ...) every closed cut is shown
            rows = [rows[k] for k in picked]
    if run and len(rows) <= 200:  # name the batch axis where inference lost it, as partition does
        if name_batch_axes(model_path, index.model, info, [t for r in rows for t in r[1]]):
            namer = UnknownNamer()
            rows = [(h, ts, size, tuple(crossing_spec(info, t, namer) for t in ts), ex)
                    for h, ts, size, _, ex in rows]
    return [CandidateCut(k + 1, r[1], r[2], r[3], r[0], total, r[4]) for k, r in enumerate(rows)]
