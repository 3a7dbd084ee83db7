"""Model inputs from image files and arrays (named by the bundle's input spec), and readable outputs.

    from edge_agent.inputs import preprocess_image, find_labels, top_k

    x = preprocess_image("photo.jpg")               # float32 [1, 3, 224, 224]
    labels = find_labels(None, bundle)              # the shipped ImageNet labels (DEMO_DATA)
    top_k(result.outputs["logits"][0], labels)      # [("tabby cat", 0.61), ...]

Used by `edgesplit run`, the demo and the examples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgesplit.bundle import Bundle
from edgesplit.errors import UserError

__all__ = ["DEMO_DATA", "IMAGE_SUFFIXES", "preprocess_image", "load_feeds", "find_labels", "top_k",
           "describe_outputs", "format_timings"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The demo's model, labels and photos: package data, so they are here in a wheel install too.
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


def preprocess_image(path: str | Path, size: int = 224) -> np.ndarray:
    """Image file -> float32 [1, 3, size, size], as models/README.md says for EfficientNet-Lite0.

    Shorter side resized to size * 256/224, central crop, (pixel - 127) / 128, channels first.
    """
    from edgesplit.deps import require

    Image = require("PIL.Image", "image inputs")
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from exc
    w, h = image.size
    short = round(size * 256 / 224)
    scale = short / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32)
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)[None].copy()


def load_feeds(path: str | Path, bundle: Bundle) -> dict[str, np.ndarray]:
    """Feeds for `bundle` from a .npy (the first input), .npz (by name) or an image file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such input file")
    first = bundle.inputs[0]
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a .npy array ({exc})") from exc
        if len(bundle.inputs) != 1:
            raise UserError(f"{bundle.name} has {len(bundle.inputs)} inputs; give an .npz with "
                            f"{[s.name for s in bundle.inputs]}")
        return {first.name: arr}
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a .npz archive ({exc})") from exc
    if suffix in IMAGE_SUFFIXES:
        shape = first.shape
        if len(shape) != 4 or shape[1] != 3:
            raise UserError(f"{bundle.name}'s input {first.name} {list(shape)} is not an NCHW image")
        size = shape[2] if isinstance(shape[2], int) and shape[2] > 0 else 224
        return {first.name: preprocess_image(path, size).astype(first.dtype)}
    raise UserError(f"{path}: unsupported input type (use .npy, .npz, .jpg or .png)")


def find_labels(explicit: str | Path | None, bundle: Bundle) -> list[str] | None:
    """Class names: the given file, else labels.txt in the bundle, imagenet_classes.txt beside it, or the shipped ones."""
    candidates = [Path(explicit)] if explicit else [
        bundle.path / "labels.txt", bundle.path.parent / "imagenet_classes.txt",
        DEMO_DATA / "imagenet_classes.txt"]
    for c in candidates:
        if c.is_file():
            return [line.strip() for line in c.read_text().splitlines()]
    if explicit:
        raise UserError(f"{explicit}: no such labels file")
    return None


def top_k(logits: np.ndarray, labels: list[str], k: int = 5) -> list[tuple[str, float]]:
    """The k most probable classes of one row of logits (softmax probabilities)."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    p = np.exp(row - row.max())
    p /= p.sum()
    idx = np.argsort(-p)[:k]
    return [(labels[i] if i < len(labels) else str(i), float(p[i])) for i in idx]


def describe_outputs(outputs: dict[str, np.ndarray], labels: list[str] | None) -> list[str]:
    """One line per output row: its top-5 labels when it has one score per label, else its first values."""
    lines = []
    for name, arr in outputs.items():
        if labels and arr.ndim >= 1 and arr.shape[-1] == len(labels):
            for b, row in enumerate(arr.reshape(-1, arr.shape[-1])):
                best = ", ".join(f"{lab} {p:.2f}" for lab, p in top_k(row, labels))
                lines.append(f"{name}[{b}]: {best}")
        else:
            flat = arr.reshape(-1)
            head = np.array2string(flat[:6], precision=4, separator=", ")
            lines.append(f"{name}: {arr.dtype}{list(arr.shape)} {head}{' ...' if flat.size > 6 else ''}")
    return lines


def format_timings(t: dict[str, float]) -> str:
    """An InferenceResult's timings on one line: head, encode, network, tail, total (ms)."""
    keys = ["head", "encode", "network", "tail", "total"]
    return "  ".join(f"{k} {t.get(k, 0.0):6.2f}" for k in keys) + " ms"
