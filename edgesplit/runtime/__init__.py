"""Runners that execute bundle segments: ONNX Runtime (CPU / CUDA EP / TensorRT EP) and native TensorRT.

`make_runner(path, "auto")` tries the fastest backend this machine has and falls back in order;
`SegmentChain` runs a range of a bundle's segments over one dict of named tensors, which is what
both the edge (head, local fallback) and the cloud (tail) do.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from edgesplit._lazy import available
from edgesplit.bundle import Bundle
from edgesplit.errors import BackendError, ConfigError
from edgesplit.runtime.base import Runner
from edgesplit.runtime.onnxrt import PROVIDERS, OnnxRuntimeRunner
from edgesplit.runtime.tensorrt import TensorRTRunner

__all__ = ["Runner", "OnnxRuntimeRunner", "TensorRTRunner", "RUNNER_KINDS", "available_runners",
           "make_runner", "SegmentChain"]

log = logging.getLogger(__name__)

# Fastest first: "auto" takes the first one that activates on this machine.
RUNNER_KINDS = ("trt", "ort-trt", "ort-cuda", "ort-cpu")


def available_runners() -> list[str]:
    """Runner kinds whose libraries are installed (the GPU itself is checked on activation)."""
    kinds = []
    if available("tensorrt") and (available("cuda.bindings") or available("cuda.cudart")):
        kinds.append("trt")
    if available("onnxruntime"):
        import onnxruntime as ort

        have = set(ort.get_available_providers())
        kinds += [k for k in ("ort-trt", "ort-cuda", "ort-cpu") if PROVIDERS[k][0] in have]
    return kinds


def _new_runner(path: str | Path, kind: str, intra_op_threads: int | None, cache_dir) -> Runner:
    if kind == "trt":
        return TensorRTRunner(path, cache_dir=cache_dir)
    return OnnxRuntimeRunner(path, kind, intra_op_threads=intra_op_threads, cache_dir=cache_dir)


def make_runner(path: str | Path, kind: str = "auto", intra_op_threads: int | None = None,
                cache_dir: str | Path | None = None) -> Runner:
    """An activated runner for `path`. With "auto", the first kind of RUNNER_KINDS that works."""
    if kind != "auto":
        if kind not in RUNNER_KINDS:
            raise ConfigError(f"unknown runner {kind!r}; choose auto or one of {', '.join(RUNNER_KINDS)}")
        return _new_runner(path, kind, intra_op_threads, cache_dir).activate()
    tried = []
    for k in available_runners():
        try:
            runner = _new_runner(path, k, intra_op_threads, cache_dir).activate()
        except BackendError as exc:
            tried.append(f"{k}: {exc}")
            continue
        if tried:
            log.info("runner auto -> %s (skipped %s)", k, "; ".join(tried))
        return runner
    raise BackendError(f"no runner can load {Path(path).name}: {'; '.join(tried) or 'onnxruntime missing'}")


class SegmentChain:
    """Runs segments [start, stop) of a bundle and returns the tensors of cut `stop`.

    Runners are created on first use and kept; `close()` releases them. Thread-safe for
    concurrent `run` calls (ONNX Runtime sessions are).
    """

    def __init__(self, bundle: Bundle | str | Path, start: int, stop: int, runner: str = "auto",
                 intra_op_threads: int | None = None, cache_dir: str | Path | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        n = self.bundle.num_segments
        if not 0 <= start <= stop <= n:
            raise ConfigError(f"segment range [{start}, {stop}) is outside 0..{n}")
        self.start, self.stop = start, stop
        self.kind = runner
        self.intra_op_threads = intra_op_threads
        self.cache_dir = cache_dir
        self.wanted = self.bundle.cut(stop).tensors
        self._runners: dict[int, Runner] = {}
        self._lock = threading.Lock()

    def _runner(self, i: int) -> Runner:
        r = self._runners.get(i)
        if r is None:
            with self._lock:
                r = self._runners.get(i)
                if r is None:
                    r = make_runner(self.bundle.segments[i].path, self.kind, self.intra_op_threads, self.cache_dir)
                    self._runners[i] = r
        return r

    def activate(self) -> "SegmentChain":
        """Load every runner now rather than on the first request."""
        for i in range(self.start, self.stop):
            self._runner(i)
        return self

    @property
    def runner_name(self) -> str:
        """The backend actually in use ("ort-cpu", ...), or the requested kind before any run."""
        names = sorted({r.name for r in self._runners.values()})
        return ",".join(names) if names else self.kind

    def run(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(tensors)
        for i in range(self.start, self.stop):
            env.update(self._runner(i).infer(env))
        missing = [t for t in self.wanted if t not in env]
        if missing:
            raise BackendError(f"segments [{self.start}, {self.stop}) did not produce {missing}")
        return {t: env[t] for t in self.wanted}

    def close(self) -> None:
        with self._lock:
            for r in self._runners.values():
                r.deactivate()
            self._runners.clear()

    def __enter__(self) -> "SegmentChain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
