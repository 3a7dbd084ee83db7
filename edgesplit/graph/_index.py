"""The dependency structure of an ONNX graph: who makes and who reads each tensor.

Reads include outer-scope references from If/Loop/Scan bodies, so a node whose body reads a
tensor depends on it like on a direct input. Nodes whose inputs are all constants (Constant,
weight-only Transpose/DequantizeLinear chains, ...) are *constant*: they never cross a cut
and are copied into every segment that needs them, with their initializers.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import onnx

from edgesplit.errors import ModelError

# Ops that make different values on every call: never treat them as constants.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Multinomial", "Bernoulli"})


def subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def free_names(graph: onnx.GraphProto) -> list[str]:
    """Names a (sub)graph reads from its enclosing scopes, in first-use order."""
    defined = {i.name for i in graph.input}
    defined.update(t.name for t in graph.initializer)
    defined.update(t.values.name for t in graph.sparse_initializer)
    used: dict[str, None] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                used.setdefault(name)
        for sub in subgraphs(node):
            for name in free_names(sub):
                if name not in defined:
                    used.setdefault(name)
        defined.update(o for o in node.output if o)
    for o in graph.output:
        if o.name not in defined:
            used.setdefault(o.name)
    return list(used)


def _subgraph_names(graph: onnx.GraphProto, owner: int, out: dict[str, int]) -> None:
    for i in graph.input:
        out.setdefault(i.name, owner)
    for t in graph.initializer:
        out.setdefault(t.name, owner)
    for node in graph.node:
        for o in node.output:
            if o:
                out.setdefault(o, owner)
        for sub in subgraphs(node):
            _subgraph_names(sub, owner, out)


@dataclass
class GraphIndex:
    """Producers, readers and a topological order of the top-level nodes of a model."""

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto] = field(init=False)
    initializers: set[str] = field(init=False)
    inputs: list[str] = field(init=False)  # graph inputs that are not initializers
    outputs: list[str] = field(init=False)
    reads: list[list[str]] = field(init=False)  # per node: direct + outer-scope reads
    producer: dict[str, int] = field(init=False)
    inner_names: dict[str, int] = field(init=False)  # tensor defined in a subgraph -> owner node
    constant: set[int] = field(init=False)  # nodes computing from weights only
    const_values: set[str] = field(init=False)  # initializers and constant node outputs
    order: list[int] = field(init=False)  # topological order of the live, non-constant nodes
    pos: dict[int, int] = field(init=False)  # node -> position in `order`

    def __post_init__(self):
        g = self.model.graph
        self.nodes = list(g.node)
        self.initializers = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.outputs = [o.name for o in g.output]
        self.reads = []
        self.producer = {}
        self.inner_names = {}
        for n, node in enumerate(self.nodes):
            r: dict[str, None] = {}
            for name in node.input:
                if name:
                    r.setdefault(name)
            for sub in subgraphs(node):
                for name in free_names(sub):
                    r.setdefault(name)
                _subgraph_names(sub, n, self.inner_names)
            self.reads.append(list(r))
            for o in node.output:
                if o:
                    if o in self.producer or o in self.initializers or o in self.inputs:
                        raise ModelError(f"tensor {o!r} is made twice (by node {self._label(n)})")
                    self.producer[o] = n
        known = set(self.producer) | self.initializers | set(self.inputs)
        for n, r in enumerate(self.reads):
            for name in r:
                if name not in known:
                    raise ModelError(f"node {self._label(n)} reads tensor {name!r} that nothing makes")
        for o in self.outputs:
            if o not in known:
                raise ModelError(f"model output {o!r} is made by no node")
        self._topo_sort()
        self._find_constants()
        self._find_live()

    def _label(self, n: int) -> str:
        node = self.nodes[n]
        return f"{node.name!r} ({node.op_type})" if node.name else f"#{n} ({node.op_type})"

    def label(self, n: int) -> str:
        return self._label(n)

    def _topo_sort(self) -> None:
        # Kahn's algorithm that keeps the file's order whenever the file is already sorted.
        deps = [{self.producer[v] for v in r if v in self.producer} for r in self.reads]
        users: list[list[int]] = [[] for _ in self.nodes]
        indeg = [len(d) for d in deps]
        for n, d in enumerate(deps):
            for p in d:
                users[p].append(n)
        heap = [n for n, k in enumerate(indeg) if k == 0]
        heapq.heapify(heap)
        topo = []
        while heap:
            n = heapq.heappop(heap)
            topo.append(n)
            for u in users[n]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(heap, u)
        if len(topo) != len(self.nodes):
            stuck = next(n for n, k in enumerate(indeg) if k > 0)
            raise ModelError(f"the graph has a cycle (through node {self._label(stuck)})")
        self.topo = topo
        self.deps = deps

    def _find_constants(self) -> None:
        self.constant = set()
        const_values = set(self.initializers)
        for n in self.topo:
            node = self.nodes[n]
            if node.op_type in _RANDOM_OPS:
                continue
            r = self.reads[n]
            if not r and not (node.op_type == "Constant" and node.domain in ("", "ai.onnx")):
                continue
            if all(v in const_values for v in r):
                self.constant.add(n)
                const_values.update(o for o in node.output if o)
        self.const_values = const_values

    def _find_live(self) -> None:
        # Nodes that no model output depends on are dropped from every segment.
        live: set[int] = set()
        stack = [self.producer[o] for o in self.outputs if o in self.producer]
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(self.deps[n] - live)
        self.live = live
        self.order = [n for n in self.topo if n in live and n not in self.constant]
        self.pos = {n: i for i, n in enumerate(self.order)}

    # -- queries -------------------------------------------------------------------------

    def is_variable(self, name: str) -> bool:
        """A tensor that can cross a cut: a graph input or the output of a non-constant node."""
        return name not in self.const_values and (name in self.producer or name in self.inputs)

    def ancestors(self, names) -> set[int]:
        """The non-constant nodes the given tensors depend on (their producers included)."""
        out: set[int] = set()
        stack = [self.producer[v] for v in names if v in self.producer and v not in self.const_values]
        while stack:
            n = stack.pop()
            if n in out:
                continue
            out.add(n)
            stack.extend(p for p in self.deps[n] if p not in out and p not in self.constant)
        return out

    def const_closure(self, names) -> list[int]:
        """The constant nodes needed to compute `names` (their const inputs included), in topo order."""
        need: set[int] = set()
        stack = [self.producer[v] for v in names if v in self.producer and self.producer[v] in self.constant]
        while stack:
            n = stack.pop()
            if n in need:
                continue
            need.add(n)
            stack.extend(p for p in self.deps[n] if p in self.constant and p not in need)
        return [n for n in self.topo if n in need]

    def variable_reads(self, n: int) -> list[str]:
        return [v for v in self.reads[n] if v not in self.const_values]

    def outputs_of(self, n: int) -> list[str]:
        return [o for o in self.nodes[n].output if o]
