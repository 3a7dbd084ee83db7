"""`edgesplit calibrate`: record the value ranges of every cut tensor into the bundle's manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgesplit.cli.options import add_runner_option

HELP = """\
Run the bundle on sample inputs and store, for every tensor at every cut, its value range
(per tensor, and per channel along --axis) in the manifest field "calibration". Int codecs
(int8, int6, int4, ...) then use these fixed ranges instead of each message's own min/max.

Inputs: .npy (one array: [N, ...] or one sample without the batch dim), .npz (arrays named
after the model inputs), or images (.jpg/.png/...; needs pillow) for a single [N, 3, H, W]
input: shorter side resized to H*256/224, centre crop, (pixel - MEAN) / STD with the
EfficientNet-Lite defaults 127 and 128 (models/README.md).

The bundle id changes (the manifest is part of it): give the cloud the calibrated bundle too.
"""

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="record cut-tensor value ranges for the int codecs",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (updated in place)")
    p.add_argument("--inputs", nargs="+", required=True, metavar="FILE",
                   help="sample inputs: .npy, .npz or image files")
    p.add_argument("--percentile", type=float, default=99.99,
                   help="clip range: the low/high percentile per batch (100 = min/max; default 99.99)")
    p.add_argument("--axis", type=int, default=1, help="channel axis for per-channel ranges (default 1)")
    p.add_argument("--per-channel", action="store_true",
                   help="also record per-channel ranges (always recorded; kept for clarity)")
    p.add_argument("--batch", type=int, default=8, help="samples per run (default 8)")
    p.add_argument("--mean", type=float, default=127.0, help="image preprocessing mean (default 127)")
    p.add_argument("--std", type=float, default=128.0, help="image preprocessing std (default 128)")
    add_runner_option(p, "auto")
    p.set_defaults(func=run)


def load_image(path: Path, size: tuple[int, int], mean: float, std: float):
    """Image file -> float32 [3, H, W]: resize the shorter side, centre crop, normalise."""
    import numpy as np

    from edgesplit.deps import require

    Image = require("PIL.Image", "image inputs")
    h, w = size
    with Image.open(path) as im:
        image = im.convert("RGB")
    iw, ih = image.size
    scale = max(h, w) * 256 / 224 / min(iw, ih)
    image = image.resize((max(w, round(iw * scale)), max(h, round(ih * scale))), Image.BILINEAR)
    iw, ih = image.size
    left, top = (iw - w) // 2, (ih - h) // 2
    pixels = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


def load_samples(bundle, paths: list[str], mean: float = 127.0, std: float = 128.0) -> dict:
    """All samples as {input name: array [N, ...]}, checked against the bundle's inputs."""
    import numpy as np

    from edgesplit.errors import UserError

    specs = {s.name: s for s in bundle.inputs}
    parts: dict[str, list] = {n: [] for n in specs}
    first = bundle.inputs[0]
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise UserError(f"{path}: no such input file")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if len(specs) != 1 or len(first.shape) != 4 or first.shape[1] != 3:
                raise UserError(f"{path}: images need a model with one [N, 3, H, W] input")
            h, w = (d if isinstance(d, int) else 224 for d in first.shape[2:])
            parts[first.name].append(load_image(path, (h, w), mean, std)[None])
        elif suffix == ".npy":
            if len(specs) != 1:
                raise UserError(f"{path}: a .npy file feeds one input; this model has {len(specs)} (use .npz)")
            parts[first.name].append(_batched(np.load(path, allow_pickle=False), first, path))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if len(specs) == 1 and len(keys) == 1:
                    parts[first.name].append(_batched(z[keys[0]], first, path))
                    continue
                for name, spec in specs.items():
                    if name not in z:
                        raise UserError(f"{path}: lacks an array named {name!r} (has {keys})")
                    parts[name].append(_batched(z[name], spec, path))
        else:
            raise UserError(f"{path}: unsupported input type {suffix!r} (use .npy, .npz or an image)")
    out = {n: np.concatenate(v).astype(specs[n].dtype, copy=False) for n, v in parts.items() if v}
    counts = {len(v) for v in out.values()}
    if len(out) != len(specs) or len(counts) != 1:
        raise UserError("inputs must give every model input the same number of samples")
    return out


def _batched(a, spec, path):
    from edgesplit.errors import UserError

    if a.ndim == len(spec.shape) - 1:
        a = a[None]
    if a.ndim != len(spec.shape):
        raise UserError(f"{path}: array of shape {list(a.shape)} does not fit input {spec.name} {list(spec.shape)}")
    return a


def calibrate(bundle, samples: dict, percentile: float = 99.99, axis: int = 1, batch: int = 8,
              runner: str = "auto") -> dict:
    """Run every segment over `samples` and return the manifest's "calibration" object."""
    from edgesplit.codecs.calibration import RangeCollector
    from edgesplit.runtime import SegmentRunner

    collector = RangeCollector(percentile=percentile, axis=axis)
    n = bundle.num_segments
    segments = SegmentRunner(bundle, runner)
    total = len(next(iter(samples.values())))
    try:
        for start in range(0, total, batch):
            env = {name: a[start:start + batch] for name, a in samples.items()}
            for name, value in env.items():
                collector.update(name, value)
            for k in range(n):
                env = segments.run(env, k, k + 1)  # exactly the tensors of cut k+1
                for name, value in env.items():
                    collector.update(name, value)
    finally:
        segments.close()
    return collector.result(samples=total)


def run(args) -> int:
    from edgesplit.bundle import Bundle, update_manifest
    from edgesplit.errors import ConfigError

    if args.batch < 1:
        raise ConfigError("--batch must be at least 1")
    bundle = Bundle.load(args.bundle)
    samples = load_samples(bundle, args.inputs, args.mean, args.std)
    cal = calibrate(bundle, samples, args.percentile, args.axis, args.batch, args.runner)
    updated = update_manifest(bundle.path, calibration=cal)
    print(f"calibrated {len(cal['tensors'])} tensors on {cal['samples']} samples "
          f"({cal['method']} {cal['percentile']:g}); bundle id {bundle.id[:12]} -> {updated.id[:12]}")
    return 0
