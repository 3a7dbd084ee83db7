"""Runners that execute bundle segments: ONNX Runtime (CPU / CUDA EP / TensorRT EP) and native TensorRT.

`make_runner(path, "auto")` tries the fastest backend this machine has and falls back in order
(the kinds are a table, `edgesplit.runtime.kinds`). `SegmentRunner` runs any range [start, stop)
of a bundle's segments over one dict of named tensors: the edge's head and local fallback, the
cloud's tail and profiling all go through it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edgesplit.bundle import Bundle
from edgesplit.errors import BackendError, ConfigError
from edgesplit.runtime.base import Runner
from edgesplit.runtime.kinds import RunnerKind, runner_choices, runner_kind, runner_kinds
from edgesplit.runtime.onnxrt import PROVIDERS, OnnxRuntimeRunner
from edgesplit.runtime.tensorrt import TensorRTRunner

__all__ = ["Runner", "OnnxRuntimeRunner", "TensorRTRunner", "RunnerKind", "runner_kinds", "runner_choices",
           "available_runners", "make_runner", "SegmentRunner", "SegmentChain", "PROVIDERS"]

log = logging.getLogger(__name__)


def available_runners() -> list[str]:
    """Runner kinds whose libraries are installed, fastest first (the GPU is checked on activation)."""
    return [k.name for k in runner_kinds() if k.installed()]


def make_runner(path: str | Path, kind: str = "auto", intra_op_threads: int | None = None,
                cache_dir: str | Path | None = None) -> Runner:
    """An activated runner for `path`. With "auto", the first installed kind that activates."""
    if kind != "auto":
        return runner_kind(kind).create(path, intra_op_threads, cache_dir).activate()
    tried = []
    for k in available_runners():
        try:
            runner = runner_kind(k).create(path, intra_op_threads, cache_dir).activate()
        except BackendError as exc:
            tried.append(f"{k}: {exc}")
            continue
        if tried:
            log.info("runner auto -> %s (skipped %s)", k, "; ".join(tried))
        return runner
    raise BackendError(f"no runner can load {Path(path).name}: {'; '.join(tried) or 'onnxruntime missing'}")


def _zeros(specs, batch: int) -> dict[str, np.ndarray]:
    return {s.name: np.zeros([d if isinstance(d, int) and d >= 0 else batch for d in s.shape], s.dtype)
            for s in specs}


class SegmentRunner:
    """Runs any range [start, stop) of a bundle's segments and returns the tensors of cut `stop`.

    One runner per segment, created on first use and shared by every range, so a head, a tail
    and a full pass never load a segment twice. Thread-safe for concurrent `run` calls (ONNX
    Runtime sessions are).

    Args:
        bundle: a Bundle or its directory.
        runner: a runner kind, or "auto".
        intra_op_threads: ONNX Runtime's thread pool size (None: its default).
        cache_dir: engine cache directory (TensorRT kinds).
    """

    def __init__(self, bundle: Bundle | str | Path, runner: str = "auto", intra_op_threads: int | None = None,
                 cache_dir: str | Path | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        if runner != "auto":
            runner_kind(runner)  # an unknown kind is an error now, not on the first request
        self.kind = runner
        self.intra_op_threads = intra_op_threads
        self.cache_dir = cache_dir
        self._runners: dict[int, Runner] = {}
        self._lock = threading.Lock()

    @property
    def num_segments(self) -> int:
        return self.bundle.num_segments

    def _check_range(self, start: int, stop: int) -> None:
        n = self.bundle.num_segments
        if not 0 <= start <= stop <= n:
            raise ConfigError(f"segment range [{start}, {stop}) is outside 0..{n} of {self.bundle.name}")

    def _runner(self, i: int) -> Runner:
        r = self._runners.get(i)
        if r is None:
            with self._lock:
                r = self._runners.get(i)
                if r is None:
                    r = make_runner(self.bundle.segments[i].path, self.kind, self.intra_op_threads, self.cache_dir)
                    self._runners[i] = r
        return r

    def activate(self, start: int = 0, stop: int | None = None) -> "SegmentRunner":
        """Load the runners of [start, stop) now rather than on the first request."""
        stop = self.bundle.num_segments if stop is None else stop
        self._check_range(start, stop)
        for i in range(start, stop):
            self._runner(i)
        return self

    @property
    def runner_name(self) -> str:
        """The backend actually in use ("ort-cpu", ...), or the requested kind before any run."""
        names = sorted({r.name for r in self._runners.values()})
        return ",".join(names) if names else self.kind

    def run(self, tensors: Mapping[str, np.ndarray], start: int, stop: int,
            times: list[float] | None = None, extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Run segments [start, stop) over `tensors`; the tensors of cut `stop` (the outputs at n).

        Args:
            times: if a list, the milliseconds of each segment are appended to it.
            extra: more tensors made on the way to return as well (e.g. state outputs).
        """
        self._check_range(start, stop)
        env = dict(tensors)
        for i in range(start, stop):
            r = self._runner(i)
            t = time.perf_counter()
            env.update(r.infer(env))
            if times is not None:
                times.append((time.perf_counter() - t) * 1e3)
        wanted = (*self.bundle.cut(stop).tensors, *extra)
        missing = [t for t in wanted if t not in env]
        if missing:
            raise BackendError(f"segments [{start}, {stop}) of {self.bundle.name} did not produce {missing}")
        return {t: env[t] for t in wanted}

    def step(self, tensors: Mapping[str, np.ndarray], start: int, stop: int, state: Mapping[str, np.ndarray],
             times: list[float] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One step of a stateful bundle: run [start, stop) with `state` (state input name -> value,
        for the pairs those segments keep) and return (the tensors of cut `stop`, the next state).

        The next state maps each kept pair's input name to the value its output took this step.
        """
        kept = self.bundle.state_of(start, stop)
        missing = [st.input for st in kept if st.input not in state]
        if missing:
            raise ConfigError(f"segments [{start}, {stop}) of {self.bundle.name} need state {missing}")
        env = dict(tensors)
        env.update({st.input: state[st.input] for st in kept})
        wanted = self.bundle.cut(stop).tensors
        outs = self.run(env, start, stop, times, extra=[st.output for st in kept])
        return {t: outs[t] for t in wanted}, {st.input: outs[st.output] for st in kept}

    def profile(self, runs: int, feeds: Mapping[str, np.ndarray] | None = None, start: int = 0,
                stop: int | None = None) -> list[float]:
        """Median ms of each segment of [start, stop) (default: the whole chain) over `runs` passes,
        after one warm-up pass.

        Args:
            feeds: the tensors of cut `start` to time with (default: zeros, every symbolic dim set to 1).
        """
        if runs < 1:
            raise ConfigError(f"profile runs must be >= 1, got {runs}")
        stop = self.bundle.num_segments if stop is None else stop
        self._check_range(start, stop)
        specs = self.bundle.cut(start).specs
        feeds = _zeros(specs, 1) if feeds is None else feeds
        kept = self.bundle.state_of(start, stop)
        if kept:
            # a stateful bundle is timed at its first step: every state fresh (a past sequence empty)
            bound = {d: 1 for s in specs for d in s.shape if isinstance(d, str)}
            feeds = {**{st.input: st.initial(bound) for st in kept}, **feeds}
        passes = []
        for rep in range(runs + 1):
            t: list[float] = []
            self.run(feeds, start, stop, times=t)
            if rep:
                passes.append(t)
        return [float(x) for x in np.median(np.asarray(passes), axis=0)] if stop > start else []

    def close(self) -> None:
        with self._lock:
            for r in self._runners.values():
                r.deactivate()
            self._runners.clear()

    def __enter__(self) -> "SegmentRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SegmentChain:
    """A fixed range [start, stop) of a bundle over a SegmentRunner: ``run(tensors)``.

    A convenience for code that always runs the same range (a test's head and tail, a
    calibration pass); it owns its SegmentRunner unless one is passed in.
    """

    def __init__(self, bundle: Bundle | str | Path, start: int, stop: int, runner: str = "auto",
                 intra_op_threads: int | None = None, cache_dir: str | Path | None = None,
                 segments: SegmentRunner | None = None):
        self._own = segments is None
        self.segments = segments or SegmentRunner(bundle, runner, intra_op_threads, cache_dir)
        self.bundle = self.segments.bundle
        self.segments._check_range(start, stop)
        self.start, self.stop = start, stop
        self.wanted = self.bundle.cut(stop).tensors

    def activate(self) -> "SegmentChain":
        self.segments.activate(self.start, self.stop)
        return self

    @property
    def runner_name(self) -> str:
        return self.segments.runner_name

    def run(self, tensors: Mapping[str, np.ndarray], times: list[float] | None = None) -> dict[str, np.ndarray]:
        return self.segments.run(tensors, self.start, self.stop, times)

    def close(self) -> None:
        if self._own:
            self.segments.close()

    def __enter__(self) -> "SegmentChain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
