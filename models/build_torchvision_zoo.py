"""Exports full-size torchvision / torch models for a robustness trial of the partitioner.

Random weights (weights=None, torch.manual_seed(0)); the files (3 GB) are not committed.
Needs torch 2.14.1 and torchvision 0.29.1 (on this project's machines:
`python3 -m venv /work/tvenv && /work/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxruntime`):
    /work/tvenv/bin/python models/build_torchvision_zoo.py [--only NAME ...]     (EDGESPLIT_TVZOO=DIR, default /work/tvzoo)
Writes DIR/<name>.onnx and DIR/index.json. Then: `python tests/test_graph_zoo.py DIR`.
"""

from __future__ import annotations

import argparse
import os
import json
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

from export import calibrate_bn, max_rel_error

OUT = Path(os.environ.get("EDGESPLIT_TVZOO", "/work/tvzoo"))
OPSET = 17


def _calibrate(model, size=224):
    """BatchNorm statistics from smooth random images (noise at 1/8 of the size, 3 batches of 8)."""
    return calibrate_bn(model, (3, size, size), (size // 8, size // 8), batches=3, seed=0)


def classifier(fn, size=224):
    def make():
        model = _calibrate(fn(weights=None), size)
        x = torch.randn(1, 3, size, size)
        return dict(module=model, example=(x,), input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                    check={"input": np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)})
    return make


def vit_b_16():
    spec = classifier(torchvision.models.vit_b_16)()
    # torchvision zero-initialises the head: logits would be all 0 whatever the input.
    nn.init.normal_(spec["module"].heads.head.weight, std=0.02)
    return spec


def googlenet():
    model = _calibrate(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True))
    x = torch.randn(1, 3, 224, 224)
    return dict(module=model, example=(x,), input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                check={"input": np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)})


class TextTransformer(nn.Module):
    """BERT-base-sized nn.TransformerEncoder with a padding mask (6 layers, d 512, 8 heads)."""

    def __init__(self, vocab=30522, d=512, heads=8, layers=6, ff=2048, max_len=512):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, max_len, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = nn.Linear(d, d)
        self.cls = nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        h = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.cls(torch.tanh(self.pool(h[:, 0]))), h


def text_transformer():
    rng = np.random.default_rng(1)

    def ids(n, t):
        i = rng.integers(1, 30522, (n, t)).astype(np.int64)
        m = np.ones((n, t), np.int64)
        m[-1, t // 2:] = 0
        return i, m

    i, m = ids(2, 32)
    ci, cm = ids(3, 19)
    return dict(module=TextTransformer().eval(), example=(torch.from_numpy(i), torch.from_numpy(m)),
                input_names=["input_ids", "attention_mask"], output_names=["logits", "hidden_states"],
                dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"}},
                dynamo=True, check={"input_ids": ci, "attention_mask": cm})


class SpeechLSTM(nn.Module):
    """3-layer bidirectional LSTM over 80-dim features (an ASR-style encoder)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(80, 512, num_layers=3, batch_first=True, bidirectional=True)
        self.out = nn.Linear(1024, 32)

    def forward(self, features):
        y, (h, c) = self.lstm(features)
        return self.out(y).log_softmax(-1), h, c


def lstm():
    x = torch.randn(2, 50, 80)
    return dict(module=SpeechLSTM().eval(), example=(x,), input_names=["features"],
                output_names=["log_probs", "h_n", "c_n"],
                dynamic_axes={"features": {0: "N", 1: "T"}, "log_probs": {0: "N", 1: "T"},
                              "h_n": {1: "N"}, "c_n": {1: "N"}},
                check={"features": np.random.default_rng(1).standard_normal((3, 37, 80)).astype(np.float32)})


def detection(fn, order, **kwargs):
    """order: the model's own output dict order (the traced outputs follow it)."""
    def make():
        # Random weights score every box near 0.5 or below: a threshold of 0 keeps
        # detections in the output, so there is something to compare.
        model = fn(weights=None, weights_backbone=None, **kwargs).eval()
        x = torch.rand(3, 320, 320)
        return dict(module=model, example=([x],), input_names=["image"],
                    output_names=list(order),
                    dynamic_axes={"image": {1: "H", 2: "W"}, **{o: {0: "D"} for o in order}},
                    check={"image": np.random.default_rng(1).random((3, 256, 352)).astype(np.float32)},
                    torch_inputs=lambda c: ([torch.from_numpy(c["image"])],),
                    torch_outputs=lambda o: tuple(o[0][k] for k in order))
    return make


class BigMLP(nn.Module):
    """A 2.3 GB MLP: 1024 -> 16384 -> 16384 -> 16384 -> 1000 (GELU)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1024, 16384), nn.GELU(), nn.Linear(16384, 16384), nn.GELU(),
                                 nn.Linear(16384, 16384), nn.GELU(), nn.Linear(16384, 1000))

    def forward(self, features):
        return self.net(features)


def big_mlp():
    with torch.no_grad():
        module = BigMLP().eval()
    return dict(module=module, example=(torch.randn(1, 1024),), input_names=["features"],
                output_names=["logits"], dynamic_axes={"features": {0: "N"}, "logits": {0: "N"}},
                external=True,
                check={"features": np.random.default_rng(1).standard_normal((2, 1024)).astype(np.float32)})


BUILDERS = {
    "googlenet": googlenet,
    "mobilenet_v3_small": classifier(torchvision.models.mobilenet_v3_small),
    "shufflenet_v2_x1_0": classifier(torchvision.models.shufflenet_v2_x1_0),
    "resnet18": classifier(torchvision.models.resnet18),
    "vit_b_16": vit_b_16,
    "text_transformer": text_transformer,
    "lstm": lstm,
    "fasterrcnn_mobilenet_v3_large_320_fpn": detection(
        torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn, ("boxes", "labels", "scores"),
        box_score_thresh=0.0),
    "retinanet_resnet50_fpn": detection(
        torchvision.models.detection.retinanet_resnet50_fpn, ("boxes", "scores", "labels"), score_thresh=0.0),
    "ssdlite320_mobilenet_v3_large": detection(
        torchvision.models.detection.ssdlite320_mobilenet_v3_large, ("boxes", "scores", "labels")),
    "big_mlp_2gb": big_mlp,
}


def export(name: str) -> dict:
    torch.manual_seed(0)
    spec = BUILDERS[name]()
    out = OUT / f"{name}.onnx"
    if spec.get("external"):
        (OUT / name).mkdir(exist_ok=True)
        out = OUT / name / f"{name}.onnx"
    for old in [out, *out.parent.glob(f"{name}.onnx.data")]:
        old.unlink(missing_ok=True)
    t0 = time.time()
    if spec.get("dynamo"):
        dims = {}
        shapes = {n: {a: dims.setdefault(d, torch.export.Dim(d, min=2 if d == "T" else 1, max=512 if d == "T" else 4096))
                      for a, d in spec["dynamic_axes"].get(n, {}).items()} for n in spec["input_names"]}
        torch.onnx.export(spec["module"], spec["example"], str(out), input_names=spec["input_names"],
                          output_names=spec["output_names"], dynamic_shapes=shapes, dynamo=True,
                          opset_version=18)
        exporter = "torch.onnx.export(dynamo=True), opset 18"
    else:
        torch.onnx.export(spec["module"], spec["example"], str(out), input_names=spec["input_names"],
                          output_names=spec["output_names"], dynamic_axes=spec["dynamic_axes"],
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        exporter = f"torch.onnx.export(dynamo=False), opset {OPSET}, constant folding"
    if spec.get("external"):
        # The exporter writes one file per tensor beside the model; gather them in one.
        proto = onnx.load(str(out))
        for t in list(out.parent.iterdir()):
            if t != out:
                t.unlink()
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.onnx.data", size_threshold=1024)
        del proto
    export_s = time.time() - t0
    files = sorted(str(p.relative_to(OUT)) for p in out.parent.glob(f"{name}.onnx*"))
    size = sum((OUT / f).stat().st_size for f in files)
    if size < 1.8e9:
        onnx.checker.check_model(str(out), full_check=True)
    else:
        onnx.checker.check_model(str(out))  # full_check needs the whole model in one protobuf
    proto = onnx.load(str(out), load_external_data=False)
    # ONNX Runtime vs torch
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, spec["check"])
    with torch.no_grad():
        tin = spec.get("torch_inputs", lambda c: tuple(torch.from_numpy(c[n]) for n in spec["input_names"]))(spec["check"])
        exp = spec["module"](*tin)
        exp = spec.get("torch_outputs", lambda o: o if isinstance(o, (tuple, list)) else (o,))(exp)
    errs = []
    if "torch_outputs" in spec:  # detections: top-k over near-tied random scores, compare sorted scores
        k = spec["output_names"].index("scores")
        got, exp = [np.sort(got[k])], [torch.sort(exp[k]).values]
        errs.append(f"{len(got[0])} detections in ORT")
    for g, e in zip(got, exp):
        e = e.numpy()
        if g.size == 0 and e.size == 0:
            errs.append("both empty")
        elif g.shape != e.shape:
            errs.append(f"shape {g.shape} vs torch {e.shape}")
        else:
            errs.append(f"{max_rel_error(g, e):.1e}")

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "file": str(out.relative_to(OUT)), "files": files, "bytes": size, "exporter": exporter, "export_s": round(export_s, 1),
        "nodes": len(proto.graph.node),
        "inputs": [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                    "shape": shape(v)} for v in proto.graph.input],
        "outputs": [{"name": v.name, "shape": shape(v)} for v in proto.graph.output],
        "check_inputs": {k: list(v.shape) for k, v in spec["check"].items()},
        "ort_vs_torch_rel_err": errs,
        "made_by": f"{name}: torch {torch.__version__}, torchvision {torchvision.__version__}, random weights, seed 0",
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    index_path = OUT / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for name in args.only or list(BUILDERS):
        t0 = time.time()
        try:
            index[name] = export(name)
            print(f"OK   {name} {index[name]['bytes'] / 1e6:.1f} MB {time.time() - t0:.0f}s errs={index[name]['ort_vs_torch_rel_err']}", flush=True)
        except Exception as exc:  # record the failure and go on: this is a trial, not a build
            index[name] = {"file": None, "error": f"{type(exc).__name__}: {str(exc)[:800]}",
                           "traceback_tail": traceback.format_exc()[-1500:]}
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        index_path.write_text(json.dumps(index, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
