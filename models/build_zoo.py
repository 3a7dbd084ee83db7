"""Builds models/zoo/*.onnx: small third-party-style graphs for the partitioner and planner.

Each model is a common PyTorch building block exported as a user would export it
(``torch.onnx.export``, TorchScript exporter, opset 17, constant folding), with
random weights from a fixed seed, and kept under 1 MB. They are not trained:
they exist so that cut enumeration, partitioning and planning meet the graph
shapes real models have (attention with a padding mask, LSTM, Inception branches,
squeeze-excite, channel shuffle, FPN with dynamic H and W, external data).

The script writes models/zoo/zoo.json, which lists every file with its inputs
(dtype and the concrete shape used for checks; dynamic dims are named in the
ONNX file), its outputs and what it is. For each model it checks
``onnx.checker`` (full_check) and ONNX Runtime against torch on inputs whose
dynamic dims differ from the ones used for the export.

Usage (needs torch, onnx and onnxruntime; not needed at run time):
    python models/build_zoo.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from export import calibrate_bn, max_rel_error

HERE = Path(__file__).resolve().parent
ZOO = HERE / "zoo"
OPSET = 17
DYNAMO_OPSET = 18  # the torch.export-based exporter writes opset 18 and up
SEED = 0
TOLERANCE = 1e-4


@dataclass
class ZooModel:
    """One model to export: the module, its inputs and how to check it."""

    name: str
    description: str
    module: object
    example: dict[str, np.ndarray]  # inputs used for the export
    check: dict[str, np.ndarray]  # inputs with other dynamic sizes, for the check
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    path: str = ""  # relative to models/zoo; default NAME.onnx
    external_data: bool = False
    fixed_output_dims: dict[str, tuple] = field(default_factory=dict)  # e.g. {"y": (None, 5)}
    exporter: str = "torchscript"  # or "dynamo" (torch.export based, opset 18)
    notes: list[str] = field(default_factory=list)


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------- the models


def transformer_encoder() -> ZooModel:
    """nn.TransformerEncoder over token ids with a BERT-style attention mask."""
    torch = _torch()
    nn = torch.nn

    class TextEncoder(nn.Module):
        def __init__(self, vocab=1000, d_model=64, heads=4, layers=2, classes=4):
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.position = nn.Parameter(torch.randn(1, 128, d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=128,
                                               dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d_model, classes)

        def forward(self, input_ids, attention_mask):
            # attention_mask: 1 = real token, 0 = padding (the Hugging Face convention).
            x = self.embed(input_ids) + self.position[:, : input_ids.shape[1]]
            hidden = self.encoder(x, src_key_padding_mask=attention_mask == 0)
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return self.head(pooled), hidden

    def inputs(batch, seq, rng):
        ids = rng.integers(1, 1000, size=(batch, seq)).astype(np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        for b in range(batch):  # right padding, a different length per row
            mask[b, max(1, seq - 3 * b):] = 0
        ids[mask == 0] = 0
        return {"input_ids": ids, "attention_mask": mask}

    rng = np.random.default_rng(SEED)
    return ZooModel(
        name="transformer_encoder",
        description="nn.TransformerEncoder (2 layers, d_model 64, 4 heads) over token ids, "
                    "with a padding mask input and masked mean pooling; two outputs",
        module=TextEncoder(),
        example=inputs(2, 16, rng), check=inputs(3, 11, rng),
        output_names=["logits", "hidden_states"],
        dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"},
                      "logits": {0: "N"}, "hidden_states": {0: "N", 1: "T"}},
        # The TorchScript exporter bakes the export-time sequence length into
        # nn.MultiheadAttention's reshapes (ONNX Runtime then fails on any other T);
        # the torch.export-based exporter keeps T symbolic.
        exporter="dynamo",
        notes=["attention_mask is int64, 1 = token, 0 = padding; 2 <= T <= 128",
               "exported with torch.onnx.export(dynamo=True), opset 18: the TorchScript "
               "exporter fixes T at its export value"],
    )


def lstm() -> ZooModel:
    """A two-layer LSTM tagger that also returns its final states."""
    torch = _torch()
    nn = torch.nn

    class LSTMTagger(nn.Module):
        def __init__(self, features=32, hidden=64, tags=8):
            super().__init__()
            self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
            self.head = nn.Linear(hidden, tags)

        def forward(self, features):
            out, (h_n, c_n) = self.lstm(features)
            return self.head(out), h_n, c_n

    rng = np.random.default_rng(SEED + 1)
    return ZooModel(
        name="lstm",
        description="2-layer nn.LSTM (32 -> 64, batch_first) and a per-step linear head; "
                    "returns per-step tags and the final h and c states",
        module=LSTMTagger(),
        example={"features": rng.standard_normal((2, 20, 32)).astype(np.float32)},
        check={"features": rng.standard_normal((3, 7, 32)).astype(np.float32)},
        output_names=["tags", "h_n", "c_n"],
        dynamic_axes={"features": {0: "N", 1: "T"}, "tags": {0: "N", 1: "T"},
                      "h_n": {1: "N"}, "c_n": {1: "N"}},
    )


def _conv_bn_relu(nn, cin, cout, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _randomize_bn(torch, module):
    """Marks the module for BatchNorm calibration in export_model (see _calibrate_bn)."""
    module._calibrate_bn = True


def _calibrate_bn(module, example: dict[str, np.ndarray]) -> None:
    """BatchNorm statistics from smooth random images shaped like the export example (the CNNs
    here take one image): noise at a quarter of its size, 4 batches of 8."""
    (name,) = example
    _, c, h, w = example[name].shape
    calibrate_bn(module, (c, h, w), (h // 4, w // 4), batches=4, seed=SEED)


def inception_net() -> ZooModel:
    """Two Inception-v1-style blocks: four parallel branches concatenated."""
    torch = _torch()
    nn = torch.nn

    class Inception(nn.Module):
        def __init__(self, cin, c1, c3r, c3, c5r, c5, pool):
            super().__init__()
            self.branch1 = _conv_bn_relu(nn, cin, c1, 1)
            self.branch3 = nn.Sequential(_conv_bn_relu(nn, cin, c3r, 1), _conv_bn_relu(nn, c3r, c3))
            self.branch5 = nn.Sequential(_conv_bn_relu(nn, cin, c5r, 1), _conv_bn_relu(nn, c5r, c5),
                                         _conv_bn_relu(nn, c5, c5))
            self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn_relu(nn, cin, pool, 1))

        def forward(self, x):
            return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x),
                              self.branch_pool(x)], 1)

    class InceptionNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(_conv_bn_relu(nn, 3, 32, 3, 2), nn.MaxPool2d(3, 2, 1))
            self.block1 = Inception(32, 16, 24, 32, 8, 16, 16)   # -> 80 channels
            self.block2 = Inception(80, 32, 32, 48, 12, 24, 24)  # -> 128 channels
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(128, 10)

        def forward(self, image):
            x = self.block2(nn.functional.max_pool2d(self.block1(self.stem(image)), 2))
            return self.fc(torch.flatten(self.pool(x), 1))

    module = InceptionNet()
    _randomize_bn(torch, module)
    rng = np.random.default_rng(SEED + 2)
    image = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    return ZooModel(
        name="inception_net",
        description="stem + two Inception-v1-style blocks (1x1 / 3x3 / double-3x3 / "
                    "maxpool-proj branches, concatenated) + classifier, 64x64 input",
        module=module,
        example={"image": image},
        check={"image": rng.standard_normal((3, 3, 64, 64)).astype(np.float32)},
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )


def se_net() -> ZooModel:
    """Residual blocks with squeeze-and-excitation (MobileNetV3 / SENet style)."""
    torch = _torch()
    nn = torch.nn

    class SqueezeExcite(nn.Module):
        def __init__(self, channels, reduction=4):
            super().__init__()
            self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
            self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

        def forward(self, x):
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
            return x * s

    class SEBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = _conv_bn_relu(nn, cin, cout, 3, stride)
            self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.se = SqueezeExcite(cout)
            self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                             nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout)))

        def forward(self, x):
            return torch.relu(self.se(self.conv2(self.conv1(x))) + self.shortcut(x))

    class SENet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = _conv_bn_relu(nn, 3, 24, 3, 2)
            self.blocks = nn.Sequential(SEBlock(24, 24, 1), SEBlock(24, 48, 2), SEBlock(48, 48, 1),
                                        SEBlock(48, 64, 2))
            self.fc = nn.Linear(64, 10)

        def forward(self, image):
            x = self.blocks(self.stem(image))
            return self.fc(x.mean((2, 3)))

    module = SENet()
    _randomize_bn(torch, module)
    rng = np.random.default_rng(SEED + 3)
    return ZooModel(
        name="se_net",
        description="residual blocks with squeeze-and-excitation (global pool -> 1x1 -> "
                    "ReLU -> 1x1 -> sigmoid -> channel multiply), projection shortcuts, 64x64 input",
        module=module,
        example={"image": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)},
        check={"image": rng.standard_normal((2, 3, 64, 64)).astype(np.float32)},
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )


def shufflenet_blocks() -> ZooModel:
    """ShuffleNet-v2 units: channel split, two branches, concat, channel shuffle."""
    torch = _torch()
    nn = torch.nn

    def channel_shuffle(x, groups: int):
        n, c, h, w = x.shape
        x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
        return x.view(n, c, h, w)

    class ShuffleUnit(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.stride = stride
            branch = cout // 2
            if stride > 1:
                self.branch1 = nn.Sequential(
                    nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                    nn.Conv2d(cin, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
            else:
                self.branch1 = nn.Identity()
            cin2 = cin if stride > 1 else branch
            self.branch2 = nn.Sequential(
                nn.Conv2d(cin2, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
                nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False), nn.BatchNorm2d(branch),
                nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))

        def forward(self, x):
            if self.stride == 1:
                a, b = x.chunk(2, dim=1)
                out = torch.cat((a, self.branch2(b)), 1)
            else:
                out = torch.cat((self.branch1(x), self.branch2(x)), 1)
            return channel_shuffle(out, 2)

    class ShuffleNetBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(_conv_bn_relu(nn, 3, 24, 3, 2), nn.MaxPool2d(3, 2, 1))
            self.stage = nn.Sequential(ShuffleUnit(24, 64, 2), ShuffleUnit(64, 64, 1),
                                       ShuffleUnit(64, 64, 1), ShuffleUnit(64, 128, 2),
                                       ShuffleUnit(128, 128, 1))
            self.fc = nn.Linear(128, 10)

        def forward(self, image):
            return self.fc(self.stage(self.stem(image)).mean((2, 3)))

    module = ShuffleNetBlocks()
    _randomize_bn(torch, module)
    rng = np.random.default_rng(SEED + 4)
    return ZooModel(
        name="shufflenet_blocks",
        description="ShuffleNet-v2 units (channel split with Split, depthwise convs, concat, "
                    "channel shuffle as Reshape-Transpose-Reshape), 64x64 input",
        module=module,
        example={"image": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)},
        check={"image": rng.standard_normal((2, 3, 64, 64)).astype(np.float32)},
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )


def detector() -> ZooModel:
    """A one-stage detector: conv backbone, FPN (upsample to the lateral's size), shared heads."""
    torch = _torch()
    nn = torch.nn
    F = nn.functional

    class TinyDetector(nn.Module):
        def __init__(self, anchors=3, classes=5, width=32):
            super().__init__()
            self.c2 = nn.Sequential(_conv_bn_relu(nn, 3, 16, 3, 2), _conv_bn_relu(nn, 16, 24, 3, 2))
            self.c3 = _conv_bn_relu(nn, 24, 32, 3, 2)   # stride 8
            self.c4 = _conv_bn_relu(nn, 32, 48, 3, 2)   # stride 16
            self.c5 = _conv_bn_relu(nn, 48, 64, 3, 2)   # stride 32
            self.lat3, self.lat4, self.lat5 = (nn.Conv2d(c, width, 1) for c in (32, 48, 64))
            self.smooth = nn.Conv2d(width, width, 3, 1, 1)
            self.cls_head = nn.Conv2d(width, anchors * classes, 3, 1, 1)
            self.box_head = nn.Conv2d(width, anchors * 4, 3, 1, 1)
            self.classes = classes

        def forward(self, image):
            c3 = self.c3(self.c2(image))
            c4 = self.c4(c3)
            c5 = self.c5(c4)
            p5 = self.lat5(c5)
            p4 = self.lat4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
            p3 = self.lat3(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
            scores, boxes = [], []
            for p in (p3, p4, p5):
                p = torch.relu(self.smooth(p))
                n = p.shape[0]
                scores.append(self.cls_head(p).permute(0, 2, 3, 1).reshape(n, -1, self.classes))
                boxes.append(self.box_head(p).permute(0, 2, 3, 1).reshape(n, -1, 4))
            return torch.sigmoid(torch.cat(scores, 1)), torch.cat(boxes, 1)

    module = TinyDetector()
    _randomize_bn(torch, module)
    rng = np.random.default_rng(SEED + 5)
    return ZooModel(
        name="detector",
        description="one-stage detector: strided conv backbone, 3-level FPN (nearest upsample "
                    "to the lateral's own size, read with Shape at run time), shared class and box "
                    "heads flattened over anchors; dynamic N, H and W (multiples of 32 are safest)",
        module=module,
        example={"image": rng.standard_normal((1, 3, 128, 160)).astype(np.float32)},
        check={"image": rng.standard_normal((2, 3, 96, 224)).astype(np.float32)},
        output_names=["scores", "boxes"],
        dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}, "scores": {0: "N", 1: "A"},
                      "boxes": {0: "N", 1: "A"}},
        fixed_output_dims={"scores": (None, None, 5), "boxes": (None, None, 4)},
        notes=["A = 3 * (H/8 * W/8 + H/16 * W/16 + H/32 * W/32) anchors"],
    )


def mlp_external() -> ZooModel:
    """An MLP whose weights live in an external data file beside the model."""
    torch = _torch()
    nn = torch.nn

    module = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                           nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = module

        def forward(self, features):
            return self.layers(features)

    rng = np.random.default_rng(SEED + 6)
    return ZooModel(
        name="mlp_external",
        description="4-layer GELU MLP (128 -> 256 -> 256 -> 256 -> 10) saved with "
                    "external data: every initializer in mlp_external.onnx.data",
        module=MLP(),
        example={"features": rng.standard_normal((2, 128)).astype(np.float32)},
        check={"features": rng.standard_normal((5, 128)).astype(np.float32)},
        output_names=["logits"],
        dynamic_axes={"features": {0: "N"}, "logits": {0: "N"}},
        path="external/mlp_external.onnx",
        external_data=True,
        notes=["load by path (onnx.load(path) or onnxruntime.InferenceSession(path)) so the "
               "data file is found"],
    )


BUILDERS: dict[str, Callable[[], ZooModel]] = {
    "transformer_encoder": transformer_encoder,
    "lstm": lstm,
    "inception_net": inception_net,
    "se_net": se_net,
    "shufflenet_blocks": shufflenet_blocks,
    "detector": detector,
    "mlp_external": mlp_external,
}


# ---------------------------------------------------------------- export and check


def export_model(spec: ZooModel, out: Path) -> dict:
    """Exports one model to ``out``, checks it and returns its zoo.json entry."""
    import onnx
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    module = spec.module.eval()
    if getattr(module, "_calibrate_bn", False):
        _calibrate_bn(module, spec.example)
    names = list(spec.example)
    example = tuple(torch.from_numpy(spec.example[n]) for n in names)
    if spec.exporter == "dynamo":
        dims: dict[str, object] = {}
        dynamic_shapes = {
            n: {axis: dims.setdefault(dim, torch.export.Dim(dim, min=2 if dim == "T" else 1,
                                                           max=128 if dim == "T" else 4096))
                for axis, dim in spec.dynamic_axes.get(n, {}).items()}
            for n in names}
        torch.onnx.export(module, example, str(out), input_names=names,
                          output_names=spec.output_names, dynamic_shapes=dynamic_shapes,
                          opset_version=DYNAMO_OPSET, dynamo=True, optimize=True, verbose=False)
    else:
        # Not under torch.no_grad(): with grad off, nn.TransformerEncoderLayer takes its
        # fused fast path (aten::_transformer_encoder_layer_fwd), which has no ONNX export.
        torch.onnx.export(module, example, str(out), input_names=names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(out))  # loads any external data the exporter wrote, too
    for stale in out.parent.glob(out.name + ".data"):
        stale.unlink()
    for value in proto.graph.output:  # sizes the exporter left symbolic but torch knows
        for dim, size in zip(value.type.tensor_type.shape.dim, spec.fixed_output_dims.get(value.name, ())):
            if size is not None:
                dim.Clear()
                dim.dim_value = size
    proto.graph.name = spec.name
    proto.doc_string = spec.description
    onnx.helper.set_model_props(proto, {"source": "edgesplit models/build_zoo.py",
                                        "weights": f"random, torch.manual_seed({SEED})"})
    if spec.external_data:
        data = out.name + ".data"
        (out.parent / data).unlink(missing_ok=True)
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=0)
    else:
        onnx.save(proto, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    err = _compare(out, module, spec)
    return {
        "file": str(out.relative_to(ZOO)),
        "description": spec.description,
        "inputs": [{"name": n, "dtype": str(a.dtype), "check_shape": list(a.shape),
                    "onnx_shape": _onnx_shape(proto, n, "input")} for n, a in spec.check.items()],
        "outputs": [{"name": n, "onnx_shape": _onnx_shape(proto, n, "output")}
                    for n in spec.output_names],
        "external_data": [out.name + ".data"] if spec.external_data else [],
        "exporter": spec.exporter,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": len(proto.graph.node),
        "op_types": sorted({node.op_type for node in proto.graph.node}),
        "max_rel_error_vs_torch": float(f"{err:.3g}"),
        "notes": spec.notes,
    }


def _onnx_shape(proto, name: str, kind: str) -> list:
    values = proto.graph.input if kind == "input" else proto.graph.output
    (value,) = [v for v in values if v.name == name]
    return [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]


def _compare(path: Path, module, spec: ZooModel) -> float:
    """Max abs difference between ONNX Runtime and torch on the check inputs."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(spec.output_names, spec.check)
    # torch.no_grad() on purpose: a transformer then runs its fused fast path, a second
    # implementation to compare the exported (unfused) graph with.
    with torch.no_grad():
        expected = module(*(torch.from_numpy(spec.check[n]) for n in spec.example))
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    expected = [e.to_padded_tensor(0.0) if e.is_nested else e for e in expected]
    worst = 0.0
    for name, g, e in zip(spec.output_names, got, expected):
        e = e.numpy()
        if g.shape != e.shape:
            raise SystemExit(f"{spec.name}: output {name} has shape {g.shape}, torch gives {e.shape}")
        worst = max(worst, max_rel_error(g, e))
    if worst > TOLERANCE:
        raise SystemExit(f"{spec.name}: ONNX Runtime differs from torch by {worst:.2e}")
    return worst


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BUILDERS), help="build only these")
    args = parser.parse_args(argv)
    index_path = ZOO / "zoo.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for name in args.only or list(BUILDERS):
        torch.manual_seed(SEED)  # each model's weights depend only on its own builder
        spec = BUILDERS[name]()
        out = ZOO / (spec.path or f"{name}.onnx")
        entry = export_model(spec, out)
        size = out.stat().st_size + sum((out.parent / f).stat().st_size for f in entry["external_data"])
        entry["bytes"] = size
        index[name] = entry
        print(f"{name:20s} {size / 1e3:7.1f} kB  {entry['nodes']:4d} nodes  "
              f"max rel error vs torch {entry['max_rel_error_vs_torch']:.1e}  {out.relative_to(HERE)}")
    index_path.write_text(json.dumps({k: index[k] for k in sorted(index)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
