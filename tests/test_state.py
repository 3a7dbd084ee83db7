"""Stateful bundles: state pairs declared at partition time, each kept by the segment that computes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import builders
from edgesplit.bundle import Bundle
from edgesplit.cli import main
from edgesplit.errors import CutError
from edgesplit.graph import partition
from edgesplit.runtime import SegmentRunner


def _full(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _steps(bundle: Bundle, xs: list[np.ndarray], cut: int) -> list[np.ndarray]:
    """Run a session step by step: segments [0, cut) keep their state here, [cut, n) theirs 'there'."""
    n = bundle.num_segments
    seg = SegmentRunner(bundle, "ort-cpu")
    bound = {"N": xs[0].shape[0]}
    head_state = {st.input: st.initial(bound) for st in bundle.state_of(0, cut)}
    tail_state = {st.input: st.initial(bound) for st in bundle.state_of(cut, n)}
    ys = []
    for x in xs:
        mid, head_state = seg.step({bundle.inputs[0].name: x}, 0, cut, head_state)
        out, tail_state = seg.step(mid, cut, n, tail_state)
        ys.append(out["y"])
    return ys


def test_kv_cache_pairs_are_found_by_name_and_kept_where_computed(tmp_path):
    path = builders.save(builders.kv_cache2(), tmp_path)
    b = partition(path, [["h"]], tmp_path / "b")
    assert {(s.output, s.input, s.segment) for s in b.state} == {("present.0", "past_key_values.0", 0),
                                                               ("present.1", "past_key_values.1", 1)}
    # the caller's feeds and the answers leave the state out, and no state crosses the cut
    assert [t.name for t in b.inputs] == ["x"] and [t.name for t in b.outputs] == ["y"]
    assert b.cut(1).tensors == ("h",)
    assert b.state[0].spec.shape == ("N", "P0", 4)
    assert b.state[0].initial({"N": 3}).shape == (3, 0, 4)  # a past sequence starts empty
    # step by step through the split equals the whole model fed its own state back
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, t, 4)).astype(np.float32) for t in (3, 1, 1, 1)]
    got = _steps(b, xs, 1)
    sess, p0, p1 = _full(path), np.zeros((2, 0, 4), np.float32), np.zeros((2, 0, 4), np.float32)
    for x, y in zip(xs, got):
        want, p0, p1 = sess.run(["y", "present.0", "present.1"], {"x": x, "past_key_values.0": p0,
                                                                   "past_key_values.1": p1})
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert p0.shape == (2, 6, 4)


def test_explicit_state_pairs_from_the_cli(tmp_path, capsys):
    path = builders.save(builders.recurrent2(), tmp_path)
    out = tmp_path / "b"
    assert main(["partition", str(path), "--cut", "a", "--state", "s0.out=s0", "--state", "s1.out=s1",
                 "-o", str(out)]) == 0
    assert "state s1.out -> s1  kept by segment 1" in capsys.readouterr().out
    b = Bundle.load(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["output"], e["input"], e["segment"]) for e in manifest["state"]] == [("s0.out", "s0", 0),
                                                                                 ("s1.out", "s1", 1)]
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((3, 8)).astype(np.float32) for _ in range(5)]
    got = _steps(b, xs, 1)
    sess, s0, s1 = _full(path), np.zeros((3, 8), np.float32), np.zeros((3, 8), np.float32)
    for x, y in zip(xs, got):
        want, s0, s1 = sess.run(["y", "s0.out", "s1.out"], {"x": x, "s0": s0, "s1": s1})
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pair, words", [
    (("nope", "s0"), "'nope' is not a model output"),
    (("s0.out", "nope"), "'nope' is not a model input"),
    (("s0.out", "x2"), "not a model input"),
    (("s1.out", "s0"), "spans segments [0, 1]"),
])
def test_bad_state_pairs_are_refused(tmp_path, pair, words):
    path = builders.save(builders.recurrent2(), tmp_path)
    with pytest.raises(CutError) as err:
        partition(path, [["a"]], tmp_path / "b", state=[pair])
    assert words in str(err.value)
    assert not (tmp_path / "b").exists()


def test_shape_incompatible_pair_is_refused(tmp_path):
    path = builders.save(builders.kv_cache2(), tmp_path)
    with pytest.raises(CutError, match="ranks differ"):
        partition(path, [["h"]], tmp_path / "b", state=[("y", "x")], auto_state=False)
    assert main(["partition", str(path), "--cut", "h", "--state", "y", "-o", str(tmp_path / "c")]) == 1


def test_a_step_without_its_state_is_refused(tmp_path):
    from edgesplit.errors import ConfigError

    path = builders.save(builders.recurrent2(), tmp_path)
    b = partition(path, [["a"]], tmp_path / "b", state=[("s0.out", "s0"), ("s1.out", "s1")])
    with pytest.raises(ConfigError, match="need state"):
        SegmentRunner(b, "ort-cpu").step({"x": np.zeros((1, 8), np.float32)}, 0, 1, {})


def test_the_split_decoder_generates_the_unsplit_tokens(tmp_path):
    """64 greedy tokens through head and tail, each keeping its own half of the KV cache."""
    from test_models_stateful import GREEDY_64, PROMPT

    b = partition(Path(__file__).resolve().parents[1] / "models" / "gpt_decoder.onnx", [["h.2.input"]], tmp_path / "gpt",
                  shapes={"input_ids": [1, 1]})
    assert len(b.state_of(0, 1)) == 4 and len(b.state_of(1, 2)) == 4 and b.cut(1).tensors == ("h.2.input",)
    seg = SegmentRunner(b, "ort-cpu")
    bound = {"batch": 1}
    head = {st.input: st.initial(bound) for st in b.state_of(0, 1)}
    tail = {st.input: st.initial(bound) for st in b.state_of(1, 2)}
    ids, out = np.array(PROMPT, np.int64), []
    for _ in range(64):
        mid, head = seg.step({"input_ids": ids}, 0, 1, head)
        res, tail = seg.step(mid, 1, 2, tail)
        ids = res["logits"][:, -1:].argmax(-1).astype(np.int64)
        out.append(int(ids[0, 0]))
    assert out == list(GREEDY_64)
    assert head["past_key_values.0.key"].shape == (1, 4, len(PROMPT[0]) + 63, 16)


def test_inspect_leaves_state_out_of_the_cuts(tmp_path, capsys):
    path = builders.save(builders.kv_cache2(), tmp_path)
    assert main(["inspect", str(path), "--json", "--shape", "x=1x1x4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {(s["output"], s["input"]) for s in doc["state"]} == {("present.0", "past_key_values.0"),
                                                                ("present.1", "past_key_values.1")}
    crossing = {t for c in doc["cuts"] for t in c["tensors"]}
    assert "h" in crossing and not crossing & {"present.0", "present.1", "past_key_values.0", "past_key_values.1"}
    assert doc["unbound_inputs"] == {}  # a cache's length is no dim the user must bind


def test_a_slowed_device_steps_a_stateful_bundle(tmp_path):
    """edge_slowdown runs segment by segment: state inputs and outputs must survive that path."""
    from edge_agent import AgentConfig, EdgeAgent

    path = builders.save(builders.recurrent2(), tmp_path)
    b = partition(path, [["a"]], tmp_path / "b", state=[("s0.out", "s0"), ("s1.out", "s1")])
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(4)]
    sess, s0, s1 = _full(path), np.zeros((2, 8), np.float32), np.zeros((2, 8), np.float32)
    with EdgeAgent(b, servers=[], cut=1, runner="ort-cpu", codec="raw",
                   config=AgentConfig(edge_slowdown=2.0, connect_timeout_ms=0)) as agent, agent.session() as s:
        for x in xs:
            r = s.step({"x": x})
            want, s0, s1 = sess.run(["y", "s0.out", "s1.out"], {"x": x, "s0": s0, "s1": s1})
            assert r.where == "local"
            np.testing.assert_allclose(r.outputs["y"], want, rtol=1e-5, atol=1e-6)


def test_a_stateful_bundle_asks_for_a_session(tmp_path):
    from edge_agent import AgentConfig, EdgeAgent
    from edgesplit.errors import UserError

    path = builders.save(builders.recurrent2(), tmp_path)
    b = partition(path, [["a"]], tmp_path / "b", state=[("s0.out", "s0"), ("s1.out", "s1")])
    with EdgeAgent(b, servers=[], cut=1, runner="ort-cpu", codec="raw",
                   config=AgentConfig(connect_timeout_ms=0)) as agent:
        with pytest.raises(UserError, match="agent.session"):
            agent.infer({"x": np.zeros((1, 8), np.float32)})
        with pytest.raises(UserError, match="agent.session"):
            agent.submit({"x": np.zeros((1, 8), np.float32)})
        with agent.session() as s:
            assert s.step({"x": np.zeros((1, 8), np.float32)}).where == "local"
