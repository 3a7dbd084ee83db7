"""Profiling on this device: per-segment times of a bundle, per-node times of a whole model.

Two kinds of profile, both JSON files:

* :class:`Profile` (``edgesplit-profile/1``): median and p90 time of each segment of one
  bundle, plus the size and encode/decode time of every cut under the codecs asked for. The
  agent's cost model reads one for the device and one for the cloud.
* :class:`NodeProfile` (``edgesplit-node-profile/1``): time of every node of a full ONNX model
  (from ONNX Runtime's own profiler), for the min-cut that picks cuts at partition time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgesplit.errors import ConfigError

__all__ = ["Profile", "NodeProfile", "profile_bundle", "profile_nodes", "device_description",
           "sample_inputs", "ProgressBar"]

PROFILE_FORMAT = "edgesplit-profile/1"
NODE_PROFILE_FORMAT = "edgesplit-node-profile/1"


def device_description() -> str:
    """A one-line description of this machine: CPU model, cores, OS, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu} ({os.cpu_count()} cores, {platform.machine()}), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


class ProgressBar:
    """A one-line text progress bar on stderr (only when stderr is a terminal, or forced)."""

    def __init__(self, total: int, label: str = "", enabled: bool | None = None, stream=None):
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self._last = 0.0

    def step(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        now = time.monotonic()
        if self.done < self.total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {note}".ljust(79))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def sample_inputs(specs, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors for `specs` (TensorSpec): symbolic axis 0 = `batch`, other symbols = 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = tuple(d if isinstance(d, int) and d >= 0 else (batch if i == 0 else 1)
                      for i, d in enumerate(s.shape))
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            out[s.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            out[s.name] = np.zeros(shape, dtype=dt)
        else:
            out[s.name] = np.zeros(shape, dtype=dt)
    return out


# -- segment profiles ----------------------------------------------------------------------------
@dataclass
class Profile:
    """Per-segment times of one bundle on one device (milliseconds per request of `batch`).

    ``codecs[spec]`` holds, per cut k = 0..n, the encoded ``bytes``, ``encode_ms`` and
    ``decode_ms`` measured on the activations of the profiling run.
    """

    bundle_id: str
    bundle_name: str
    device: str
    runner: str
    batch: int
    threads: int | None
    segment_ms: list[float]
    segment_p90_ms: list[float]
    warmup: int = 0
    repeats: int = 0
    slowdown: float = 1.0
    codecs: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    created: str = ""

    @property
    def total_ms(self) -> float:
        return float(sum(self.segment_ms))

    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            hint = " (a per-node profile; this needs a bundle profile)" if got == NODE_PROFILE_FORMAT else ""
            raise ConfigError(f"not an edgesplit segment profile: format {got!r}{hint}")
        try:
            fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            p = cls(**fields)
            p.segment_ms = [float(x) for x in p.segment_ms]
            p.segment_p90_ms = [float(x) for x in p.segment_p90_ms]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"malformed profile: {exc}") from None
        return p

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read profile {path}: {exc}") from None
        return cls.from_json(d)

    def scaled(self, factor: float) -> "Profile":
        """This profile as a device `factor` times slower would measure it."""
        d = asdict(self)
        d["segment_ms"] = [t * factor for t in self.segment_ms]
        d["segment_p90_ms"] = [t * factor for t in self.segment_p90_ms]
        d["slowdown"] = self.slowdown * factor
        d["codecs"] = {c: {**v, "encode_ms": [t * factor for t in v.get("encode_ms", [])],
                           "decode_ms": [t * factor for t in v.get("decode_ms", [])]}
                       for c, v in self.codecs.items()}
        return Profile(**d)


def profile_bundle(bundle, runner: str = "auto", batch: int = 1, threads: int | None = None,
                   warmup: int = 3, repeats: int = 20, codecs: Sequence[str] = ("raw",),
                   inputs: dict[str, np.ndarray] | None = None, progress: bool | None = None,
                   on_step: Callable[[int], None] | None = None) -> Profile:
    """Time every segment of `bundle` on this machine.

    Each pass runs the whole chain once, timing each segment; `warmup` passes are discarded,
    then `repeats` passes give the median and p90 per segment. Then each codec encodes and
    decodes the tensors of every cut once per pass.

    Args:
        bundle: a Bundle or its directory.
        runner: runner kind for make_runner ("auto", "ort-cpu", "trt", ...).
        batch: samples per request (a symbolic axis 0 of the inputs).
        threads: intra-op threads (None: the runtime's default; 1 = a single core).
        inputs: the model inputs to use (default: random ones).
        progress: draw a progress bar on stderr (None: when stderr is a terminal).
    """
    from edgesplit.bundle import Bundle
    from edgesplit.codecs import decode, get_codec
    from edgesplit.runtime import SegmentRunner

    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    if batch < 1 or warmup < 0 or repeats < 1:
        raise ConfigError("batch and repeats must be >= 1, warmup >= 0")
    n = bundle.num_segments
    codec_objs = {spec: get_codec(spec) for spec in codecs}
    feeds = inputs if inputs is not None else sample_inputs(bundle.inputs, batch)
    bar = ProgressBar(n + (warmup + repeats) * (1 + len(codec_objs)), f"profile {bundle.name}", progress)
    segments = SegmentRunner(bundle, runner, intra_op_threads=threads)
    try:
        for i in range(n):
            segments.activate(i, i + 1)
            bar.step(note=f"loaded segment {i}")
        times: list[list[float]] = [[] for _ in range(n)]
        envs = dict(feeds)
        for p in range(warmup + repeats):
            envs = dict(feeds)
            t: list[float] = []
            for i in range(n):  # segment by segment, keeping every cut's tensors for the codecs
                envs.update(segments.run(envs, i, i + 1, times=t))
            if p >= warmup:
                for i, dt in enumerate(t):
                    times[i].append(dt)
            bar.step(note="warm-up" if p < warmup else "timing")
        codec_stats: dict[str, dict[str, list[float]]] = {}
        for spec, codec in codec_objs.items():
            enc_t: list[list[float]] = [[] for _ in range(n + 1)]
            dec_t: list[list[float]] = [[] for _ in range(n + 1)]
            sizes = [0.0] * (n + 1)
            for p in range(warmup + repeats):
                for k in range(n + 1):
                    names = bundle.cut(k).tensors
                    t0 = time.perf_counter()
                    encs = [codec.encode(envs[t]) for t in names]
                    t1 = time.perf_counter()
                    for e in encs:
                        decode(e)
                    t2 = time.perf_counter()
                    if p >= warmup:
                        enc_t[k].append((t1 - t0) * 1e3)
                        dec_t[k].append((t2 - t1) * 1e3)
                    sizes[k] = float(sum(e.nbytes for e in encs))
                bar.step(note=f"codec {spec}")
            codec_stats[spec] = {
                "bytes": sizes,
                "encode_ms": [statistics.median(t) for t in enc_t],
                "decode_ms": [statistics.median(t) for t in dec_t],
            }
        runner_name = segments.runner_name
    finally:
        segments.close()
        bar.close()
    return Profile(
        bundle_id=bundle.id, bundle_name=bundle.name, device=device_description(),
        runner=runner_name, batch=batch, threads=threads,
        segment_ms=[statistics.median(t) for t in times],
        segment_p90_ms=[_percentile(t, 90) for t in times],
        warmup=warmup, repeats=repeats, codecs=codec_stats,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


# -- per-node profiles ---------------------------------------------------------------------------
@dataclass
class NodeProfile:
    """Time of every top-level node of a model on one device (ms per request of `batch`).

    ``node_ms[i]`` belongs to ``model.graph.node[i]`` (``node_names``/``node_ops`` let a
    reader check it is the same model). ONNX Runtime fuses nodes when it optimizes, so each
    node is timed in an unoptimized session, and the times are then scaled so that they add up
    to the optimized session's measured total (``total_ms``).
    """

    model_sha256: str
    model_name: str
    device: str
    runner: str
    batch: int
    threads: int | None
    node_names: list[str]
    node_ops: list[str]
    node_ms: list[float]
    total_ms: float
    unoptimized_total_ms: float = 0.0
    slowdown: float = 1.0
    created: str = ""

    def to_json(self) -> dict:
        return {"format": NODE_PROFILE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "NodeProfile":
        if not isinstance(d, dict) or d.get("format") != NODE_PROFILE_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            hint = (" (a bundle profile; profile the .onnx model itself: edgesplit profile MODEL.onnx)"
                    if got == PROFILE_FORMAT else "")
            raise ConfigError(f"not an edgesplit per-node profile: format {got!r}{hint}")
        try:
            p = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
            p.node_ms = [float(x) for x in p.node_ms]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"malformed node profile: {exc}") from None
        if not (len(p.node_ms) == len(p.node_names) == len(p.node_ops)):
            raise ConfigError("malformed node profile: node lists differ in length")
        return p

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NodeProfile":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read node profile {path}: {exc}") from None
        return cls.from_json(d)

    def scaled(self, factor: float) -> "NodeProfile":
        d = asdict(self)
        d["node_ms"] = [t * factor for t in self.node_ms]
        d["total_ms"] = self.total_ms * factor
        d["unoptimized_total_ms"] = self.unoptimized_total_ms * factor
        d["slowdown"] = self.slowdown * factor
        return NodeProfile(**d)

    def check_model(self, model) -> None:
        """Raise ConfigError unless this profile was made on `model`'s node list."""
        ops = [n.op_type for n in model.graph.node]
        if ops != self.node_ops:
            raise ConfigError(f"the node profile of {self.model_name!r} does not match this model "
                              f"({len(self.node_ops)} profiled nodes, {len(ops)} in the model)")


def _session_options(ort, threads, optimize: bool, profile_prefix: str | None = None):
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def profile_nodes(model_path: str | os.PathLike, batch: int = 1, threads: int | None = None,
                  warmup: int = 3, repeats: int = 10, providers: Sequence[str] | None = None,
                  progress: bool | None = None) -> NodeProfile:
    """Time every node of a full ONNX model with ONNX Runtime's profiler.

    Args:
        model_path: the .onnx file (external data beside it is fine).
        batch: samples per request.
        threads: intra-op threads (None: ONNX Runtime's default).
        providers: execution providers (default: CPU).
    """
    import onnx

    from edgesplit.deps import require
    from edgesplit.bundle import TensorSpec
    from edgesplit.graph import file_sha256, has_external_data, load_model, np_dtype_name

    ort = require("onnxruntime", "profiling")
    model_path = Path(model_path)
    model = load_model(model_path, load_weights=False, check=False)
    providers = list(providers or ["CPUExecutionProvider"])
    bar = ProgressBar(2 * (warmup + repeats), f"profile {model_path.name}", progress)

    # Name every node uniquely so the profiler's events map back to node indices.
    named = onnx.load(str(model_path), load_external_data=False)
    names = []
    for i, node in enumerate(named.graph.node):
        node.name = f"es_node_{i}"
        names.append(node.name)
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "N") for d in tt.shape.dim)
        specs.append(TensorSpec(vi.name, np_dtype_name(tt.elem_type) or "float32", dims))
    feeds = sample_inputs(specs, batch)

    with tempfile.TemporaryDirectory(prefix="es-prof-") as tmp:
        # With external data the renamed copy must sit beside the original so the data's
        # relative paths still resolve; otherwise it goes to the temporary directory.
        renamed = (model_path.parent / f".{model_path.stem}.es-profile.{os.getpid()}.onnx"
                   if has_external_data(named) else Path(tmp) / "model.onnx")
        onnx.save_model(named, str(renamed))
        try:
            sess = ort.InferenceSession(str(renamed), _session_options(ort, threads, False, f"{tmp}/p"),
                                        providers=providers)
            for p in range(warmup + repeats):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                if p == warmup:
                    t_unopt_start = t0
                bar.step(note="per node")
            unopt_total = (time.perf_counter() - t_unopt_start) * 1e3 / repeats
            trace_file = sess.end_profiling()
            events = json.loads(Path(trace_file).read_text())
            del sess
        finally:
            renamed.unlink(missing_ok=True)
    # Only the timed passes: the profiler logs each run; keep the last `repeats` per node.
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
    raw = [statistics.median(per_node[nm][-repeats:]) if nm in per_node else 0.0 for nm in names]

    sess = ort.InferenceSession(str(model_path), _session_options(ort, threads, True), providers=providers)
    times = []
    for p in range(warmup + repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        if p >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        bar.step(note="optimized")
    bar.close()
    total = statistics.median(times)
    s = sum(raw)
    node_ms = [t * total / s for t in raw] if s > 0 else raw
    return NodeProfile(
        model_sha256=file_sha256(model_path, model), model_name=model_path.stem,
        device=device_description(), runner="ort-" + providers[0].replace("ExecutionProvider", "").lower(),
        batch=batch, threads=threads, node_names=[n.name or f"#{i}" for i, n in enumerate(model.graph.node)],
        node_ops=[n.op_type for n in model.graph.node], node_ms=node_ms, total_ms=total,
        unoptimized_total_ms=unopt_total, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
