"""Writes edge_agent/demo_data/photos/*.jpg: small natural photos for the EfficientNet-Lite0 checks.

The photos come from the sample data that scikit-image and scikit-learn ship
inside their wheels (licenses in edge_agent/demo_data/photos/README.md). They are stored
small (shorter side 256 px, the usual "resize 256, centre crop 224" input) so
the repository stays light and tests need neither package.

Usage (needs scikit-image, scikit-learn and pillow; not needed at run time):
    python models/build_photos.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SHORT_SIDE = 256
JPEG_QUALITY = 90


def _sources() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    coins = skimage.data.coins()  # grayscale; the classifier wants RGB
    return {
        "astronaut": skimage.data.astronaut(),
        "chelsea_cat": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "coins": np.stack([coins] * 3, axis=-1),
        "china_temple": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
    }


def shrink(image: np.ndarray, short_side: int = SHORT_SIDE) -> Image.Image:
    """Resizes so the shorter side is ``short_side`` pixels (bicubic, aspect kept)."""
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    w, h = pil.size
    scale = short_side / min(w, h)
    return pil.resize((round(w * scale), round(h * scale)), Image.BICUBIC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "edge_agent" / "demo_data" / "photos")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in _sources().items():
        path = args.out / f"{name}.jpg"
        shrink(image).save(path, quality=JPEG_QUALITY, optimize=True)
        print(f"{path}  {Image.open(path).size}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
