"""Native TensorRT runner: builds an engine from the segment's ONNX, cached on disk.

The cache key covers the segment file's content, the TensorRT version and the GPU name, so an
engine is never reused on a GPU or TensorRT release it was not built for. Device memory is
managed with cuda-python's runtime bindings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgesplit.deps import require
from edgesplit.errors import BackendError
from edgesplit.runtime.base import Runner
from edgesplit.runtime.kinds import RunnerKind

DEFAULT_CACHE = Path.home() / ".cache" / "edgesplit" / "trt"


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        cudart = require("cuda.cudart", "the native TensorRT runner")
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTRunner(Runner):
    """Runs a segment with a TensorRT engine.

    Args:
        path: the segment's .onnx file.
        cache_dir: engine cache directory.
        fp16: allow FP16 kernels.
        max_batch: the largest batch of the optimisation profile for a dynamic batch dim.
    """

    name = "trt"

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None, fp16: bool = False,
                 max_batch: int = 32):
        super().__init__(path)
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.fp16 = fp16
        self.max_batch = max_batch
        self.engine = self.context = self.stream = None

    def _cache_key(self, trt, cudart) -> str:
        props = _check(cudart.cudaGetDeviceProperties(0))
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        h = hashlib.sha256(self.path.read_bytes())
        h.update(f"|trt={trt.__version__}|gpu={gpu}|fp16={self.fp16}|maxb={self.max_batch}".encode())
        return h.hexdigest()[:32]

    def _build(self, trt, logger) -> bytes:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT could not parse {self.path.name}: {errors}")
        config = builder.create_builder_config()
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            dims = list(t.shape)
            if any(d < 0 for d in dims[1:]):
                raise BackendError(f"{self.path.name}: input {t.name} has dynamic non-batch dims {dims}")
            lo, opt, hi = ([1 if d < 0 else d for d in dims], [1 if d < 0 else d for d in dims],
                           [self.max_batch if d < 0 else d for d in dims])
            profile.set_shape(t.name, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(f"TensorRT failed to build an engine for {self.path.name}")
        return bytes(plan)

    def activate_impl(self) -> None:
        trt = require("tensorrt", "the native TensorRT runner")
        cudart = _cudart()
        logger = trt.Logger(trt.Logger.WARNING)
        cache = self.cache_dir / f"{self._cache_key(trt, cudart)}.engine"
        if cache.is_file():
            plan = cache.read_bytes()
        else:
            plan = self._build(trt, logger)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_bytes(plan)
            tmp.replace(cache)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize the engine for {self.path.name}")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_in[n])
        self.output_names = tuple(n for n in names if not is_in[n])
        self._trt, self._cudart = trt, cudart

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        allocations = []
        try:
            for name in self.input_names:
                host = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_input_shape(name, host.shape)
                ptr = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                allocations.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self.stream))
                self.context.set_tensor_address(name, ptr)
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = _check(cudart.cudaMalloc(max(out.nbytes, 1)))
                allocations.append(ptr)
                self.context.set_tensor_address(name, ptr)
                outputs[name] = (out, ptr)
            if not self.context.execute_async_v3(self.stream):
                raise BackendError(f"TensorRT execution failed on {self.path.name}")
            for out, ptr in outputs.values():
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            return {name: out for name, (out, _) in outputs.items()}
        finally:
            for ptr in allocations:
                cudart.cudaFree(ptr)

    def deactivate_impl(self) -> None:
        if self.stream is not None:
            self._cudart.cudaStreamDestroy(self.stream)
        self.engine = self.context = self.stream = None


def _trt_installed() -> bool:
    from edgesplit.deps import available

    return available("tensorrt") and (available("cuda.bindings") or available("cuda.cudart"))


def _trt_create(path, intra_op_threads=None, cache_dir=None) -> TensorRTRunner:
    return TensorRTRunner(path, cache_dir=cache_dir)  # TensorRT has no intra-op thread setting


# The entry of the runner table (pyproject.toml, edgesplit.runners).
TRT = RunnerKind("trt", 0, "native TensorRT engine (tensorrt + cuda-python)", _trt_create, _trt_installed)
