"""The committed models load, pass the ONNX checker, run in ONNX Runtime and say sensible things.

No torch needed: these read the files under models/ that the build scripts made.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

MODELS = Path(__file__).resolve().parent.parent / "models"
# What the demo needs ships inside the wheel, as edge_agent package data.
DEMO_DATA = MODELS.parent / "edge_agent" / "demo_data"
EFFICIENTNET = DEMO_DATA / "efficientnet_lite0.onnx"
ZOO_INDEX = json.loads((MODELS / "zoo" / "zoo.json").read_text())
LABELS = (DEMO_DATA / "imagenet_classes.txt").read_text().splitlines()
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat", "lynx", "cougar"}


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _shape(value) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]


def _readme_preprocess():
    """The preprocess() function exactly as models/README.md documents it."""
    text = (MODELS / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (code,) = [b for b in blocks if "def preprocess(" in b]
    namespace: dict = {}
    exec(compile(code, "models/README.md", "exec"), namespace)  # noqa: S102 - our own doc
    return namespace["preprocess"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def effnet():
    return _session(EFFICIENTNET)


@pytest.fixture(scope="module")
def photo_probs(effnet):
    pytest.importorskip("PIL")
    preprocess = _readme_preprocess()
    photos = sorted((DEMO_DATA / "photos").glob("*.jpg"))
    batch = np.concatenate([preprocess(p) for p in photos])
    (logits,) = effnet.run(["logits"], {"input": batch})
    return {p.stem: _softmax(row) for p, row in zip(photos, logits, strict=True)}


def _top(probs: np.ndarray, k: int) -> list[str]:
    return [LABELS[i] for i in np.argsort(-probs)[:k]]


def test_efficientnet_passes_checker_and_has_documented_interface():
    onnx.checker.check_model(str(EFFICIENTNET), full_check=True)
    model = onnx.load(str(EFFICIENTNET))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _shape(model.graph.input[0]) == ["N", 3, 224, 224]
    assert _shape(model.graph.output[0]) == ["N", 1000]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {p.key: p.value for p in model.metadata_props}["license"] == "Apache-2.0"
    assert any(o.domain in ("", "ai.onnx") and o.version == 17 for o in model.opset_import)
    # Real weights, not a stub: ~4.6 M parameters.
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 4.4e6 < params < 4.8e6


def test_efficientnet_batch_equals_single_runs(effnet):
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    (batched,) = effnet.run(["logits"], {"input": x})
    assert batched.shape == (3, 1000)
    singles = np.concatenate([effnet.run(["logits"], {"input": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(batched, singles, atol=1e-4, rtol=0)
    assert np.abs(batched[0] - batched[1]).max() > 0.1  # different inputs, different answers


def test_imagenet_classes_are_in_index_order():
    assert len(LABELS) == 1000
    assert len(set(LABELS)) == 1000
    assert (LABELS[0], LABELS[281], LABELS[285], LABELS[967], LABELS[999]) == (
        "tench", "tabby", "Egyptian cat", "espresso", "toilet tissue")


def test_efficientnet_recognises_the_cat(photo_probs):
    probs = photo_probs["chelsea_cat"]
    assert _top(probs, 1)[0] in CATS
    assert set(_top(probs, 5)) & CATS
    cat_mass = sum(probs[LABELS.index(c)] for c in CATS)
    assert cat_mass > 0.6, cat_mass


def test_efficientnet_recognises_espresso_temple_and_rocket(photo_probs):
    assert _top(photo_probs["coffee"], 1) == ["espresso"]
    assert photo_probs["coffee"][LABELS.index("espresso")] > 0.5
    assert _top(photo_probs["china_temple"], 1)[0] in {"palace", "bell cote", "monastery", "stupa",
                                                        "church", "mosque"}
    assert set(_top(photo_probs["rocket"], 5)) & {"missile", "projectile", "space shuttle"}
    # And the photos are told apart: no two of them share a top-1 label.
    top1 = [_top(p, 1)[0] for p in photo_probs.values()]
    assert len(set(top1)) == len(top1), top1


def test_efficientnet_needs_the_documented_normalisation(effnet):
    """Raw 0..255 pixels (no normalisation) lose the cat: the README's recipe matters."""
    pytest.importorskip("PIL")
    x = _readme_preprocess()(DEMO_DATA / "photos" / "chelsea_cat.jpg")
    raw = x * 128.0 + 127.0
    (logits,) = effnet.run(["logits"], {"input": raw})
    assert _top(_softmax(logits[0]), 1)[0] not in CATS


def test_photo_licenses_cover_every_photo():
    readme = (DEMO_DATA / "photos" / "README.md").read_text()
    photos = sorted((DEMO_DATA / "photos").glob("*.jpg"))
    assert 5 <= len(photos) <= 8
    for photo in photos:
        assert f"| {photo.name} |" in readme, photo.name
        assert photo.stat().st_size < 60_000


# ---------------------------------------------------------------- the zoo


def _zoo_inputs(entry: dict, rng: np.random.Generator, shape_override=None) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in entry["inputs"]:
        shape = tuple(shape_override or spec["check_shape"]) if spec["dtype"] == "float32" else tuple(
            spec["check_shape"])
        if spec["name"] == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            mask[-1, shape[1] // 2:] = 0
            feeds[spec["name"]] = mask
        elif spec["dtype"] == "int64":
            feeds[spec["name"]] = rng.integers(1, 1000, size=shape).astype(np.int64)
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _check_dims(onnx_shape: list, actual: tuple, bound: dict) -> None:
    """Fixed dims equal; a symbolic dim takes one value everywhere it appears."""
    assert len(onnx_shape) == len(actual), (onnx_shape, actual)
    for want, got in zip(onnx_shape, actual, strict=True):
        if isinstance(want, str):
            assert bound.setdefault(want, got) == got, (want, bound[want], got)
        else:
            assert want == got, (onnx_shape, actual)


@pytest.mark.parametrize("name", sorted(ZOO_INDEX))
def test_zoo_model_checks_and_runs_with_documented_shapes(name):
    entry = ZOO_INDEX[name]
    path = MODELS / "zoo" / entry["file"]
    data_bytes = sum((path.parent / f).stat().st_size for f in entry["external_data"])
    assert path.stat().st_size + data_bytes < 1_000_000
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [i["name"] for i in entry["inputs"]]
    assert [o.name for o in model.graph.output] == [o["name"] for o in entry["outputs"]]
    assert [_shape(i) for i in model.graph.input] == [i["onnx_shape"] for i in entry["inputs"]]
    feeds = _zoo_inputs(entry, np.random.default_rng(0))
    outputs = _session(path).run(None, feeds)
    bound: dict = {}
    for spec, array in zip(entry["inputs"], feeds.values(), strict=True):
        _check_dims(spec["onnx_shape"], array.shape, bound)
    for spec, array in zip(entry["outputs"], outputs, strict=True):
        if not (set(map(str, spec["onnx_shape"])) & {"A"}):
            _check_dims(spec["onnx_shape"], array.shape, bound)
        assert np.isfinite(array).all(), spec["name"]
    # The output depends on the input (random weights that wash the input out would
    # make split-verification tests on these models meaningless).
    other = _session(path).run(None, _zoo_inputs(entry, np.random.default_rng(1)))
    scale = float(np.abs(outputs[0]).max())
    assert np.abs(other[0] - outputs[0]).max() > 0.01 * scale, name


def test_zoo_transformer_ignores_padded_tokens():
    """The padding mask reaches the attention: changing padded ids leaves the real rows alone."""
    entry = ZOO_INDEX["transformer_encoder"]
    session = _session(MODELS / "zoo" / entry["file"])
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 1000, size=(2, 13)).astype(np.int64)
    mask = np.ones((2, 13), dtype=np.int64)
    mask[1, 6:] = 0
    logits, hidden = session.run(["logits", "hidden_states"], {"input_ids": ids, "attention_mask": mask})
    ids2 = ids.copy()
    ids2[1, 6:] = rng.integers(1, 1000, size=7)
    logits2, hidden2 = session.run(["logits", "hidden_states"], {"input_ids": ids2, "attention_mask": mask})
    np.testing.assert_allclose(logits2, logits, atol=1e-5)
    np.testing.assert_allclose(hidden2[1, :6], hidden[1, :6], atol=1e-5)
    # ...while changing a real token does change the answer.
    ids3 = ids.copy()
    ids3[1, 2] = (ids3[1, 2] % 999) + 1
    (logits3,) = session.run(["logits"], {"input_ids": ids3, "attention_mask": mask})
    assert np.abs(logits3[1] - logits[1]).max() > 1e-4


def test_zoo_detector_takes_any_size():
    entry = ZOO_INDEX["detector"]
    session = _session(MODELS / "zoo" / entry["file"])
    for h, w in [(64, 64), (96, 224), (100, 150)]:
        image = np.random.default_rng(h).standard_normal((1, 3, h, w)).astype(np.float32)
        scores, boxes = session.run(["scores", "boxes"], {"image": image})
        assert scores.shape[2] == 5 and boxes.shape[2] == 4
        assert scores.shape[1] == boxes.shape[1]
        if h % 32 == 0 and w % 32 == 0:
            assert scores.shape[1] == 3 * (h * w // 64 + h * w // 256 + h * w // 1024)
        assert ((scores >= 0) & (scores <= 1)).all()


def test_zoo_external_data_lives_beside_the_model():
    entry = ZOO_INDEX["mlp_external"]
    path = MODELS / "zoo" / entry["file"]
    (data,) = entry["external_data"]
    assert (path.parent / data).stat().st_size > 100 * path.stat().st_size
    skeleton = onnx.load(str(path), load_external_data=False)
    assert skeleton.graph.initializer
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)


# ---------------------------------------------------------------- benchmark models


def _activation_bytes(path: Path) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    sizes = {}
    for value in inferred.graph.value_info:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        sizes[value.name] = int(np.prod(dims)) * 4
    return sizes


@pytest.mark.parametrize("name", ["resnet_branching", "vit_mini"])
def test_benchmark_model_runs(name):
    path = MODELS / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert _shape(model.graph.input[0]) == ["N", 3, 224, 224]
    assert _shape(model.graph.output[0]) == ["N", 1000]
    x = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (logits,) = _session(path).run(["logits"], {"input": x})
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    # Input-dependent (BatchNorm statistics calibrated, so random weights don't wash it out).
    assert np.abs(logits[0] - logits[1]).max() > 0.05 * np.abs(logits).max()
    assert 1e6 < path.stat().st_size < 20e6


def test_resnet_branching_activations_grow_then_shrink():
    """As documented: mid-level tensors 8x the input, a late bottleneck under 1/40 of it."""
    sizes = _activation_bytes(MODELS / "resnet_branching.onnx")
    input_bytes = 3 * 224 * 224 * 4
    assert max(sizes.values()) >= 8 * input_bytes
    assert sizes["/squeeze/squeeze.0/Conv_output_0"] * 40 < input_bytes
    nodes = onnx.load(str(MODELS / "resnet_branching.onnx")).graph.node
    assert sum(n.op_type == "Concat" for n in nodes) >= 3  # the Inception-style branches
