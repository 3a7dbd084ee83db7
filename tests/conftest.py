"""Shared fixtures: a small two-segment bundle written with the bundle API itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesplit.bundle import Cut, TensorSpec, write_bundle


def _mlp_segment(name: str, x: str, y: str, n_in: int, n_out: int, seed: int, relu: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), f"{name}_b")
    nodes = [helper.make_node("Gemm", [x, w.name, b.name], [y + ("_pre" if relu else "")])]
    if relu:
        nodes.append(helper.make_node("Relu", [y + "_pre"], [y]))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", n_out])],
        initializer=[w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def mlp_bundle(tmp_path):
    """A 2-segment MLP bundle (x[N,16] -> h[N,32] -> y[N,4]) with a dynamic batch dim."""
    head = _mlp_segment("head", "x", "h", 16, 32, seed=0, relu=True)
    tail = _mlp_segment("tail", "h", "y", 32, 4, seed=1, relu=False)
    h_spec = TensorSpec("h", "float32", ("N", 32))
    model = {
        "name": "mlp",
        "source_sha256": "0" * 64,
        "inputs": [TensorSpec("x", "float32", ("N", 16)).to_json()],
        "outputs": [TensorSpec("y", "float32", ("N", 4)).to_json()],
    }
    return write_bundle(tmp_path / "mlp.bundle", model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), h_spec.bytes_per_sample(), (h_spec,))])
