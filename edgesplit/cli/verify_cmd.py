"""`edgesplit verify`: check that a bundle's segments, chained, compute what the original model does.

For every cut k the edge half runs segments [0, k), only the tensors of cut k are kept, and
the cloud half runs [k, n) on them; the outputs are compared with the original model run in
ONNX Runtime on the same generated (or given) inputs. The cut tensors are also checked
against the dtypes and shapes the manifest promises.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgesplit.cli.options import add_runner_option, add_shape_option, shapes_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="run the segments chained and the original model; compare outputs",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle directory")
    p.add_argument("--model", default=None,
                   help="the original ONNX model (default: the source path recorded in the manifest)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed max-abs error relative to the output's scale (default 1e-4)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size of the generated inputs (default 1; overrides the batch of --shape)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated inputs")
    p.add_argument("--inputs", default=None, metavar="FILE.npz", help="use these inputs instead of random ones")
    add_runner_option(p, "ort-cpu", "runner kind for segments and model")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_shape_option(p)
    p.set_defaults(func=run)


@dataclass
class VerifyReport:
    """Worst errors over all cuts, per model output; `ok` when every one is within tolerance."""

    tolerance: float
    max_abs: dict[str, float] = field(default_factory=dict)
    max_rel: dict[str, float] = field(default_factory=dict)
    per_cut: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(v <= self.tolerance for v in self.max_rel.values())

    def to_json(self) -> dict:
        return {"ok": self.ok, "tolerance": self.tolerance, "max_abs": self.max_abs,
                "max_rel": self.max_rel, "per_cut": self.per_cut, "problems": self.problems}


def make_inputs(specs, shapes: dict | None = None, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for input specs; symbolic dims come from `shapes` (by input or symbol) or batch."""
    from edgesplit.errors import ConfigError

    shapes = shapes or {}
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        given = shapes.get(s.name)
        dims = []
        for axis, d in enumerate(s.shape):
            if given is not None and axis < len(given) and isinstance(given[axis], int):
                dims.append(given[axis])
            elif isinstance(d, int) and d >= 0:
                dims.append(d)
            elif isinstance(shapes.get(d), (int,)) or (isinstance(shapes.get(d), (list, tuple)) and len(shapes[d]) == 1):
                v = shapes[d]
                dims.append(int(v[0] if isinstance(v, (list, tuple)) else v))
            elif axis == 0:
                dims.append(batch)
            else:
                raise ConfigError(f"input {s.name!r} has symbolic dim {d!r}; give its size with "
                                  f"--shape {d}=SIZE or --shape {s.name}=DIMS")
        dtype = np.dtype(s.dtype)
        if dtype.kind == "f":
            feeds[s.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            feeds[s.name] = rng.integers(0, 2, dims).astype(bool)
        else:  # token ids, masks, indices: small values that are valid almost everywhere
            arr = rng.integers(0, 2, dims).astype(dtype)
            if arr.ndim >= 2:
                arr[:, 0] = 1
            feeds[s.name] = arr
    return feeds


def _spec_problems(spec, arr: np.ndarray, where: str) -> list[str]:
    out = []
    if arr.dtype.name != spec.dtype:
        out.append(f"{where}: tensor {spec.name!r} is {arr.dtype.name}, manifest says {spec.dtype}")
    if len(arr.shape) != len(spec.shape) or any(isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape)):
        out.append(f"{where}: tensor {spec.name!r} has shape {list(arr.shape)}, manifest says {list(spec.shape)}")
    return out


def _errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    if ref.shape != got.shape:
        return float("inf"), float("inf")
    if ref.dtype.kind in "fc":
        a, b = ref.astype(np.float64), got.astype(np.float64)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return float("inf"), float("inf")
        a, b = np.nan_to_num(a), np.nan_to_num(b)
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        return err, err / scale if scale > 0 else err
    diff = float(np.count_nonzero(ref != got))
    return diff, diff / max(ref.size, 1)


def static_problems(bundle) -> list[str]:
    """Each cut k must carry everything segments k..n-1 read that they do not make themselves."""
    out = []
    n = bundle.num_segments
    for k in range(n):
        have = set(bundle.cut(k).tensors)
        for seg in bundle.segments[k:]:
            missing = [t for t in seg.inputs if t not in have]
            if missing:
                out.append(f"cut {k}: segment {seg.index} reads {missing}, which cut {k} does not carry")
            have.update(seg.outputs)
        lost = [t for t in bundle.cut(n).tensors if t not in have]
        if lost:
            out.append(f"cut {k}: model outputs {lost} are neither carried nor made after it")
    return out


def verify(bundle, model_path, feeds: dict[str, np.ndarray], tolerance: float = 1e-4,
           runner: str = "ort-cpu", numeric_cuts=None) -> VerifyReport:
    """Compare the original model with the segments split at every cut 0..n-1.

    `numeric_cuts` limits the runs to those cuts (None: all; for bundles with hundreds of
    segments); every cut is still checked to carry what the segments after it read.
    """
    from edgesplit.errors import BackendError
    from edgesplit.runtime import make_runner

    report = VerifyReport(tolerance)
    report.problems += static_problems(bundle)
    with make_runner(model_path, runner) as ref_runner:
        ref = ref_runner.infer(feeds)
    n = bundle.num_segments
    runners = [make_runner(s.path, runner) for s in bundle.segments]
    try:
        env = dict(feeds)
        for k in range(n):
            cut = bundle.cut(k)
            for spec in cut.specs:
                if spec.name in env:
                    report.problems += _spec_problems(spec, env[spec.name], f"cut {k}")
                else:
                    report.problems.append(f"cut {k}: tensor {spec.name!r} was not made by segments [0, {k})")
            if numeric_cuts is not None and k not in numeric_cuts:
                env.update(runners[k].infer(env))
                continue
            sent = {t: env[t] for t in cut.tensors if t in env}
            tail = dict(sent)
            try:
                for i in range(k, n):
                    tail.update(runners[i].infer(tail))
            except BackendError as exc:
                report.problems.append(f"cut {k}: the tail does not run on the cut's tensors ({exc})")
                env.update(runners[k].infer(env))
                continue
            row = {"cut": k, "tensors": len(cut.tensors), "max_abs": 0.0, "max_rel": 0.0}
            for spec in bundle.outputs:
                if spec.name not in tail:
                    report.problems.append(f"cut {k}: output {spec.name!r} is missing")
                    continue
                if k == 0:
                    report.problems += _spec_problems(spec, tail[spec.name], "model output")
                a, r = _errors(ref[spec.name], tail[spec.name])
                report.max_abs[spec.name] = max(report.max_abs.get(spec.name, 0.0), a)
                report.max_rel[spec.name] = max(report.max_rel.get(spec.name, 0.0), r)
                row["max_abs"], row["max_rel"] = max(row["max_abs"], a), max(row["max_rel"], r)
            report.per_cut.append(row)
            env.update(runners[k].infer(env))  # the edge half for cut k+1
    finally:
        for r in runners:
            r.deactivate()
    return report


def _model_path(args, bundle) -> Path:
    from edgesplit.errors import ConfigError
    from edgesplit.graph import file_sha256, load_model

    recorded = bundle.manifest.get("model", {}).get("source_path")
    path = Path(args.model) if args.model else (Path(recorded) if recorded else None)
    if path is None:
        raise ConfigError(f"{bundle.path}: the manifest records no source model; pass --model PATH")
    if not path.is_file():
        raise ConfigError(f"the original model {path} is not there; pass --model PATH")
    want = bundle.manifest.get("model", {}).get("source_sha256")
    model = load_model(path, load_weights=False, check=False)
    if want and file_sha256(path, model) != want:
        raise ConfigError(f"{path} is not the model this bundle was cut from (sha256 differs); pass --model PATH")
    return path


def run(args) -> int:
    from edgesplit.bundle import Bundle
    from edgesplit.errors import ConfigError

    if not args.tolerance >= 0:
        raise ConfigError("--tolerance must be >= 0")
    bundle = Bundle.load(args.bundle)
    model_path = _model_path(args, bundle)
    if args.inputs:
        try:
            with np.load(args.inputs) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--inputs {args.inputs}: {exc}") from exc
        missing = [s.name for s in bundle.inputs if s.name not in feeds]
        if missing:
            raise ConfigError(f"--inputs {args.inputs} lacks {missing}")
    else:
        shapes = dict(bundle.manifest.get("model", {}).get("shapes") or {})
        shapes.update(shapes_from_args(args))
        if args.batch is not None:
            if args.batch < 1:
                raise ConfigError("--batch must be >= 1")
            # The batch asked for wins over the batch a recorded or given input shape carries.
            for s in bundle.inputs:
                given = shapes.get(s.name)
                if s.shape and not isinstance(s.shape[0], int) and isinstance(given, (list, tuple)) and given:
                    shapes[s.name] = [args.batch, *given[1:]]
        feeds = make_inputs(bundle.inputs, shapes, args.batch or 1, args.seed)
    report = verify(bundle, model_path, feeds, args.tolerance, args.runner)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        shapes_text = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        print(f"bundle {bundle.path} ({bundle.num_segments} segments) vs {model_path}")
        print(f"inputs {shapes_text}; split at every cut 0..{bundle.num_segments - 1}")
        for row in report.per_cut:
            print(f"  cut {row['cut']:>3}  {row['tensors']:>3} tensors  max abs {row['max_abs']:.3g}  "
                  f"max rel {row['max_rel']:.3g}")
        for name in report.max_abs:
            print(f"output {name}: max abs error {report.max_abs[name]:.3g}, "
                  f"relative to output scale {report.max_rel[name]:.3g}")
        for p in report.problems:
            print(f"problem: {p}")
        print(("OK" if report.ok else "FAILED") + f" (tolerance {args.tolerance:g})")
    return 0 if report.ok else 1
