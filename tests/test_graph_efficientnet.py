"""The partitioner on the committed EfficientNet-Lite0 (edge_agent/demo_data/efficientnet_lite0.onnx)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgesplit.graph import candidate_cuts, partition
from edgesplit.runtime import OnnxRuntimeRunner

MODEL = Path(__file__).resolve().parent.parent / "edge_agent" / "demo_data" / "efficientnet_lite0.onnx"
pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason="edge_agent/demo_data/efficientnet_lite0.onnx not built")


@pytest.fixture(scope="module")
def cuts():
    return candidate_cuts(MODEL)


@pytest.fixture(scope="module")
def chain_bundle(cuts, tmp_path_factory):
    return partition(MODEL, [c.tensors for c in cuts], tmp_path_factory.mktemp("lite0") / "all")


def test_candidate_cuts_are_the_block_boundaries(cuts):
    every = candidate_cuts(MODEL, narrow=False)
    assert 8 <= len(cuts) <= 40 < len(every)
    assert all(len(c.tensors) == 1 and c.exact for c in cuts)
    assert cuts[-1].specs[0].shape == ("N", 1280)  # the pooled features before the classifier
    assert min(c.bytes_per_sample for c in cuts) == 1280 * 4
    heads = [c.head_nodes for c in cuts]
    assert heads == sorted(heads) and len(set(heads)) == len(heads)


def test_every_candidate_cut_reproduces_the_model(chain_bundle, cuts):
    """One bundle cut at every candidate cut; splitting at each cut k (shipping only the cut's
    tensors) gives the original logits."""
    bundle = chain_bundle
    assert bundle.num_segments == len(cuts) + 1
    for seg in bundle.segments:
        onnx.checker.check_model(str(seg.path), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with OnnxRuntimeRunner(MODEL) as r:
        ref = r.infer({"input": x})["logits"]
    runners = [OnnxRuntimeRunner(s.path).activate() for s in bundle.segments]
    env = {"input": x}
    scale = float(np.abs(ref).max())
    for k in range(bundle.num_segments):
        cut = bundle.cut(k)
        out = {t: env[t] for t in cut.tensors}
        assert [tuple(out[s.name].shape[1:]) for s in cut.specs] == [s.shape[1:] for s in cut.specs]
        for i in range(k, bundle.num_segments):
            out.update(runners[i].infer(out))
        err = float(np.abs(out["logits"] - ref).max())
        assert err <= 1e-4 * scale, f"cut {k}: max abs err {err}"
        env.update(runners[k].infer(env))
    for r in runners:
        r.deactivate()


def test_five_cuts_store_weights_once(cuts, tmp_path):
    picked = [cuts[i].tensors for i in np.linspace(0, len(cuts) - 1, 5).astype(int)]
    bundle = partition(MODEL, picked, tmp_path / "five")
    assert bundle.num_segments == 6
    total = sum(s.path.stat().st_size for s in bundle.segments)
    original = MODEL.stat().st_size
    assert abs(total - original) <= 0.05 * original, (total, original)
