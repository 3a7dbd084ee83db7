"""Builds the two extra benchmark models of issue 6: a branching CNN and a small ViT.

Both take a 224x224 RGB image (float32 [N, 3, 224, 224], dynamic N) and return
ImageNet-sized logits ("logits", [N, 1000]); the weights are random (fixed seed):
what the split benchmark needs is their shape, compute and activation sizes, not
their accuracy.

- models/resnet_branching.onnx: a ResNet/Inception hybrid. Full-resolution stem
  (activations 8x the input), residual blocks and Inception-style blocks whose
  branches make the narrow cuts inside a block multi-tensor, and a late
  bottleneck where activations are 1/50 of the input. Where to cut depends on the
  link; a chain-order cut list misses the branch cuts.
- models/vit_mini.onnx: a small Vision Transformer (patch 16, 197 tokens of
  width 192, 4 pre-norm blocks, 3 heads): every block boundary carries the same
  151 kB, a quarter of the input, so the profile is flat, unlike any CNN.

The script checks onnx.checker (full_check) and ONNX Runtime against torch
(max abs error <= 1e-4 relative to the output scale) and prints, per model, the
activation size at each node output along the graph.

Usage (needs torch, onnx and onnxruntime; not needed at run time):
    python models/build_benchmark_models.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from export import calibrate_bn, max_rel_error

HERE = Path(__file__).resolve().parent
OPSET = 17
SEED = 0
TOLERANCE = 1e-4


def resnet_branching():
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class Residual(nn.Module):
        """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block."""

        def __init__(self, channels, bottleneck=None):
            super().__init__()
            if bottleneck:
                self.body = nn.Sequential(cbr(channels, bottleneck, 1), cbr(bottleneck, bottleneck),
                                          nn.Conv2d(bottleneck, channels, 1, bias=False),
                                          nn.BatchNorm2d(channels))
            else:
                self.body = nn.Sequential(cbr(channels, channels),
                                          nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                          nn.BatchNorm2d(channels))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    class InceptionResidual(nn.Module):
        """Four branches (1x1, 3x3, double 3x3, pool-proj), concatenated, plus the input."""

        def __init__(self, channels):
            super().__init__()
            q = channels // 4
            self.b1 = cbr(channels, q, 1)
            self.b3 = nn.Sequential(cbr(channels, q, 1), cbr(q, q))
            self.b5 = nn.Sequential(cbr(channels, q // 2, 1), cbr(q // 2, q), cbr(q, q))
            self.bp = nn.Sequential(nn.AvgPool2d(3, 1, 1), cbr(channels, q, 1))
            self.mix = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))

        def forward(self, x):
            y = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)
            return torch.relu(x + self.mix(y))

    class ResNetBranching(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            self.stem = nn.Sequential(cbr(3, 24), cbr(24, 32, 3, 2))          # 224 -> 112
            self.stage1 = Residual(32)                                         # 112x112x32
            self.stage2 = nn.Sequential(cbr(32, 64, 3, 2), InceptionResidual(64))      # 56
            self.stage3 = nn.Sequential(cbr(64, 128, 3, 2), Residual(128),
                                        InceptionResidual(128))                # 28
            self.stage4 = nn.Sequential(cbr(128, 256, 3, 2), Residual(256, 64),
                                        InceptionResidual(256))                # 14
            self.stage5 = nn.Sequential(cbr(256, 384, 3, 2), Residual(384, 96))          # 7
            self.squeeze = cbr(384, 64, 1)                                     # 7x7x64 = 12.5 kB
            self.fc = nn.Linear(64, classes)

        def forward(self, input):  # noqa: A002
            x = self.stage5(self.stage4(self.stage3(self.stage2(self.stage1(self.stem(input))))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.squeeze(x), 1), 1))

    return ResNetBranching()


def vit_mini():
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.scale = (dim // heads) ** -0.5
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self, dim, heads, mlp):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViTMini(nn.Module):
        def __init__(self, dim=192, depth=4, heads=3, mlp=768, patch=16, classes=1000):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, patch, patch)
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, (224 // patch) ** 2 + 1, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, classes)

        def forward(self, input):  # noqa: A002
            x = self.patch_embed(input).flatten(2).transpose(1, 2)   # [N, 196, dim]
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], 1) + self.pos_embed
            x = self.norm(self.blocks(x))
            return self.head(x[:, 0])

    return ViTMini()


BUILDERS = {"resnet_branching": resnet_branching, "vit_mini": vit_mini}


def build(name: str, out: Path) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    torch.manual_seed(SEED)
    module = BUILDERS[name]().eval()
    calibrate_bn(module, (3, 224, 224), (28, 28), batches=4, seed=SEED)
    example = torch.randn(1, 3, 224, 224)
    torch.onnx.export(module, (example,), str(out), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(out))
    proto.graph.name = name
    proto.doc_string = (BUILDERS[name].__doc__ or name) + " Random weights (torch.manual_seed(0)); " \
        "built by edgesplit models/build_benchmark_models.py."
    onnx.save(proto, str(out))
    onnx.checker.check_model(str(out), full_check=True)

    x = np.random.default_rng(SEED).standard_normal((2, 3, 224, 224)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": x})
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    err = max_rel_error(got, expected)
    params = sum(p.numel() for p in module.parameters())
    spread = float(np.abs(expected[0] - expected[1]).max())
    print(f"{out.name}: {out.stat().st_size / 1e6:.1f} MB, {params / 1e6:.2f} M parameters, "
          f"{len(proto.graph.node)} nodes, max rel error vs torch {err:.1e}, "
          f"max |logits(x0) - logits(x1)| {spread:.2f}")
    if err > TOLERANCE:
        raise SystemExit(f"{name}: ONNX Runtime differs from torch by {err:.2e}")
    _print_activation_sizes(proto)


def _print_activation_sizes(proto) -> None:
    """Bytes per sample of each Conv/Add/Concat/... output, in graph order (batch 1)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    sizes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
        sizes[v.name] = int(np.prod(dims)) * 4
    shown = {"Conv", "Add", "Concat", "Relu", "GlobalAveragePool", "Gemm", "LayerNormalization"}
    print(f"  input: {sizes['input'] / 1e3:.0f} kB per sample")
    last = None
    for node in inferred.graph.node:
        if node.op_type in shown and node.output[0] in sizes and sizes[node.output[0]] != last:
            last = sizes[node.output[0]]
            print(f"  {node.output[0]:55s} {last / 1e3:8.1f} kB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BUILDERS))
    args = parser.parse_args(argv)
    for name in args.only or list(BUILDERS):
        build(name, HERE / f"{name}.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
