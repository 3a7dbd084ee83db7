"""The test suite's builders, in one place: tiny ONNX models and the bundles tests serve.

Models: every builder returns an onnx.ModelProto with a dynamic batch "N"; `save(model, dir)`
writes it. `TINY_MODELS` maps a name to a builder; `example_inputs(model)` makes matching feeds.
Bundles (written with edgesplit.bundle.write_bundle, each with a numpy or ONNX Runtime
reference): `mlp_bundle`, `echo_bundle`, `slow_bundle` (a MatMul+Tanh tail of a few ms) for the
cloud tests; `chain_bundle` (3 segments) and `slow_tail_bundle` (a tail whose time grows with the
batch) for the agent tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgesplit.bundle import Bundle, Cut, TensorSpec, write_bundle
from edgesplit.codecs import Encoded

OPSET = 17
IR_VERSION = 8

__all__ = ["OPSET", "TINY_MODELS", "attention", "chain", "example_inputs", "if_model", "loop_model",
           "residual", "save", "two_in_two_out", "function_model", "reshape_model", "contrib_model",
           "mlp_bundle", "mlp_reference", "echo_bundle", "slow_bundle", "slow_reference",
           "chain_bundle", "slow_tail_bundle", "reference", "DIM", "WIDTHS", "SLOW_WIDTH",
           "recurrent2", "kv_cache2", "gemm_mlp_bundle"]


def _w(name: str, *shape: int, seed: int = 0, scale: float = 0.5) -> onnx.TensorProto:
    rng = np.random.default_rng(abs(hash((name, seed))) % (1 << 32))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, inputs, outputs, inits=(), name: str = "g", value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgesplit-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _f(name: str, *dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def chain(width: int = 16, depth: int = 4) -> onnx.ModelProto:
    """x[N,width] -> (MatMul, Relu) * depth -> y: every cut is one tensor."""
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        inits.append(_w(f"w{i}", width, width))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"mm{i}"], [f"h{i}"], name=f"relu{i}"))
        prev = f"h{i}"
    inits.append(_w("wout", width, 3))
    nodes.append(helper.make_node("MatMul", [prev, "wout"], ["y"], name="head"))
    return _model(nodes, [_f("x", "N", width)], [_f("y", "N", 3)], inits, "chain")


def residual(channels: int = 8) -> onnx.ModelProto:
    """A conv stem and two residual blocks (skip connections), a Constant, pooling and a classifier."""
    c = channels
    inits = [_w("stem_w", c, 3, 3, 3), _w("stem_b", c)]
    nodes = [
        helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["stem"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["stem"], ["b0_in"], name="stem_relu"),
    ]
    prev = "b0_in"
    for b in range(2):
        p = f"b{b}"
        inits += [_w(f"{p}_w1", c, c, 3, 3, scale=0.2), _w(f"{p}_w2", c, c, 3, 3, scale=0.2)]
        nodes += [
            helper.make_node("Conv", [prev, f"{p}_w1"], [f"{p}_c1"], pads=[1, 1, 1, 1], name=f"{p}_conv1"),
            helper.make_node("Relu", [f"{p}_c1"], [f"{p}_r1"], name=f"{p}_relu1"),
            helper.make_node("Conv", [f"{p}_r1", f"{p}_w2"], [f"{p}_c2"], pads=[1, 1, 1, 1], name=f"{p}_conv2"),
            helper.make_node("Add", [f"{p}_c2", prev], [f"{p}_sum"], name=f"{p}_add"),
            helper.make_node("Relu", [f"{p}_sum"], [f"{p}_out"], name=f"{p}_relu2"),
        ]
        prev = f"{p}_out"
    inits += [_w("fc_w", c, 10), _w("fc_b", 10)]
    nodes += [
        helper.make_node("Constant", [], ["scale"], value=_c("scale_v", np.float32(0.5)), name="scale_const"),
        helper.make_node("Mul", [prev, "scale"], ["scaled"], name="scale"),
        helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
    ]
    return _model(nodes, [_f("x", "N", 3, 8, 8)], [_f("logits", "N", 10)], inits, "residual")


def two_in_two_out() -> onnx.ModelProto:
    """Two inputs, two outputs; output y1 is made mid-graph and read again, input x2 is read last."""
    inits = [_w("w1", 4, 6), _w("w2", 6, 6), _w("w3", 12, 5), _w("w4", 5, 6)]
    nodes = [
        helper.make_node("MatMul", ["x1", "w1"], ["a1"], name="mm1"),
        helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
        helper.make_node("MatMul", ["x2", "w2"], ["a2"], name="mm2"),
        helper.make_node("Tanh", ["a2"], ["h2"], name="tanh2"),
        helper.make_node("Concat", ["h1", "h2"], ["cat"], axis=1, name="concat"),
        helper.make_node("MatMul", ["cat", "w3"], ["y1"], name="mm3"),
        helper.make_node("Relu", ["y1"], ["r"], name="relu3"),
        helper.make_node("MatMul", ["r", "w4"], ["a4"], name="mm4"),
        helper.make_node("Add", ["a4", "x2"], ["y2"], name="add_x2"),
    ]
    return _model(nodes, [_f("x1", "N", 4), _f("x2", "N", 6)], [_f("y1", "N", 5), _f("y2", "N", 6)],
                  inits, "two_in_two_out")


def if_model() -> onnx.ModelProto:
    """An If node whose branches read outer-scope tensors (h, g) and an outer initializer (s)."""
    then_g = helper.make_graph(
        [helper.make_node("Add", ["h", "g"], ["then_sum"], name="then_add"),
         helper.make_node("Relu", ["then_sum"], ["then_out"], name="then_relu")],
        "then_branch", [], [_f("then_out", "N", 8)])
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["h", "s"], ["else_out"], name="else_mul")],
        "else_branch", [], [_f("else_out", "N", 8)])
    inits = [_w("w1", 4, 8), _w("w2", 8, 8), _w("w3", 8, 3), _c("zero", np.float32(0.0)),
             _c("s", np.float32(-0.5))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["h"], name="relu1"),
        helper.make_node("MatMul", ["h", "w2"], ["b"], name="mm2"),
        helper.make_node("Sigmoid", ["b"], ["g"], name="sig"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g, name="branch"),
        helper.make_node("MatMul", ["z", "w3"], ["y"], name="mm3"),
    ]
    return _model(nodes, [_f("x", "N", 4)], [_f("y", "N", 3)], inits, "if_model")


def loop_model(trips: int = 3) -> onnx.ModelProto:
    """A Loop whose body adds the outer-scope tensor h (times outer initializer half) to its state."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Mul", ["h", "half"], ["step"], name="body_mul"),
         helper.make_node("Add", ["v_in", "step"], ["v_out"], name="body_add")],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _f("v_in", "N", 6)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _f("v_out", "N", 6)])
    inits = [_w("w1", 6, 6), _w("w2", 6, 2), _c("trips", np.int64(trips)), _c("true", np.bool_(True)),
             _c("half", np.float32(0.5))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Tanh", ["a"], ["h"], name="tanh"),
        helper.make_node("Loop", ["trips", "true", "x"], ["v"], body=body, name="loop"),
        helper.make_node("MatMul", ["v", "w2"], ["y"], name="mm2"),
    ]
    return _model(nodes, [_f("x", "N", 6)], [_f("y", "N", 2)], inits, "loop_model")


def attention(d: int = 8) -> onnx.ModelProto:
    """One self-attention block with an attention mask input, symbolic batch "N" and length "S"."""
    inits = [_w("wq", d, d), _w("wk", d, d), _w("wv", d, d), _w("wo", d, d),
             _c("inv_sqrt_d", np.float32(1.0 / np.sqrt(d))), _c("one", np.float32(1.0)),
             _c("neg", np.float32(-1e4)), _c("axes1", np.array([1], np.int64)), _c("eps", np.float32(1e-5)),
             _c("perm_k", np.array([0, 2, 1], np.int64))]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["qk"], name="qk"),
        helper.make_node("Mul", ["qk", "inv_sqrt_d"], ["scores"], name="scale"),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_cast"),
        helper.make_node("Sub", ["one", "maskf"], ["inv_mask"], name="mask_inv"),
        helper.make_node("Mul", ["inv_mask", "neg"], ["bias2d"], name="mask_bias"),
        helper.make_node("Unsqueeze", ["bias2d", "axes1"], ["bias"], name="mask_unsq"),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="ctx"),
        helper.make_node("MatMul", ["ctx", "wo"], ["proj"], name="out_proj"),
        helper.make_node("Add", ["proj", "x"], ["res"], name="residual"),
        helper.make_node("ReduceMean", ["res"], ["mu"], axes=[-1], name="ln_mean"),
        helper.make_node("Sub", ["res", "mu"], ["cen"], name="ln_sub"),
        helper.make_node("Mul", ["cen", "cen"], ["sq"], name="ln_sq"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="ln_var"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln_std"),
        helper.make_node("Div", ["cen", "std"], ["y"], name="ln_div"),
    ]
    inputs = [_f("x", "N", "S", d), helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"])]
    return _model(nodes, inputs, [_f("y", "N", "S", d)], inits, "attention")


def function_model() -> onnx.ModelProto:
    """A model-local function (domain "tiny") called twice, with its own opset import."""
    fn = helper.make_function(
        "tiny", "LinearRelu", ["X", "W"], ["Y"],
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Relu", ["XW"], ["Y"])],
        opset_imports=[helper.make_opsetid("", OPSET)])
    inits = [_w("w1", 6, 6), _w("w2", 6, 6), _w("w3", 6, 2)]
    nodes = [
        helper.make_node("LinearRelu", ["x", "w1"], ["f1"], domain="tiny", name="call1"),
        helper.make_node("LinearRelu", ["f1", "w2"], ["f2"], domain="tiny", name="call2"),
        helper.make_node("Add", ["f2", "x"], ["s"], name="skip"),
        helper.make_node("MatMul", ["s", "w3"], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "function_model", [_f("x", "N", 6)], [_f("y", "N", 2)], initializer=inits)
    model = helper.make_model(graph, functions=[fn], producer_name="edgesplit-tests",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("tiny", 1)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def reshape_model() -> onnx.ModelProto:
    """Reshapes with -1 that make shape inference lose the batch dim: r is [2N, 4], b is [N, 8]."""
    inits = [_w("w1", 8, 8), _w("w2", 8, 3), _c("s1", np.array([-1, 4], np.int64)),
             _c("s2", np.array([-1, 8], np.int64))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Reshape", ["a", "s1"], ["r"], name="split_rows"),
        helper.make_node("Relu", ["r"], ["rr"], name="relu"),
        helper.make_node("Reshape", ["rr", "s2"], ["b"], name="join_rows"),
        helper.make_node("MatMul", ["b", "w2"], ["y"], name="mm2"),
    ]
    return _model(nodes, [_f("x", "N", 8)], [_f("y", "N", 3)], inits, "reshape_model")


def contrib_model() -> onnx.ModelProto:
    """An ONNX Runtime contrib op (com.microsoft Gelu), which ONNX shape inference does not know."""
    inits = [_w("w1", 8, 8), _w("w2", 8, 3)]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft", name="gelu"),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "contrib_model", [_f("x", "N", 8)], [_f("y", "N", 3)], initializer=inits)
    model = helper.make_model(graph, producer_name="edgesplit-tests", opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


TINY_MODELS = {
    "chain": chain,
    "residual": residual,
    "two_in_two_out": two_in_two_out,
    "if_model": if_model,
    "loop_model": loop_model,
    "attention": attention,
    "function_model": function_model,
    "reshape_model": reshape_model,
    "contrib_model": contrib_model,
}


def save(model: onnx.ModelProto, directory: str | Path, name: str | None = None) -> Path:
    """Write `model` as DIR/<name>.onnx and return the path."""
    path = Path(directory) / f"{name or model.graph.name}.onnx"
    onnx.save_model(model, str(path))
    return path


def example_inputs(model: onnx.ModelProto, batch: int = 2, seq: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for a model's inputs: symbolic "N" -> batch, other symbols -> seq; masks are 0/1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else seq)
                for i, d in enumerate(tt.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            arr = rng.integers(0, 2, dims).astype(dtype)
            if arr.ndim == 2:
                arr[:, 0] = 1  # an attention mask keeps at least one position
            feeds[vi.name] = arr
    return feeds


# -- bundles for the cloud tests ------------------------------------------------------------------


def mlp_bundle(out: Path, width: int = 16, hidden: int = 32, classes: int = 4) -> Bundle:
    """x[N,width] -> relu(x W1 + b1) = h[N,hidden] -> h W2 + b2 = y[N,classes]; cut 1 ships h."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((width, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32)
    head = _model([helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Relu", ["m"], ["h"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                  [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", hidden])],
                  [numpy_helper.from_array(w1, "w1")])
    tail = _model([helper.make_node("MatMul", ["h", "w2"], ["y"])],
                  [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", hidden])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
                  [numpy_helper.from_array(w2, "w2")])
    h = TensorSpec("h", "float32", ("N", hidden))
    model = {"name": "mlp", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", width)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", classes)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), h.bytes_per_sample(), (h,))])


def mlp_reference(x: np.ndarray, out: Path) -> np.ndarray:
    """What the whole mlp bundle computes, with numpy from the segment files' weights."""
    b = Bundle.load(out)
    w1 = numpy_helper.to_array(onnx.load(str(b.segments[0].path)).graph.initializer[0])
    w2 = numpy_helper.to_array(onnx.load(str(b.segments[1].path)).graph.initializer[0])
    return np.maximum(x @ w1, 0) @ w2


def echo_bundle(out: Path, elems: int = 1 << 18, small_reply: bool = False) -> Bundle:
    """x[N,elems] -> Identity -> h -> Identity (or ReduceMax: y[N,1]) -> y: a near-zero-compute tail."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", elems])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", elems])
    ydim = 1 if small_reply else elems
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", ydim])
    head = _model([helper.make_node("Identity", ["x"], ["h"])], [x], [h])
    if small_reply:
        tail = _model([helper.make_node("ReduceMax", ["h"], ["y"], keepdims=1, axes=[1])], [h], [y])
        tail.opset_import[0].version = 13
    else:
        tail = _model([helper.make_node("Identity", ["h"], ["y"])], [h], [y])
    hs = TensorSpec("h", "float32", ("N", elems))
    model = {"name": "echo-small" if small_reply else "echo", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", elems)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", ydim)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), hs.bytes_per_sample(), (hs,))])


def slow_bundle(out: Path, width: int = 256, depth: int = 24) -> Bundle:
    """x[N,width] -> Identity -> h; tail: depth x (MatMul + Tanh) -> y[N,width]: a tail of a few ms.

    The weights are scaled orthogonal-ish so values stay finite; the reference is numpy.
    """
    rng = np.random.default_rng(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    head = _model([helper.make_node("Identity", ["x"], ["h"])], [x], [h])
    nodes, inits, prev = [], [], "h"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out_name = "y" if i == depth - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out_name]))
        prev = out_name
    tail = _model(nodes, [h], [y], inits)
    hs = TensorSpec("h", "float32", ("N", width))
    model = {"name": "slow", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", width)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", width)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), hs.bytes_per_sample(), (hs,))])


def slow_reference(x: np.ndarray, out: Path) -> np.ndarray:
    b = Bundle.load(out)
    for w in onnx.load(str(b.segments[1].path)).graph.initializer:
        x = np.tanh(x @ numpy_helper.to_array(w))
    return x


# -- bundles for the agent tests ------------------------------------------------------------------
DIM = 16
WIDTHS = (DIM, 32, 24, 8)  # x[N,16] -> a[N,32] -> b[N,24] -> y[N,8]


def _layer(name: str, x: str, y: str, n_in: int, n_out: int, seed: int, act: str | None):
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32) * 0.1, f"{name}_b")
    pre = y + "_pre" if act else y
    nodes = [helper.make_node("Gemm", [x, w.name, b.name], [pre], name=f"{name}_gemm")]
    if act:
        nodes.append(helper.make_node(act, [pre], [y], name=f"{name}_{act.lower()}"))
    return nodes, [w, b]


def _mlp_model(nodes, inits, x: str, n_in: int, y: str, n_out: int) -> onnx.ModelProto:
    return _model(nodes, [_f(x, "N", n_in)], [_f(y, "N", n_out)], inits)


def chain_bundle(out: Path) -> tuple[Bundle, Path]:
    """A 3-segment MLP bundle (cuts 1 and 2) and the unsplit model beside it."""
    names = ("x", "a", "b", "y")
    acts = ("Relu", "Tanh", None)
    layers = [_layer(f"l{i}", names[i], names[i + 1], WIDTHS[i], WIDTHS[i + 1], seed=i, act=acts[i])
              for i in range(3)]
    segments = [(_mlp_model(n, w, names[i], WIDTHS[i], names[i + 1], WIDTHS[i + 1]), [names[i]], [names[i + 1]])
                for i, (n, w) in enumerate(layers)]
    full = _mlp_model([n for ls, _ in layers for n in ls], [w for _, ws in layers for w in ws], "x", DIM, "y", WIDTHS[-1])
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / "full.onnx"
    onnx.save(full, str(full_path))
    specs = [TensorSpec(names[i], "float32", ("N", WIDTHS[i])) for i in range(4)]
    model = {"name": "chain", "source_sha256": "0" * 64, "inputs": [specs[0].to_json()],
             "outputs": [specs[3].to_json()]}
    cuts = [Cut(k, (names[k],), specs[k].bytes_per_sample(), (specs[k],)) for k in (1, 2)]
    return write_bundle(out / "chain.bundle", model, segments, cuts), full_path


SLOW_WIDTH = 512


def slow_tail_bundle(out: Path, depth: int = 24) -> tuple[Bundle, Path]:
    """A 2-segment bundle with a heavy tail: its time grows with the batch, its cut stays small.

    x[N,16] -> tanh(Gemm) = h[N,32] | tanh(Gemm) to 512 wide, `depth` x tanh(MatMul 512x512),
    Gemm -> y[N,8]. The tail's MatMuls share one weight (stored once): a few thousand rows take
    a few hundred ms on one CPU core (128 bytes a row on the wire), 2 rows well under a
    millisecond. Also writes the unsplit model as slow_full.onnx beside it.
    """
    cut_w = 32
    head_nodes, head_w = _layer("s_in", "x", "h", DIM, cut_w, seed=10, act="Tanh")
    up_nodes, up_w = _layer("s_up", "h", "s_t", cut_w, SLOW_WIDTH, seed=11, act="Tanh")
    rng = np.random.default_rng(12)
    w = numpy_helper.from_array((rng.standard_normal((SLOW_WIDTH, SLOW_WIDTH)) / np.sqrt(SLOW_WIDTH))
                                .astype(np.float32), "s_w")
    tail_nodes, prev = list(up_nodes), "s_t"
    for i in range(depth):
        tail_nodes += [helper.make_node("MatMul", [prev, "s_w"], [f"s_m{i}"], name=f"s_mm{i}"),
                       helper.make_node("Tanh", [f"s_m{i}"], [f"s_t{i}"], name=f"s_tanh{i}")]
        prev = f"s_t{i}"
    out_nodes, out_w = _layer("s_out", prev, "y", SLOW_WIDTH, WIDTHS[-1], seed=13, act=None)
    tail_w = [*up_w, w, *out_w]
    tail = _mlp_model(tail_nodes + out_nodes, tail_w, "h", cut_w, "y", WIDTHS[-1])
    head = _mlp_model(head_nodes, head_w, "x", DIM, "h", cut_w)
    full = _mlp_model(head_nodes + tail_nodes + out_nodes, [*head_w, *tail_w], "x", DIM, "y", WIDTHS[-1])
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / "slow_full.onnx"
    onnx.save(full, str(full_path))
    x, h, y = (TensorSpec("x", "float32", ("N", DIM)), TensorSpec("h", "float32", ("N", cut_w)),
               TensorSpec("y", "float32", ("N", WIDTHS[-1])))
    model = {"name": "slow", "source_sha256": "0" * 64, "inputs": [x.to_json()], "outputs": [y.to_json()]}
    cuts = [Cut(1, ("h",), h.bytes_per_sample(), (h,))]
    return write_bundle(out / "slow.bundle", model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])], cuts), full_path


def reference(full_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(full_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# -- stateful models (state pairs: an output that feeds an input at the next step) ---------------
def recurrent2(width: int = 8) -> onnx.ModelProto:
    """Two stacked recurrent layers, each with its own state: s0 -> s0.out, s1 -> s1.out.

    a = tanh(x W0 + s0 U0), b = tanh(a W1 + s1 U1), y = b W2. The natural cut is `a`; then the
    head keeps s0 and the tail keeps s1 (pairs given with --state: the names follow no convention).
    """
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["xw0"]), helper.make_node("MatMul", ["s0", "U0"], ["su0"]),
        helper.make_node("Add", ["xw0", "su0"], ["pre0"]), helper.make_node("Tanh", ["pre0"], ["a"]),
        helper.make_node("Identity", ["a"], ["s0.out"]),
        helper.make_node("MatMul", ["a", "W1"], ["aw1"]), helper.make_node("MatMul", ["s1", "U1"], ["su1"]),
        helper.make_node("Add", ["aw1", "su1"], ["pre1"]), helper.make_node("Tanh", ["pre1"], ["b"]),
        helper.make_node("Identity", ["b"], ["s1.out"]),
        helper.make_node("MatMul", ["b", "W2"], ["y"]),
    ]
    inits = [_w(n, width, width, seed=i) for i, n in enumerate(("W0", "U0", "W1", "U1", "W2"))]
    return _model(nodes, [_f("x", "N", width), _f("s0", "N", width), _f("s1", "N", width)],
                  [_f("y", "N", width), _f("s0.out", "N", width), _f("s1.out", "N", width)], inits, "recurrent2")


def kv_cache2(width: int = 4) -> onnx.ModelProto:
    """Two 'attention' layers with a growing cache in the exported-decoder naming.

    present.0 = concat(past_key_values.0, x W0) over the sequence axis; h = mean of present.0;
    present.1 = concat(past_key_values.1, h W1); y = mean of present.1. The cut is `h`.
    """
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["k0"]),
        helper.make_node("Concat", ["past_key_values.0", "k0"], ["present.0"], axis=1),
        helper.make_node("ReduceMean", ["present.0"], ["h"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["h", "W1"], ["k1_"]),
        helper.make_node("Unsqueeze", ["k1_", "one"], ["k1"]),
        helper.make_node("Concat", ["past_key_values.1", "k1"], ["present.1"], axis=1),
        helper.make_node("ReduceMean", ["present.1"], ["y"], axes=[1], keepdims=0),
    ]
    inits = [_w("W0", width, width, seed=1), _w("W1", width, width, seed=2), _c("one", np.array([1], np.int64))]
    return _model(nodes, [_f("x", "N", "T", width), _f("past_key_values.0", "N", "P0", width),
                          _f("past_key_values.1", "N", "P1", width)],
                  [_f("y", "N", width), _f("present.0", "N", "Q0", width), _f("present.1", "N", "Q1", width)],
                  inits, "kv_cache2")


# -- the conftest fixture's bundle -------------------------------------------------------------
def _gemm_segment(name: str, x: str, y: str, n_in: int, n_out: int, seed: int, relu: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), f"{name}_b")
    nodes = [helper.make_node("Gemm", [x, w.name, b.name], [y + ("_pre" if relu else "")])]
    if relu:
        nodes.append(helper.make_node("Relu", [y + "_pre"], [y]))
    return _model(nodes, [_f(x, "N", n_in)], [_f(y, "N", n_out)], [w, b], name)


def gemm_mlp_bundle(out: Path) -> Bundle:
    """A 2-segment MLP bundle (x[N,16] -> relu(Gemm) = h[N,32] -> Gemm = y[N,4]), written with the
    bundle API itself (the `mlp_bundle` fixture of tests/conftest.py)."""
    head = _gemm_segment("head", "x", "h", 16, 32, seed=0, relu=True)
    tail = _gemm_segment("tail", "h", "y", 32, 4, seed=1, relu=False)
    h_spec = TensorSpec("h", "float32", ("N", 32))
    model = {"name": "mlp", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", 16)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", 4)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), h_spec.bytes_per_sample(), (h_spec,))])


# -- pipeline stages: a tail whose weights span several workers ------------------------------------
def stack_bundle(out: Path, width: int = 64, layers: int = 8, name: str = "stack") -> tuple[Bundle, Path]:
    """`layers` segments of tanh(x @ W_i), each with its own width x width weight (4 * width^2
    bytes a segment), cut between every two; writes the unsplit model as <name>_full.onnx too."""
    rng = np.random.default_rng(21)
    names = ["x"] + [f"h{i}" for i in range(1, layers)] + ["y"]
    segments, all_nodes, all_inits = [], [], []
    for i in range(layers):
        w = numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}")
        nodes = [helper.make_node("MatMul", [names[i], w.name], [f"m{i}"], name=f"mm{i}"),
                 helper.make_node("Tanh", [f"m{i}"], [names[i + 1]], name=f"tanh{i}")]
        segments.append((_mlp_model(nodes, [w], names[i], width, names[i + 1], width), [names[i]], [names[i + 1]]))
        all_nodes += nodes
        all_inits.append(w)
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / f"{name}_full.onnx"
    onnx.save(_mlp_model(all_nodes, all_inits, "x", width, "y", width), str(full_path))
    specs = [TensorSpec(t, "float32", ("N", width)) for t in names]
    model = {"name": name, "source_sha256": "0" * 64, "inputs": [specs[0].to_json()], "outputs": [specs[-1].to_json()]}
    cuts = [Cut(k, (names[k],), specs[k].bytes_per_sample(), (specs[k],)) for k in range(1, layers)]
    return write_bundle(out / f"{name}.bundle", model, segments, cuts), full_path


# -- codecs -----------------------------------------------------------------------------------------
def tamper(enc: Encoded, **changes) -> Encoded:
    """A copy of an edgesplit.codecs.Encoded with some fields changed (a hostile or broken frame)."""
    fields = dict(codec=enc.codec, dtype=enc.dtype, shape=enc.shape, params=dict(enc.params), payload=enc.payload)
    fields.update(changes)
    return Encoded(**fields)
