"""The committed stateful models (gpt_decoder.onnx, gru_stack.onnx): their interface, cuts and step-by-step behaviour.

No torch: these read the files models/build_stateful.py made, run them in ONNX Runtime (CPU)
and check that feeding each step's state outputs back gives what one whole-sequence run gives.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

MODELS = Path(__file__).resolve().parent.parent / "models"
GPT = MODELS / "gpt_decoder.onnx"
GRU = MODELS / "gru_stack.onnx"
LAYERS, HEADS, HEAD_DIM, VOCAB = 4, 4, 16, 256

# What the decoder says after PROMPT (b"Hello, edge"), greedy: the edge + cloud split must say the same.
PROMPT = [[72, 101, 108, 108, 111, 44, 32, 101, 100, 103, 101]]
GREEDY_64 = [68, 223, 10, 153, 49, 30, 239, 255, 223, 111, 223, 111, 182, 49, 30, 95, 30, 95, 15, 25, 182, 30,
             76, 108, 30, 95, 15, 25, 30, 95, 30, 95, 85, 25, 224, 186, 76, 255, 223, 111, 223, 111, 223, 111,
             223, 111, 223, 95, 243, 111, 223, 95, 15, 25, 30, 102, 182, 177, 182, 30, 102, 182, 224, 30]


def _build_script():
    """models/build_stateful.py as a module, for its step helpers (importing it builds nothing)."""
    spec = importlib.util.spec_from_file_location("build_stateful", MODELS / "build_stateful.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_script()


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def gpt():
    return _session(GPT)


@pytest.fixture(scope="module")
def gru():
    return _session(GRU)


def _shape(value) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]


def _interface(model: onnx.ModelProto) -> tuple[dict, dict]:
    return ({i.name: _shape(i) for i in model.graph.input}, {o.name: _shape(o) for o in model.graph.output})


def _graph_inputs_above(model: onnx.ModelProto, outputs: list[str], cut: str) -> set[str]:
    """The graph inputs that `outputs` read when `cut` is given: what a tail from `cut` needs besides it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    initializers = {t.name for t in model.graph.initializer}
    seen, stack, needed = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in seen or name == cut or name in initializers or not name:
            continue
        seen.add(name)
        if name in producer:
            stack.extend(producer[name].input)
        else:
            needed.add(name)
    return needed


def test_files_are_small_and_pass_the_checker():
    for path in (GPT, GRU):
        onnx.checker.check_model(str(path), full_check=True)
        assert path.stat().st_size < 2_000_000, path


def test_gpt_interface_follows_the_hugging_face_cache_naming():
    inputs, outputs = _interface(onnx.load(str(GPT)))
    cache_in, cache_out = ["batch", HEADS, "past_seq", HEAD_DIM], ["batch", HEADS, "total_seq", HEAD_DIM]
    assert inputs == {"input_ids": ["batch", "seq"],
                      **{f"past_key_values.{l}.{k}": cache_in for l in range(LAYERS) for k in ("key", "value")}}
    assert outputs == {"logits": ["batch", "seq", VOCAB],
                       **{f"present.{l}.{k}": cache_out for l in range(LAYERS) for k in ("key", "value")}}


def test_gpt_cut_h2_input_leaves_the_tail_only_its_own_caches():
    model = onnx.load(str(GPT))
    (stream,) = [v for v in model.graph.value_info if v.name == "h.2.input"]
    assert _shape(stream) == ["batch", "seq", 64]
    tail_outputs = ["logits"] + [f"present.{l}.{k}" for l in (2, 3) for k in ("key", "value")]
    assert _graph_inputs_above(model, tail_outputs, "h.2.input") == {
        f"past_key_values.{l}.{k}" for l in (2, 3) for k in ("key", "value")}


def test_gpt_incremental_decoding_equals_one_pass(gpt):
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int64)
    full, full_cache = build.gpt_step(gpt, ids, build.empty_past(2))
    for prompt in (1, 4):
        logits, cache = build.gpt_step(gpt, ids[:, :prompt], build.empty_past(2))
        steps = [logits]
        for t in range(prompt, ids.shape[1]):
            logits, cache = build.gpt_step(gpt, ids[:, t:t + 1], cache)
            steps.append(logits)
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)
        assert cache.keys() == full_cache.keys()
        for name, value in cache.items():
            assert value.shape == (2, HEADS, 12, HEAD_DIM)
            np.testing.assert_allclose(value, full_cache[name], atol=1e-4, rtol=0)


def test_gpt_greedy_64_tokens_are_deterministic_and_need_no_recompute(gpt):
    first = build.greedy(gpt, PROMPT, 64)
    assert first[0].tolist() == GREEDY_64
    assert np.array_equal(build.greedy(_session(GPT), PROMPT, 64), first)
    assert np.array_equal(build.greedy(gpt, PROMPT, 64, cache=False), first)


def test_gru_interface_and_state_pairs():
    model = onnx.load(str(GRU))
    inputs, outputs = _interface(model)
    assert inputs == {"x": ["seq", "batch", 16], "h0.0": [1, "batch", 32], "h0.1": [1, "batch", 32]}
    assert outputs == {"y": ["seq", "batch", 32], "hn.0": [1, "batch", 32], "hn.1": [1, "batch", 32]}
    assert [(n.op_type, {a.name: a.i for a in n.attribute if a.name in ("layout", "linear_before_reset")})
            for n in model.graph.node if n.op_type == "GRU"] == [("GRU", {"linear_before_reset": 1})] * 2
    # State on both sides of the cut: the tail needs h0.1 only.
    assert _graph_inputs_above(model, ["y", "hn.1"], "gru.0.y") == {"h0.1"}


def test_gru_stepping_with_the_state_equals_one_pass(gru):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 3, 16)).astype(np.float32)
    zeros = [np.zeros((1, 3, 32), np.float32)] * 2
    y, hn0, hn1 = gru.run(["y", "hn.0", "hn.1"], {"x": x, "h0.0": zeros[0], "h0.1": zeros[1]})
    step_y, step_hn = build.gru_steps(gru, x, zeros)
    np.testing.assert_allclose(step_y, y, atol=1e-5, rtol=0)
    np.testing.assert_allclose(step_hn[0], hn0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(step_hn[1], hn1, atol=1e-5, rtol=0)
    # Uneven chunks carry the state too, and the last output step is the top layer's state.
    y_a, *h = gru.run(["y", "hn.0", "hn.1"], {"x": x[:5], "h0.0": zeros[0], "h0.1": zeros[1]})
    y_b, *h = gru.run(["y", "hn.0", "hn.1"], {"x": x[5:], "h0.0": h[0], "h0.1": h[1]})
    np.testing.assert_allclose(np.concatenate([y_a, y_b]), y, atol=1e-5, rtol=0)
    np.testing.assert_allclose(y[-1:], hn1, atol=0, rtol=0)


def test_committed_files_are_what_the_script_builds():
    done = subprocess.run([sys.executable, str(MODELS / "build_stateful.py"), "--check"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{GREEDY_64}" in done.stdout
