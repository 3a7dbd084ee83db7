"""Runners and SegmentChain on real ONNX Runtime sessions."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgesplit.errors import BackendError, ConfigError
from edgesplit.runtime import OnnxRuntimeRunner, SegmentChain, available_runners, make_runner


def _reference(bundle, x):
    h = ort.InferenceSession(str(bundle.segments[0].path)).run(None, {"x": x})[0]
    return ort.InferenceSession(str(bundle.segments[1].path)).run(None, {"h": h})[0]


def test_chain_matches_segments_run_by_hand(mlp_bundle):
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    with SegmentChain(mlp_bundle, 0, 2, runner="ort-cpu") as full:
        y = full.run({"x": x})["y"]
    np.testing.assert_allclose(y, _reference(mlp_bundle, x), rtol=1e-5, atol=1e-5)


def test_head_then_tail_equals_full(mlp_bundle):
    x = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)
    head = SegmentChain(mlp_bundle, 0, 1)
    tail = SegmentChain(mlp_bundle, 1, 2)
    cut = head.run({"x": x})
    assert set(cut) == {"h"} and cut["h"].shape == (3, 32)
    np.testing.assert_allclose(tail.run(cut)["y"], _reference(mlp_bundle, x), rtol=1e-5, atol=1e-5)
    assert head.runner_name == "ort-cpu"
    # an empty range hands the cut tensors through unchanged
    assert SegmentChain(mlp_bundle, 2, 2).run({"y": cut["h"]})["y"] is cut["h"]


def test_errors_are_clear(mlp_bundle):
    with pytest.raises(ConfigError, match="outside"):
        SegmentChain(mlp_bundle, 1, 3)
    with pytest.raises(ConfigError, match="unknown runner"):
        make_runner(mlp_bundle.segments[0].path, "magic")
    runner = make_runner(mlp_bundle.segments[0].path, "ort-cpu")
    with pytest.raises(BackendError, match="missing input"):
        runner.infer({"nope": np.zeros((1, 16), np.float32)})
    with pytest.raises(BackendError, match="failed"):
        runner.infer({"x": np.zeros((1, 7), np.float32)})  # wrong width
    inactive = OnnxRuntimeRunner(mlp_bundle.segments[0].path)
    with pytest.raises(BackendError, match="not active"):
        inactive.infer({"x": np.zeros((1, 16), np.float32)})


def test_auto_picks_an_available_runner(mlp_bundle):
    assert "ort-cpu" in available_runners()
    runner = make_runner(mlp_bundle.segments[0].path, "auto")
    assert runner.name in available_runners()


@pytest.mark.gpu
def test_cuda_runner_matches_cpu(mlp_bundle):
    if "ort-cuda" not in available_runners():
        pytest.skip("onnxruntime-gpu with CUDAExecutionProvider is not installed")
    x = np.ones((2, 16), np.float32)
    cpu = make_runner(mlp_bundle.segments[0].path, "ort-cpu").infer({"x": x})["h"]
    gpu = make_runner(mlp_bundle.segments[0].path, "ort-cuda").infer({"x": x})["h"]
    np.testing.assert_allclose(cpu, gpu, rtol=1e-4, atol=1e-4)


@pytest.mark.trt
def test_tensorrt_runner_matches_cpu(mlp_bundle, tmp_path):
    if "trt" not in available_runners():
        pytest.skip("tensorrt and cuda-python are not installed (pip install 'edgesplit[trt]')")
    x = np.ones((2, 16), np.float32)
    cpu = make_runner(mlp_bundle.segments[0].path, "ort-cpu").infer({"x": x})["h"]
    trt = make_runner(mlp_bundle.segments[0].path, "trt", cache_dir=tmp_path).infer({"x": x})["h"]
    np.testing.assert_allclose(cpu, trt, rtol=1e-3, atol=1e-3)
    assert list(tmp_path.glob("*.engine")), "the engine was not cached"
