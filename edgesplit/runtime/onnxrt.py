"""ONNX Runtime runner: CPU, or the CUDA / TensorRT execution providers when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgesplit.deps import available, require
from edgesplit.errors import BackendError
from edgesplit.runtime.base import Runner
from edgesplit.runtime.kinds import RunnerKind

# runner name -> execution providers, most preferred first
PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeRunner(Runner):
    """Runs a segment in an onnxruntime InferenceSession.

    Args:
        path: the segment's .onnx file.
        kind: "ort-cpu", "ort-cuda" or "ort-trt".
        intra_op_threads: ONNX Runtime's thread pool size (None: its default).
        cache_dir: where the TensorRT EP caches engines (kind "ort-trt").
    """

    def __init__(self, path: str | Path, kind: str = "ort-cpu", intra_op_threads: int | None = None,
                 cache_dir: str | Path | None = None):
        super().__init__(path)
        if kind not in PROVIDERS:
            raise BackendError(f"unknown ONNX Runtime runner {kind!r}; choose from {sorted(PROVIDERS)}")
        self.name = kind
        self.intra_op_threads = intra_op_threads
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.session = None

    def _providers(self) -> list:
        out: list = []
        for p in PROVIDERS[self.name]:
            if p == "TensorrtExecutionProvider" and self.cache_dir:
                out.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(self.cache_dir),
                                "trt_fp16_enable": False}))
            else:
                out.append(p)
        return out

    def activate_impl(self) -> None:
        ort = require("onnxruntime", "running segments")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self._providers())
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise BackendError(f"{self.name} could not load {self.path.name}: {exc}") from exc
        wanted = PROVIDERS[self.name][0]
        if wanted not in self.session.get_providers():
            raise BackendError(f"{self.name}: {wanted} is not usable on this machine")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(None, feeds)
        except Exception as exc:
            if type(exc).__module__.startswith("onnxruntime"):
                raise BackendError(f"{self.name} failed on {self.path.name}: {exc}") from exc
            raise
        return dict(zip(self.output_names, outs))

    def deactivate_impl(self) -> None:
        self.session = None


def _ort_kind(kind: str, rank: int, summary: str) -> RunnerKind:
    def installed() -> bool:
        if not available("onnxruntime"):
            return False
        import onnxruntime as ort

        return PROVIDERS[kind][0] in ort.get_available_providers()

    def create(path, intra_op_threads=None, cache_dir=None) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(path, kind, intra_op_threads=intra_op_threads, cache_dir=cache_dir)

    return RunnerKind(kind, rank, summary, create, installed)


# The entries of the runner table (pyproject.toml, edgesplit.runners).
ORT_TRT = _ort_kind("ort-trt", 10, "ONNX Runtime, TensorRT execution provider (onnxruntime-gpu)")
ORT_CUDA = _ort_kind("ort-cuda", 20, "ONNX Runtime, CUDA execution provider (onnxruntime-gpu)")
ORT_CPU = _ort_kind("ort-cpu", 90, "ONNX Runtime on the CPU")
