"""State pairs: a model output that feeds a model input at the next step (recurrent state, KV cache).

A pair stays where it is computed: the segment that reads the input also makes the output, and
whoever runs that segment keeps the value between steps, so no state crosses a cut.
"""

from __future__ import annotations

from typing import Sequence

from edgesplit.errors import CutError
from edgesplit.graph._index import GraphIndex
from edgesplit.graph._shapes import ShapeInfo

__all__ = ["StatePlan"]


# Exported decoders name their KV cache present.* (outputs) -> past_key_values.* / past.* (inputs).
_KV_PREFIXES = (("present", "past_key_values"), ("present", "past"))


class StatePlan:
    """The model's state pairs (output OUT feeds input IN at the next step), checked against the graph."""

    def __init__(self, index: GraphIndex, info: ShapeInfo, pairs: Sequence[tuple[str, str]] = (),
                 auto: bool = True):
        pairs = [tuple(p) for p in pairs]
        if auto:  # the usual KV-cache naming, with no flags
            explicit_outs = {o for o, _ in pairs}
            for o in index.outputs:
                for out_prefix, in_prefix in _KV_PREFIXES:
                    if o.startswith(out_prefix) and o not in explicit_outs:
                        i = in_prefix + o[len(out_prefix):]
                        if i in index.inputs:
                            pairs.append((o, i))
                            break
        self.pairs: list[tuple[str, str]] = []
        for o, i in pairs:
            self._check(index, info, o, i)
            self.pairs.append((o, i))
        if len({o for o, _ in self.pairs}) != len(self.pairs) or len({i for _, i in self.pairs}) != len(self.pairs):
            raise CutError("each state output and each state input may appear in one --state pair only")
        self.outputs = {o for o, _ in self.pairs}
        self.inputs = {i for _, i in self.pairs}

    @staticmethod
    def _check(index: GraphIndex, info: ShapeInfo, o: str, i: str) -> None:
        if o not in index.outputs:
            raise CutError(f"--state {o}={i}: {o!r} is not a model output (outputs: {', '.join(index.outputs[:8])}"
                           f"{', ...' if len(index.outputs) > 8 else ''})")
        if i not in index.inputs:
            raise CutError(f"--state {o}={i}: {i!r} is not a model input (inputs: {', '.join(index.inputs[:8])}"
                           f"{', ...' if len(index.inputs) > 8 else ''})")
        so, si = info.symbolic.get(o), info.symbolic.get(i)
        if so is None or si is None or so.dtype != si.dtype:
            raise CutError(f"--state {o}={i}: dtypes differ ({so.dtype if so else '?'} vs {si.dtype if si else '?'})")
        if so.dims is not None and si.dims is not None:
            if len(so.dims) != len(si.dims):
                raise CutError(f"--state {o}={i}: ranks differ ({list(so.dims)} vs {list(si.dims)})")
            for a, b in zip(so.dims, si.dims):
                if isinstance(a, int) and isinstance(b, int) and a != b:
                    raise CutError(f"--state {o}={i}: shapes {list(so.dims)} and {list(si.dims)} cannot feed "
                                   f"each other")

    def attach(self, index: GraphIndex, heads: list[set[int]]) -> list[set[int]]:
        """Move what computes each state output into the segment that reads its input.

        A cut's head is everything its tensors depend on; a node that makes only a state output
        (an Identity naming a layer's new hidden state, say) would otherwise fall behind the cut.
        """
        heads = [set(h) for h in heads]
        for o, i in self.pairs:
            readers = {n for n in index.order if i in index.variable_reads(n)}
            for k, head in enumerate(heads):
                if readers and readers <= head:
                    extra = index.ancestors([o]) - head
                    # Only nodes that serve the state output alone may move: never a layer the
                    # rest of the model needs (then the pair spans the cut, and owners() says so).
                    made = {v for m in extra for v in index.outputs_of(m)}
                    used_elsewhere = any(v in index.variable_reads(n) for n in index.order
                                         if n not in extra for v in made)
                    if not used_elsewhere and not (made & (set(index.outputs) - {o})):
                        for later in heads[k:]:
                            later |= extra
                    break
        return heads

    def owners(self, index: GraphIndex, bounds: list[set[int]]) -> dict[str, int]:
        """State input -> the one segment that reads it and makes its output; refused otherwise."""
        def segment_of(node: int) -> int:
            return next(s for s in range(len(bounds) - 1) if node in bounds[s + 1] and node not in bounds[s])

        owners = {}
        for o, i in self.pairs:
            readers = {segment_of(n) for n in index.order if i in index.variable_reads(n)}
            maker = {segment_of(index.producer[o])} if o in index.producer else set()
            segs = readers | maker
            if len(segs) != 1:
                raise CutError(f"state {o} -> {i} spans segments {sorted(segs)}: its input is read and its "
                               f"output made on both sides of a cut; cut before or after that layer")
            owners[i] = segs.pop()
        return owners
