"""The partitioner on random DAGs: skip connections everywhere, several inputs and outputs,
outputs made mid-graph, inputs read late, constants, If nodes reading outer tensors; cut at
random tensor sets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesplit.errors import CutError
from edgesplit.graph import candidate_cuts, partition
from edgesplit.graph import GraphIndex
from test_graph import check_bundle

WIDTH = 4


def random_dag(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    n_inputs = int(rng.integers(1, 4))
    values = [f"in{i}" for i in range(n_inputs)]
    inits, nodes = [], []
    for i in range(int(rng.integers(8, 24))):
        op = str(rng.choice(["Relu", "Tanh", "Add", "Mul", "Sub", "MatMul", "Scale", "If"]))
        a = values[-1 - int(rng.integers(min(3, len(values))))]  # mostly a chain ...
        out = f"v{i}"
        if op in ("Relu", "Tanh"):
            nodes.append(helper.make_node(op, [a], [out], name=f"n{i}"))
        elif op == "MatMul":
            w = numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) * 0.5).astype(np.float32), f"w{i}")
            inits.append(w)
            nodes.append(helper.make_node("MatMul", [a, w.name], [out], name=f"n{i}"))
        elif op == "Scale":  # a Constant node feeding a Mul: never crosses a cut
            nodes.append(helper.make_node("Constant", [], [f"c{i}"], name=f"const{i}",
                                          value=numpy_helper.from_array(np.float32(0.5 + i / 10), f"cv{i}")))
            nodes.append(helper.make_node("Mul", [a, f"c{i}"], [out], name=f"n{i}"))
        elif op == "If":  # branches read tensors of the outer graph
            b, c = (values[int(rng.integers(len(values)))] for _ in range(2))
            if not inits or inits[0].name != "zero":
                inits.insert(0, numpy_helper.from_array(np.float32(0), "zero"))
            nodes.append(helper.make_node("ReduceSum", [a], [f"s{i}"], keepdims=0, name=f"sum{i}"))
            nodes.append(helper.make_node("Greater", [f"s{i}", "zero"], [f"cond{i}"], name=f"gt{i}"))
            branch_out = helper.make_tensor_value_info
            then_g = helper.make_graph([helper.make_node("Add", [b, c], [f"t{i}"], name=f"then{i}")], f"then{i}", [],
                                       [branch_out(f"t{i}", TensorProto.FLOAT, ["N", WIDTH])])
            else_g = helper.make_graph([helper.make_node("Sub", [b, a], [f"e{i}"], name=f"else{i}")], f"else{i}", [],
                                       [branch_out(f"e{i}", TensorProto.FLOAT, ["N", WIDTH])])
            nodes.append(helper.make_node("If", [f"cond{i}"], [out], then_branch=then_g, else_branch=else_g,
                                          name=f"n{i}"))
        else:
            b = values[int(rng.integers(len(values)))]  # ... with skip connections from anywhere
            nodes.append(helper.make_node(op, [a, b], [out], name=f"n{i}"))
        values.append(out)
    made = [v for v in values[n_inputs:]]
    outputs = {made[-1]} | {v for v in made[:-1] if rng.random() < 0.2}
    graph = helper.make_graph(
        nodes, f"dag{seed}",
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["N", WIDTH]) for v in values[:n_inputs]],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["N", WIDTH]) for v in made if v in outputs],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feeds_for(model: onnx.ModelProto) -> dict:
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal((3, WIDTH)).astype(np.float32) for i in model.graph.input}


@pytest.mark.parametrize("seed", range(16))
def test_random_dag_every_closed_cut(seed, tmp_path):
    model = random_dag(seed)
    path = tmp_path / "dag.onnx"
    onnx.save_model(model, str(path))
    cuts = candidate_cuts(path, narrow=False)
    if not cuts:  # one live compute node: nothing to cut
        assert len(GraphIndex(model).order) <= 1
        return
    bundle = partition(path, [c.tensors for c in cuts], tmp_path / "all")
    check_bundle(bundle, path, feeds_for(model))


@pytest.mark.parametrize("seed", range(16))
def test_random_dag_random_tensor_sets(seed, tmp_path):
    """A cut given as any set of tensors: the partitioner completes it to a closed cut that works."""
    model = random_dag(seed)
    path = tmp_path / "dag.onnx"
    onnx.save_model(model, str(path))
    index = GraphIndex(model)
    made = [v for n in index.order for v in index.outputs_of(n)]
    rng = np.random.default_rng(seed + 100)
    for trial in range(4):
        picked = list(rng.choice(made, size=min(len(made), int(rng.integers(1, 3))), replace=False))
        try:
            bundle = partition(path, [picked], tmp_path / f"b{trial}")
        except CutError as exc:
            assert "tail empty" in str(exc) or "does not lead" in str(exc)  # the only refusals possible here
            continue
        head = index.ancestors(picked)
        assert bundle.segments[0].outputs  # and the head is exactly what the picked tensors need
        assert {v for n in head for v in index.outputs_of(n)} >= set(bundle.segments[0].outputs)
        check_bundle(bundle, path, feeds_for(model))
    for node in model.graph.node:
        if node.op_type == "If":
            inner = node.attribute[0].g.output[0].name
            with pytest.raises(CutError, match="inside the body of node"):
                partition(path, [[inner]], tmp_path / "never")
            assert not (tmp_path / "never").exists()
