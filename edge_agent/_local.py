"""The device side of a bundle: one runner per segment, any range of them, and their profile."""

from __future__ import annotations

import logging
import threading
import time
from typing import Mapping

import numpy as np

from edgesplit.bundle import Bundle, TensorSpec
from edgesplit.errors import BackendError, UserError

log = logging.getLogger("edge_agent")


class LocalModel:
    """Runs segments [a, b) of a bundle on this device and returns the tensors of cut b.

    One runner per segment, created on first use and shared by every range, so the head, the
    local fallback tail and a full local pass never load a segment twice.
    """

    def __init__(self, bundle: Bundle, runner: str = "auto", intra_op_threads: int | None = None):
        from edgesplit.runtime import make_runner  # onnxruntime is imported here, not at module level

        self._make_runner = make_runner
        self.bundle = bundle
        self.kind = runner
        self.intra_op_threads = intra_op_threads
        self._runners: dict[int, object] = {}
        self._lock = threading.Lock()
        # Median ms per segment on this device, filled by profile().
        self.segment_ms: list[float] | None = None

    def _runner(self, i: int):
        r = self._runners.get(i)
        if r is None:
            with self._lock:
                r = self._runners.get(i)
                if r is None:
                    r = self._make_runner(self.bundle.segments[i].path, self.kind,
                                          intra_op_threads=self.intra_op_threads)
                    self._runners[i] = r
        return r

    @property
    def runner_name(self) -> str:
        names = sorted({r.name for r in self._runners.values()})
        return ",".join(names) if names else self.kind

    def run(self, tensors: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        env = dict(tensors)
        for i in range(start, stop):
            env.update(self._runner(i).infer(env))
        wanted = self.bundle.cut(stop).tensors
        missing = [t for t in wanted if t not in env]
        if missing:
            raise BackendError(f"segments [{start}, {stop}) did not produce {missing}")
        return {t: env[t] for t in wanted}

    def dummy_inputs(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zeros shaped like the model inputs, every symbolic dim set to `batch`."""
        return {s.name: np.zeros([d if isinstance(d, int) and d >= 0 else batch for d in s.shape], s.dtype)
                for s in self.bundle.inputs}

    def profile(self, runs: int) -> list[float]:
        """Load every segment, run the chain once to warm up, then time `runs` passes per segment."""
        n = self.bundle.num_segments
        times: list[list[float]] = [[] for _ in range(n)]
        for rep in range(runs + 1):
            env = self.dummy_inputs()
            for i in range(n):
                r = self._runner(i)
                t0 = time.perf_counter()
                env.update(r.infer(env))
                if rep:
                    times[i].append((time.perf_counter() - t0) * 1e3)
        self.segment_ms = [float(np.median(t)) if t else 0.0 for t in times]
        log.info("device profile (%s): %s ms per segment", self.runner_name,
                 ", ".join(f"{t:.2f}" for t in self.segment_ms))
        return self.segment_ms

    def close(self) -> None:
        with self._lock:
            for r in self._runners.values():
                r.deactivate()
            self._runners.clear()


def bind_shapes(specs: tuple[TensorSpec, ...], arrays: Mapping[str, np.ndarray], what: str,
                bound: dict[str, int] | None = None) -> dict[str, int]:
    """Check names, dtypes and shapes of `arrays` against `specs`; return the symbolic dims bound.

    Symbolic dims (strings) match any non-negative size, but the same name must have the same
    size everywhere, including in `bound` (dims fixed by an earlier check, e.g. the batch size
    from the inputs when checking the outputs). Raises UserError with a readable message.
    """
    bound = dict(bound or {})
    names = [s.name for s in specs]
    if set(arrays) != set(names):
        missing = sorted(set(names) - set(arrays))
        extra = sorted(set(arrays) - set(names))
        raise UserError(f"{what}: expected tensors {names}" + (f", missing {missing}" if missing else "")
                        + (f", unexpected {extra}" if extra else ""))
    for s in specs:
        a = arrays[s.name]
        if not isinstance(a, np.ndarray):
            raise UserError(f"{what}: {s.name} is a {type(a).__name__}, not a numpy array")
        if a.dtype != np.dtype(s.dtype):
            raise UserError(f"{what}: {s.name} has dtype {a.dtype}, expected {s.dtype}")
        if a.ndim != len(s.shape):
            raise UserError(f"{what}: {s.name} has shape {a.shape}, expected {tuple(s.shape)}")
        for size, d in zip(a.shape, s.shape):
            if isinstance(d, int) and d >= 0:
                if size != d:
                    raise UserError(f"{what}: {s.name} has shape {a.shape}, expected {tuple(s.shape)}")
            else:
                key = str(d)
                if bound.setdefault(key, size) != size:
                    raise UserError(f"{what}: {s.name} has shape {a.shape}, but dim {key!r} "
                                    f"is {bound[key]} elsewhere")
    return bound
