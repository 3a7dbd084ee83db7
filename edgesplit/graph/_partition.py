"""Cutting a model into a chain of segments and writing them as a bundle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import onnx
from onnx import external_data_helper, helper

from edgesplit.bundle import Bundle, Cut, TensorSpec, write_bundle
from edgesplit.errors import BundleError, ConfigError, CutError, ModelError
from edgesplit.graph._cuts import crossing_spec, fill_unknown
from edgesplit.graph._index import GraphIndex
from edgesplit.graph._load import (PROTO_LIMIT, _first_line, file_sha256, has_external_data, load_model,
                                   load_tensor_data)
from edgesplit.graph._shapes import WIRE_DTYPES, ShapeInfo, UnknownNamer, infer_shapes, name_batch_axes
from edgesplit.graph._state import StatePlan


def _names(names) -> list[str]:
    names = getattr(names, "tensors", names)  # a CandidateCut or a bundle Cut
    if isinstance(names, str):
        names = names.split(",")
    out = []
    for n in names:
        n = n.strip()
        if n and n not in out:
            out.append(n)
    return out


def _check_cut_names(index: GraphIndex, k: int, names: list[str]) -> None:
    where = f"cut {k}"
    if not names:
        raise CutError(f"{where} names no tensor")
    for name in names:
        if name in index.inner_names and name not in index.producer:
            owner = index.label(index.inner_names[name])
            raise CutError(f"{where}: tensor {name!r} is inside the body of node {owner}; "
                           "a cut cannot go through a subgraph (cut before or after that node)")
        if name in index.initializers:
            raise CutError(f"{where}: {name!r} is a weight (initializer), not an activation")
        if name in index.producer and index.producer[name] in index.constant:
            raise CutError(f"{where}: tensor {name!r} is computed from weights only; cut at a tensor "
                           "that depends on the model inputs")
        if name not in index.producer and name not in index.inputs:
            raise CutError(f"{where}: the model has no tensor named {name!r}")
        if name in index.producer and index.producer[name] not in index.live:
            raise CutError(f"{where}: tensor {name!r} does not lead to any model output")


def plan_segments(index: GraphIndex, cuts: Sequence[Sequence[str] | str]) -> list[set[int]]:
    """The heads H_1 ⊂ ... ⊂ H_k of the requested cuts (node sets), validated."""
    heads: list[set[int]] = []
    prev: set[int] = set()
    everything = set(index.order)
    for k, raw in enumerate(cuts, start=1):
        names = _names(raw)
        _check_cut_names(index, k, names)
        head = prev | index.ancestors(names)
        shown = ",".join(names)
        if not head:
            raise CutError(f"cut {k} ({shown}) leaves the head empty: it names only model inputs")
        if head == prev:
            raise CutError(f"cut {k} ({shown}) does not come after cut {k - 1}: everything it depends on "
                           f"is already before cut {k - 1}; give cuts in chain order")
        if head >= everything:
            raise CutError(f"cut {k} ({shown}) leaves the tail empty: nothing is computed after it")
        heads.append(head)
        prev = head
    return heads


def crossing(index: GraphIndex, head: set[int], state: StatePlan | None = None) -> list[str]:
    """Tensors made in `head` (or model inputs) that the rest reads, and model outputs made in `head`.

    State tensors stay where they are computed: a state input is fed by its own segment's
    keeper, and a state output is kept by the segment that makes it, so neither crosses a cut
    (unless the rest also reads it as an ordinary activation).
    """
    outputs = set(index.outputs) - (state.outputs if state else set())
    local_inputs = state.inputs if state else set()
    read_after: set[str] = set()
    for n in index.order:
        if n not in head:
            read_after.update(index.variable_reads(n))
    out = [v for v in index.inputs if v not in local_inputs and (v in read_after or v in outputs)]
    for n in index.order:
        if n in head:
            out.extend(v for v in index.outputs_of(n) if v in read_after or v in outputs)
    return out


def _value_info(name: str, info: ShapeInfo, namer: UnknownNamer, original: dict) -> onnx.ValueInfoProto:
    if name in original:
        return original[name]
    elem = info.elem_type(name)
    if not elem:
        raise CutError(f"tensor {name!r} crosses a cut but its type cannot be inferred; "
                       "cut elsewhere or add value_info for it to the model")
    dims = info.spec_dims(name, lambda n, a: None)
    return helper.make_tensor_value_info(name, elem, None if dims is None else list(dims))


def _spec(info: ShapeInfo, name: str, namer: UnknownNamer, what: str) -> TensorSpec:
    spec = crossing_spec(info, name, namer)
    if spec is None:
        raise CutError(f"{what} {name!r}: its dtype or rank cannot be inferred")
    if spec.dtype not in WIRE_DTYPES:
        raise CutError(f"{what} {name!r} has dtype {spec.dtype}, which a bundle cannot carry "
                       f"(supported: {', '.join(sorted(WIRE_DTYPES))})")
    return spec


def check_segment(model: onnx.ModelProto, what: str) -> None:
    """onnx.checker full check, by path for protos over 2 GB."""
    try:
        if model.ByteSize() < PROTO_LIMIT:
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory() as d:
                p = os.path.join(d, "segment.onnx")
                onnx.save_model(model, p, save_as_external_data=True, location="segment.onnx.data")
                onnx.checker.check_model(p, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{what} fails onnx.checker full check: {_first_line(exc)}") from exc
    except onnx.shape_inference.InferenceError as exc:
        raise ModelError(f"{what} fails onnx.checker full check: {_first_line(exc)}") from exc


def build_segments(model: onnx.ModelProto, index: GraphIndex, info: ShapeInfo, heads: list[set[int]],
                   base_dir: Path | None, state: StatePlan | None = None):
    """(segments [(proto, inputs, outputs)], cut tensor lists) for the chain given by `heads`.

    A segment that owns state also outputs the state it makes (its keeper feeds it back in).
    """
    g = model.graph
    everything = set(index.order)
    bounds = [set()] + heads + [everything]
    cut_tensors = [crossing(index, h, state) for h in heads]
    state_outputs = [o for o, _ in state.pairs] if state else []
    original_vi = {vi.name: vi for vi in g.input}
    original_vi.update({vi.name: vi for vi in g.output})
    inner_vi = {vi.name: vi for vi in g.value_info}
    init_by_name = {t.name: t for t in g.initializer}
    sparse_by_name = {t.values.name: t for t in g.sparse_initializer}
    model_outputs = index.outputs
    namer = UnknownNamer()
    rank = {v: i for i, v in enumerate(index.inputs)}  # inputs, then tensors in the order they are made
    for n in index.order:
        for v in index.outputs_of(n):
            rank[v] = len(rank)
    segments = []
    for s in range(len(bounds) - 1):
        nodes = [n for n in index.order if n in bounds[s + 1] and n not in bounds[s]]
        made = {v for n in nodes for v in index.outputs_of(n)}
        if s + 1 < len(bounds) - 1:
            wanted = cut_tensors[s] + [v for v in state_outputs if v not in cut_tensors[s]]
        else:
            wanted = model_outputs
        outs = [v for v in wanted if v in made]
        last = s == len(bounds) - 2
        if last:  # model outputs computed from weights only are made by the last segment
            outs += [v for v in model_outputs if v in index.const_values]
        ins: list[str] = []
        for n in nodes:
            for v in index.variable_reads(n):
                if v not in made and v not in ins:
                    ins.append(v)
        ins.sort(key=rank.__getitem__)
        const_reads = [v for n in nodes for v in index.reads[n] if v in index.const_values]
        if last:
            const_reads += [v for v in model_outputs if v in index.const_values]
        const_nodes = index.const_closure(const_reads)
        all_nodes = const_nodes + nodes
        used_inits: dict[str, None] = {}
        for n in all_nodes:
            for v in index.reads[n]:
                if v in index.initializers:
                    used_inits.setdefault(v)
        for v in outs:
            if v in index.initializers:
                used_inits.setdefault(v)
        m = onnx.ModelProto()
        sg = m.graph  # built in place: a segment of a large model is not copied again
        sg.name = f"{g.name or 'graph'}_segment{s}"
        sg.doc_string = g.doc_string
        sg.node.extend(index.nodes[n] for n in all_nodes)
        for v in used_inits:
            if v in init_by_name:
                t = onnx.TensorProto()
                t.CopyFrom(init_by_name[v])
                if base_dir is not None:
                    load_tensor_data(t, base_dir)
                sg.initializer.append(t)
            else:
                sg.sparse_initializer.append(sparse_by_name[v])
        sg.input.extend(_value_info(v, info, namer, original_vi) for v in ins)
        if model.ir_version < 4:  # old IR: every initializer is also listed as an input
            listed = {vi.name for vi in g.input}
            sg.input.extend(vi for vi in g.input if vi.name in used_inits and vi.name in listed)
        sg.output.extend(_value_info(v, info, namer, original_vi) for v in outs)
        internal = {v for n in all_nodes for v in index.outputs_of(n)} - set(outs)
        sg.value_info.extend(inner_vi[v] for v in inner_vi if v in internal)
        m.ir_version = model.ir_version
        m.opset_import.extend(model.opset_import)
        m.producer_name = model.producer_name
        m.producer_version = model.producer_version
        m.domain = model.domain
        m.model_version = model.model_version
        m.doc_string = model.doc_string
        m.metadata_props.extend(model.metadata_props)
        m.functions.extend(model.functions)
        if base_dir is not None and has_external_data(m):  # tensors inside If/Loop bodies, Constant attrs
            try:
                external_data_helper.load_external_data_for_model(m, str(base_dir))
            except Exception as exc:
                raise ModelError(f"cannot read external data from {base_dir} ({_first_line(exc)})") from exc
        segments.append((m, ins, outs))
    return segments, cut_tensors


def _out_dir_ok(out: Path) -> None:
    from edgesplit.bundle import _is_bundle_dir

    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_bundle_dir(out))):
        raise BundleError(f"{out}: exists and is not a bundle; refusing to overwrite it")


def partition(model_path: str | os.PathLike, cuts: Sequence[Sequence[str] | str], out: str | os.PathLike,
              shapes: dict | None = None, name: str | None = None, extra: dict | None = None,
              require_bound: bool = False, state: Sequence[tuple[str, str]] = (), auto_state: bool = True) -> Bundle:
    """Cut the model at `cuts` (in chain order) and write the bundle directory `out`.

    Args:
        model_path: the ONNX file (external data beside it is read too).
        cuts: one list of tensor names per cut (or a comma-separated string, or a
            CandidateCut). The head of a
            cut is everything its tensors depend on, plus the heads of the cuts before it;
            every other tensor that crosses is added to the cut.
        out: the bundle directory; it must not exist, be empty, or be a bundle (replaced).
        shapes: input name -> dims, or dim symbol -> size, for bytes per sample.
        name: the bundle's model name (default: the file's stem).
        extra: more manifest fields.
        require_bound: refuse a model whose inputs keep symbolic dims other than the batch
            (their sizes set every cut's bytes; the error names the input and an example --shape).
        state: (OUT, IN) pairs: model output OUT feeds model input IN at the next step (a
            recurrent state, a KV cache). Each pair must lie inside one segment, which keeps it.
        auto_state: also pair `present.*` outputs with `past_key_values.*` / `past.*` inputs.

    Raises:
        ModelError, CutError, BundleError: nothing is written.
    """
    model_path = Path(model_path)
    out = Path(out)
    _out_dir_ok(out)
    if not cuts:
        raise CutError("no cut given")
    model = load_model(model_path, load_weights=False)
    index = GraphIndex(model)
    info = infer_shapes(model, shapes)
    plan = StatePlan(index, info, state, auto_state)
    unbound = info.unbound_inputs(plan.inputs)
    if require_bound and unbound:
        what = "; ".join(f"input {n!r} has symbolic dims {', '.join(map(str, d))}" for n, d in unbound.items())
        raise ConfigError(f"{model_path}: {what}, which every cut's bytes depend on: bind them, "
                          f"e.g. {info.shape_hint(plan.inputs)}")
    heads = plan.attach(index, plan_segments(index, cuts))
    if heads and heads[-1] >= set(index.order):
        raise CutError("the last cut leaves the tail empty once each state's computation joins its segment")
    owners = plan.owners(index, [set()] + heads + [set(index.order)])
    shipped = [t for h in heads for t in crossing(index, h, plan)] + index.outputs
    fill_unknown(index, info, shipped, model_path)
    name_batch_axes(model_path, model, info, shipped)
    segs, cut_tensors = build_segments(model, index, info, heads, model_path.parent, plan)
    namer = UnknownNamer()
    cut_objs = []
    for k, tensors in enumerate(cut_tensors, start=1):
        specs = tuple(_spec(info, t, namer, f"cut {k}: tensor") for t in tensors)
        nbytes = sum(info.bytes_per_sample(t)[0] for t in tensors)
        cut_objs.append(Cut(k, tuple(tensors), nbytes, specs))
    for s, (proto, _, outs) in enumerate(segs):
        if not outs:
            raise CutError(f"segment {s} would make no tensor that is used later; drop one of its cuts")
        check_segment(proto, f"segment {s}")
    model_json = {
        "name": name or model_path.stem,
        "source_sha256": file_sha256(model_path, model),
        "source_path": str(model_path.resolve()),
        "inputs": [_spec(info, v, namer, "model input").to_json() for v in index.inputs if v not in plan.inputs],
        "outputs": [_spec(info, v, namer, "model output").to_json() for v in index.outputs
                    if v not in plan.outputs],
    }
    if shapes:
        model_json["shapes"] = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in shapes.items()}
    extra = dict(extra or {})
    if plan.pairs:
        # The caller's feeds and the answers leave the state out; each side keeps its own.
        extra["state"] = [{"output": o, "input": i, "segment": owners[i],
                           "spec": _spec(info, i, namer, "state input").to_json()} for o, i in plan.pairs]
    return write_bundle(out, model_json, segs, cut_objs, extra=extra or None)
