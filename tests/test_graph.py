"""The partitioner on tiny models built in code: every closed cut, chains, crossing tensors, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import builders as tm
from edgesplit.bundle import Bundle
from edgesplit.errors import BundleError, ConfigError, CutError, ModelError
from edgesplit.graph import candidate_cuts, infer_shapes, load_model, parse_shape_option, partition
from edgesplit.runtime import OnnxRuntimeRunner, SegmentChain


def reference(model_path: Path, feeds: dict) -> dict:
    with OnnxRuntimeRunner(model_path) as r:
        return r.infer(feeds)


def assert_close(ref: dict, got: dict, names) -> None:
    for name in names:
        scale = max(float(np.max(np.abs(ref[name]))), 1e-6)
        err = float(np.max(np.abs(ref[name].astype(np.float64) - got[name])))
        assert err <= 1e-4 * scale, f"{name}: max abs err {err} at scale {scale}"


def check_bundle(bundle: Bundle, model_path: Path, feeds: dict) -> None:
    """Every segment passes the full checker; splitting at every cut k (shipping only the cut's
    tensors) reproduces the original outputs; the tensors match the manifest's specs."""
    for seg in bundle.segments:
        onnx.checker.check_model(str(seg.path), full_check=True)
    ref = reference(model_path, feeds)
    n = bundle.num_segments
    with SegmentChain(bundle, 0, n, runner="ort-cpu") as whole:
        assert_close(ref, whole.run(feeds), [s.name for s in bundle.outputs])
    runners = [OnnxRuntimeRunner(s.path).activate() for s in bundle.segments]
    env = dict(feeds)
    for k in range(n):
        cut = bundle.cut(k)
        assert set(cut.tensors) <= set(env)
        sent = {t: env[t] for t in cut.tensors}  # all the cloud gets when the edge stops at cut k
        for spec in cut.specs:
            arr = sent[spec.name]
            assert arr.dtype.name == spec.dtype
            assert len(arr.shape) == len(spec.shape)
            assert all(d == a for d, a in zip(spec.shape, arr.shape) if isinstance(d, int))
        out = dict(sent)
        for i in range(k, n):
            assert set(bundle.segments[i].inputs) <= set(out)
            out.update(runners[i].infer(out))
        assert_close(ref, out, [s.name for s in bundle.outputs])
        env.update(runners[k].infer(env))
    for r in runners:
        r.deactivate()


@pytest.fixture(params=sorted(tm.TINY_MODELS))
def tiny(request, tmp_path):
    model = tm.TINY_MODELS[request.param]()
    return model, tm.save(model, tmp_path)


def test_every_closed_cut_partitions_and_reproduces(tiny, tmp_path):
    model, path = tiny
    feeds = tm.example_inputs(model, batch=3)
    cuts = candidate_cuts(path, narrow=False)
    assert cuts, "every tiny model has closed cuts"
    for c in cuts:
        bundle = partition(path, [c.tensors], tmp_path / f"b{c.index}")
        assert bundle.cut(1).tensors == c.tensors  # the head of a cut is what its tensors depend on
        assert bundle.cut(1).bytes_per_sample == c.bytes_per_sample
        check_bundle(bundle, path, feeds)


def test_chain_of_all_cuts(tiny, tmp_path):
    model, path = tiny
    cuts = candidate_cuts(path, narrow=False)
    bundle = partition(path, [c.tensors for c in cuts], tmp_path / "chain")
    assert bundle.num_segments == len(cuts) + 1
    assert [c.tensors for c in bundle.cuts] == [c.tensors for c in cuts]
    check_bundle(bundle, path, tm.example_inputs(model, batch=2, seed=1))


def test_residual_cut_at_branch_adds_the_skip_tensor(tmp_path):
    path = tm.save(tm.residual(), tmp_path)
    bundle = partition(path, [["b0_r1"]], tmp_path / "b")
    assert bundle.cut(1).tensors == ("b0_in", "b0_r1")  # the skip connection crosses too
    assert bundle.cut(1).bytes_per_sample == 2 * 8 * 8 * 8 * 4
    assert bundle.segments[1].inputs == ("b0_in", "b0_r1")


def test_graph_input_read_late_and_early_output_cross(tmp_path):
    model = tm.two_in_two_out()
    path = tm.save(model, tmp_path)
    bundle = partition(path, ["y1"], tmp_path / "b")
    assert bundle.cut(1).tensors == ("x2", "y1")
    assert bundle.segments[0].outputs == ("y1",)
    assert [s.name for s in bundle.outputs] == ["y1", "y2"]
    check_bundle(bundle, path, tm.example_inputs(model))


def test_if_outer_scope_reads_cross(tmp_path):
    model = tm.if_model()
    path = tm.save(model, tmp_path)
    bundle = partition(path, [["h"]], tmp_path / "b")
    # x feeds the If condition, h and g are read inside the branches
    assert bundle.cut(1).tensors == ("x", "h")
    bundle = partition(path, [["g"]], tmp_path / "b2")
    assert set(bundle.cut(1).tensors) == {"x", "h", "g"}
    tail = onnx.load(str(bundle.segments[1].path))
    assert {i.name for i in tail.graph.input} == {"x", "h", "g"}
    assert "s" in {t.name for t in tail.graph.initializer}  # the else branch's outer initializer
    check_bundle(bundle, path, tm.example_inputs(model))


def test_loop_body_reads_cross(tmp_path):
    model = tm.loop_model()
    path = tm.save(model, tmp_path)
    bundle = partition(path, [["h"]], tmp_path / "b")
    assert bundle.cut(1).tensors == ("x", "h")
    check_bundle(bundle, path, tm.example_inputs(model, batch=4))


def test_specs_keep_symbolic_dims_and_shapes_bind_bytes(tmp_path):
    path = tm.save(tm.attention(), tmp_path)
    cuts = {c.tensors: c for c in candidate_cuts(path, narrow=False)}
    res = cuts[("res",)]
    assert res.specs[0].shape == ("N", "S", 8)
    assert res.bytes_per_sample == 8 * 4 and not res.exact  # S unbound counts as 1
    bound = {c.tensors: c for c in candidate_cuts(path, shapes={"S": 128}, narrow=False)}
    assert bound[("res",)].bytes_per_sample == 128 * 8 * 4 and bound[("res",)].exact
    by_input = {c.tensors: c for c in candidate_cuts(path, shapes={"x": (1, 64, 8)}, narrow=False)}
    assert by_input[("res",)].bytes_per_sample == 64 * 8 * 4
    scores = next(c for t, c in bound.items() if "scores" in t and len(t) == 4)
    assert scores.bytes_per_sample > 128 * 128 * 4  # the S x S attention scores dominate
    bundle = partition(path, [["res"]], tmp_path / "b", shapes={"S": 16})
    assert bundle.cut(1).specs[0].shape == ("N", "S", 8)
    assert bundle.manifest["model"]["inputs"][1] == {"name": "mask", "dtype": "int64", "shape": ["N", "S"]}


def test_batch_axis_lost_by_inference_is_found_again(tmp_path):
    model = tm.reshape_model()
    path = tm.save(model, tmp_path)
    bundle = partition(path, [["rr"], ["b"]], tmp_path / "b")
    rr, b = bundle.cut(1).specs[0], bundle.cut(2).specs[0]
    assert rr.shape[1:] == (4,) and rr.shape[0] != "N"  # 2N rows: not the batch
    assert isinstance(rr.shape[0], str)
    assert b.shape == ("N", 8)  # one row per sample again: the batch symbol is back
    check_bundle(bundle, path, tm.example_inputs(model, batch=3))


def test_contrib_op_types_come_from_onnxruntime(tmp_path):
    path = tm.save(tm.contrib_model(), tmp_path)
    bundle = partition(path, [["g"]], tmp_path / "b")
    assert bundle.cut(1).specs[0].dtype == "float32"
    assert bundle.cut(1).specs[0].shape[0] == "N" and len(bundle.cut(1).specs[0].shape) == 2


def test_narrow_cuts_are_block_boundaries(tmp_path):
    path = tm.save(tm.residual(), tmp_path)
    narrow = candidate_cuts(path)
    every = candidate_cuts(path, narrow=False)
    assert 0 < len(narrow) < len(every)
    assert all(len(c.tensors) == 1 for c in narrow)
    assert ("b0_out",) in [c.tensors for c in narrow]
    assert [c.index for c in narrow] == list(range(1, len(narrow) + 1))


def test_weights_stored_once(tmp_path):
    path = tm.save(tm.residual(channels=32), tmp_path)
    cuts = candidate_cuts(path, narrow=False)
    picked = [cuts[i].tensors for i in (1, 6, 11, 13)]
    bundle = partition(path, picked, tmp_path / "b")
    sizes = sum(s.path.stat().st_size for s in bundle.segments)
    original = path.stat().st_size
    assert abs(sizes - original) <= 0.05 * original
    names = [t.name for s in bundle.segments for t in onnx.load(str(s.path)).graph.initializer]
    assert len(names) == len(set(names))


def test_constant_nodes_are_copied_not_shipped(tmp_path):
    path = tm.save(tm.residual(), tmp_path)
    for c in candidate_cuts(path, narrow=False):
        assert "scale" not in c.tensors
    bundle = partition(path, [["b1_out"]], tmp_path / "b")
    tail = onnx.load(str(bundle.segments[1].path))
    assert "Constant" in [n.op_type for n in tail.graph.node]


def test_manifest_records_source_and_specs(tmp_path):
    path = tm.save(tm.chain(), tmp_path)
    bundle = partition(path, ["h1"], tmp_path / "b")
    m = json.loads((bundle.path / "manifest.json").read_text())
    import hashlib

    assert m["model"]["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m["model"]["source_path"] == str(path.resolve())
    assert m["cuts"] == [{"index": 1, "tensors": ["h1"], "bytes_per_sample": 64,
                          "specs": [{"name": "h1", "dtype": "float32", "shape": ["N", 16]}]}]
    seg = onnx.load(str(bundle.segments[0].path))
    assert seg.ir_version == tm.IR_VERSION and seg.opset_import[0].version == tm.OPSET


@pytest.mark.parametrize("cuts, message", [
    ([["nope"]], "no tensor named 'nope'"),
    ([["then_sum"]], "inside the body of node 'branch' (If)"),
    ([["x"]], "leaves the head empty"),
    ([["y"]], "leaves the tail empty"),
    ([["w1"]], "is a weight"),
    ([["g"], ["h"]], "does not come after cut 1"),
    ([[]], "names no tensor"),
])
def test_bad_cuts_are_refused_and_write_nothing(tmp_path, cuts, message):
    path = tm.save(tm.if_model(), tmp_path)
    out = tmp_path / "b"
    with pytest.raises(CutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        partition(path, cuts, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["if_model.onnx"]


def test_constant_tensor_is_refused(tmp_path):
    path = tm.save(tm.residual(), tmp_path)
    with pytest.raises(CutError, match="computed from weights only"):
        partition(path, [["scale"]], tmp_path / "b")


def test_bad_model_files(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(ModelError, match="not an ONNX model"):
        load_model(text)
    good = tm.save(tm.residual(channels=16), tmp_path)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 40):
        trunc = tmp_path / f"trunc{cut}.onnx"
        trunc.write_bytes(data[:cut])
        with pytest.raises(ModelError) as info:
            load_model(trunc)
        assert "\n" not in str(info.value) and str(trunc) in str(info.value)
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="directory"):
        load_model(tmp_path)


def test_out_dir_that_is_not_a_bundle_is_refused(tmp_path):
    path = tm.save(tm.chain(), tmp_path)
    out = tmp_path / "stuff"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        partition(path, ["h1"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # an existing bundle is replaced
    partition(path, ["h1"], tmp_path / "b")
    again = partition(path, ["h2"], tmp_path / "b")
    assert again.cut(1).tensors == ("h2",)


def test_external_data_model(tmp_path):
    model = tm.residual(channels=32)
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=256)
    assert (path.parent / "model.onnx.data").stat().st_size > path.stat().st_size
    bundle = partition(path, [["b0_out"], ["b1_out"]], tmp_path / "b")
    check_bundle(bundle, path, tm.example_inputs(model))
    # the segments carry the weights themselves
    shutil.rmtree(path.parent)
    with SegmentChain(bundle, 0, bundle.num_segments, runner="ort-cpu") as chain:
        assert chain.run(tm.example_inputs(model))["logits"].shape == (2, 10)


def test_external_data_inside_an_if_body(tmp_path):
    model = tm.if_model()
    then = next(a.g for a in model.graph.node[6].attribute if a.name == "then_branch")
    value = onnx.numpy_helper.from_array(np.full((1, 8), 0.25, np.float32), "big_value")
    then.node.insert(0, helper.make_node("Constant", [], ["big"], value=value))
    then.node[1].input[1] = "big"  # then_add reads h + big
    path = tmp_path / "ext" / "if.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, size_threshold=0, location="if.data")
    bundle = partition(path, [["h"]], tmp_path / "b")
    (path.parent / "if.data").unlink()
    with SegmentChain(bundle, 0, 2, runner="ort-cpu") as chain:  # the segments hold the data now
        assert chain.run(tm.example_inputs(model))["y"].shape == (2, 3)


def test_missing_external_data_is_a_model_error(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(tm.residual(channels=32), str(path), save_as_external_data=True,
                    location="weights.bin", size_threshold=256)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelError, match="weights.bin"):
        candidate_cuts(path)


def test_old_ir_with_initializers_as_inputs(tmp_path):
    model = tm.chain()
    model.ir_version = 3
    model.opset_import[0].version = 9
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    path = tmp_path / "old.onnx"
    onnx.save_model(model, str(path))
    bundle = partition(path, ["h1"], tmp_path / "b")
    assert [s.name for s in bundle.inputs] == ["x"]
    check_bundle(bundle, path, tm.example_inputs(model))


def test_shape_option_parsing():
    assert parse_shape_option("input=1x3x224x224") == ("input", (1, 3, 224, 224))
    assert parse_shape_option("x=1,3,N") == ("x", (1, 3, "N"))
    assert parse_shape_option("seq=128") == ("seq", (128,))
    for bad in ("input", "=3", "x=1x-3", "x="):
        with pytest.raises(ConfigError):
            parse_shape_option(bad)
    model = tm.attention()
    with pytest.raises(ConfigError, match="no model input or dim symbol"):
        infer_shapes(model, {"nothing": (1,)})
    with pytest.raises(ConfigError, match="has 2 dims"):
        infer_shapes(model, {"x": (1, 2)})


def test_constant_model_outputs_come_from_the_last_segment(tmp_path):
    model = tm.chain()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32), "const_out"))
    model.graph.node.append(helper.make_node("Constant", [], ["node_out"],
                                             value=onnx.numpy_helper.from_array(np.ones(2, np.float32), "v")))
    model.graph.output.extend([helper.make_tensor_value_info("const_out", onnx.TensorProto.FLOAT, [3]),
                               helper.make_tensor_value_info("node_out", onnx.TensorProto.FLOAT, [2])])
    path = tmp_path / "consts.onnx"
    onnx.save_model(model, str(path))
    bundle = partition(path, [["h1"]], tmp_path / "b")
    assert bundle.segments[-1].outputs == ("y", "const_out", "node_out")
    assert bundle.cut(1).tensors == ("h1",)
    check_bundle(bundle, path, tm.example_inputs(model))
