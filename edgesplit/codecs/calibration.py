"""Calibration: value ranges of the cut tensors, recorded once from sample inputs.

Int codecs then use these fixed ranges instead of each message's own min/max: the scale no
longer depends on one outlier in one image, and (with per-channel ranges) narrow channels keep
their precision. The ranges live in the bundle manifest's "calibration" field::

    {"method": "percentile", "percentile": 99.99, "samples": 64, "axis": 1,
     "tensors": {"<name>": {"min": -3.1, "max": 4.2, "axis": 1, "min_c": [...], "max_c": [...]}}}

Pass a tensor's entry to ``codec.encode(array, calibration=...)``; `calibration_for` finds it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from edgesplit.errors import ConfigError

__all__ = ["RangeCollector", "calibration_for"]


class RangeCollector:
    """Running per-tensor and per-channel ranges over batches of activations.

    For each batch it takes the low and high `percentile` of the values (per channel along
    `axis` too), and keeps the widest seen over all batches. percentile=100 is plain min/max.
    """

    def __init__(self, percentile: float = 99.99, axis: int = 1):
        if not 50 < percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)
        self.axis = axis
        self.samples = 0
        self._t: dict[str, dict[str, Any]] = {}

    def _bounds(self, x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self.percentile >= 100:
            if axis is None:
                return np.asarray(x.min()), np.asarray(x.max())
            others = tuple(i for i in range(x.ndim) if i != axis)
            return x.min(axis=others), x.max(axis=others)
        q = (1 - self.percentile / 100, self.percentile / 100)
        flat = x.reshape(-1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        lo, hi = np.quantile(flat, q, axis=-1)
        return lo, hi

    def update(self, name: str, array: np.ndarray) -> None:
        """Add one batch of tensor `name` (floating point tensors only; others are skipped)."""
        x = np.asarray(array)
        if x.dtype.kind != "f" or x.size == 0:
            return
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x)
        if not finite.all():
            x = np.where(finite, x, 0).astype(np.float32)
        entry = self._t.get(name)
        lo, hi = self._bounds(x, None)
        if entry is None:
            entry = self._t[name] = {"min": float(lo), "max": float(hi)}
        else:
            entry["min"] = min(entry["min"], float(lo))
            entry["max"] = max(entry["max"], float(hi))
        if x.ndim >= 2:
            axis = self.axis % x.ndim
            clo, chi = self._bounds(x, axis)
            if "min_c" in entry and len(entry["min_c"]) == len(clo):
                entry["min_c"] = np.minimum(entry["min_c"], clo)
                entry["max_c"] = np.maximum(entry["max_c"], chi)
            else:
                entry["axis"] = axis
                entry["min_c"], entry["max_c"] = clo.astype(np.float64), chi.astype(np.float64)

    def result(self, samples: int | None = None) -> dict[str, Any]:
        """The manifest's "calibration" object."""
        tensors = {}
        for name, e in self._t.items():
            out = {"min": _r(e["min"], False), "max": _r(e["max"], True)}
            if "min_c" in e:
                out["axis"] = e["axis"]
                out["min_c"] = [_r(v, False) for v in e["min_c"]]
                out["max_c"] = [_r(v, True) for v in e["max_c"]]
            tensors[name] = out
        return {"method": "percentile" if self.percentile < 100 else "minmax", "percentile": self.percentile,
                "samples": samples if samples is not None else self.samples, "axis": self.axis,
                "tensors": tensors}


def _r(v: float, up: bool) -> float:
    # Six significant digits keep the manifest readable; rounding goes outward, never narrowing.
    v = float(v)
    if v == 0 or not math.isfinite(v):
        return v if math.isfinite(v) else 0.0
    r = float(f"{v:.6g}")
    if (up and r < v) or (not up and r > v):
        r = float(f"{r + (1 if up else -1) * abs(r) * 1e-5:.6g}")
    return r


def calibration_for(source: Any, name: str) -> Mapping[str, Any] | None:
    """Tensor `name`'s calibration entry from a Bundle, a manifest dict or a calibration dict."""
    cal = source.get("calibration") if hasattr(source, "get") and not _is_calibration(source) else source
    if cal is None and hasattr(source, "manifest"):
        cal = source.manifest.get("calibration")
    if not isinstance(cal, Mapping):
        return None
    entry = cal.get("tensors", {}).get(name)
    return entry if isinstance(entry, Mapping) else None


def _is_calibration(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "tensors" in obj and "calibration" not in obj
