"""What the model build scripts share: BatchNorm statistics for random weights, and the error
measure every script compares ONNX Runtime against its reference with.

The scripts import it as `export` (Python puts models/ on sys.path when one of them runs:
`python models/build_zoo.py`); torch is imported inside the functions that need it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["calibrate_bn", "max_rel_error"]


def calibrate_bn(module, shape: tuple[int, int, int], low: tuple[int, int], batches: int, seed: int = 0):
    """Set every BatchNorm's statistics from data, as training would, and return the module in eval mode.

    With default statistics (mean 0, var 1) a random CNN's activations shrink block by block and
    its output barely depends on the input; measured statistics keep each BatchNorm output at
    unit scale, so the output depends on the input and a partitioning error shows. The data are
    smooth random images: noise of size `low` upsampled to `shape` (C, H, W), `batches` batches
    of 8 from a seeded generator. Each script keeps the sizes its committed files were built with.
    """
    import torch

    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        return module.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            x = torch.randn(8, c, *low, generator=g)
            module(torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
    return module.eval()


def max_rel_error(got, expected) -> float:
    """Largest |got - expected|, relative to the expected output's scale (at least 1)."""
    e = np.asarray(expected, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - e).max()) / max(1.0, float(np.abs(e).max()))
