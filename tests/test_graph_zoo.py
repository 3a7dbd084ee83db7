"""The partitioner on graphs written by others: models/zoo/* (and /work/tvzoo/*.onnx if present).

For every model: candidate cuts, a bundle cut at every narrow cut and one cut at every closed
cut, each segment through the full checker (partition does that), and verification that
splitting at each cut reproduces the original outputs in ONNX Runtime.

Run as a script for the table in docs/partitioning.md:
    .venv/bin/python tests/test_graph_zoo.py [MORE.onnx or DIR ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "models" / "zoo"


def zoo_models() -> list[tuple[str, Path, dict]]:
    """(name, path, shapes for verification) of every zoo model found."""
    out = []
    meta = {}
    if (ZOO / "zoo.json").is_file():
        meta = json.loads((ZOO / "zoo.json").read_text())
    for name, entry in sorted(meta.items()):
        path = ZOO / entry["file"]
        if path.is_file():
            shapes = {i["name"]: tuple(i["check_shape"]) for i in entry.get("inputs", []) if "check_shape" in i}
            out.append((name, path, shapes))
    for path in sorted((ROOT / "models").glob("*.onnx")):
        if path.stem not in STATEFUL:
            out.append((path.stem, path, {}))
    return out


# Models whose outputs feed their inputs at the next step: a plain split of one step is not what
# they are for; tests/test_state.py splits them with their state pairs and steps them.
STATEFUL = {"gpt_decoder", "gru_stack"}


def exercise(path: Path, shapes: dict, tmp: Path, every: bool = True) -> dict:
    """Inspect, partition (narrow chain, every-cut chain) and verify one model; a result row."""
    from edgesplit.bundle import Bundle
    from edgesplit.cli.verify_cmd import make_inputs, verify
    from edgesplit.graph import candidate_cuts, partition

    from edgesplit.graph import load_model

    row: dict = {"model": path.name}
    # bytes per sample at batch 1 (a symbolic axis 0), the other dims as in the check shapes
    dims = {vi.name: vi.type.tensor_type.shape.dim for vi in load_model(path, load_weights=False, check=False).graph.input}
    byte_shapes = {k: ((1,) if k in dims and dims[k] and dims[k][0].dim_param else tuple(v[:1])) + tuple(v[1:])
                   for k, v in shapes.items()}
    t0 = time.perf_counter()
    narrow = candidate_cuts(path, shapes=byte_shapes or None)
    row["inspect_s"] = round(time.perf_counter() - t0, 3)
    closed = candidate_cuts(path, shapes=byte_shapes or None, narrow=False)
    row["closed_cuts"], row["narrow_cuts"] = len(closed), len(narrow)
    row["max_tensors_narrow"] = max((len(c.tensors) for c in narrow), default=0)
    row["narrow"] = [(c.head_nodes, len(c.tensors), c.bytes_per_sample) for c in narrow]
    errors = []
    for label, cuts in (("narrow", narrow), ("every", closed if every else [])):
        if not cuts:
            continue
        t0 = time.perf_counter()
        bundle = partition(path, [c.tensors for c in cuts], tmp / f"{path.stem}-{label}", shapes=byte_shapes or None)
        row[f"partition_{label}_s"] = round(time.perf_counter() - t0, 3)
        bundle = Bundle.load(bundle.path)
        feeds = make_inputs(bundle.inputs, shapes, batch=2)
        n = bundle.num_segments
        # bundles of hundreds of segments: run about 30 of the cuts; every cut is checked statically
        numeric = None if n <= 60 else set(range(0, n, max(1, n // 30)))
        report = verify(bundle, path, feeds, numeric_cuts=numeric)
        row[f"{label}_max_rel"] = max(report.max_rel.values())
        row[f"{label}_ok"] = report.ok
        errors += report.problems
        if label == "narrow":
            seg = sum(f.stat().st_size for f in (bundle.path / "segments").iterdir())
            src = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
            row["size_ratio"] = round(seg / src, 4)
    row["problems"] = errors
    return row


@pytest.mark.slow
@pytest.mark.parametrize("name, path, shapes", zoo_models(), ids=[m[0] for m in zoo_models()])
def test_zoo_model(name, path, shapes, tmp_path):
    row = exercise(path, shapes, tmp_path, every=len(zoo_models()) < 50)
    assert row["narrow_cuts"] >= 1
    assert not row["problems"], row["problems"]
    assert row.get("narrow_ok", True) and row.get("every_ok", True), row


def main(argv: list[str]) -> int:
    import tempfile

    models = [] if "--only" in sys.argv else zoo_models()
    for arg in argv:
        p = Path(arg)
        index = json.loads((p / "index.json").read_text()) if (p / "index.json").is_file() else {}
        if index:
            for name, entry in index.items():
                models.append((name, p / entry["file"], {k: tuple(v) for k, v in entry.get("check_inputs", {}).items()}))
        else:
            for f in sorted(p.glob("*.onnx")) if p.is_dir() else [p]:
                models.append((f.stem, f, {}))
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, shapes in models:
            t0 = time.perf_counter()
            try:
                row = exercise(path, shapes, Path(tmp), every="--narrow-only" not in sys.argv)
            except Exception as exc:  # a report of what breaks, not a test
                row = {"model": path.name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                failures += 1
            row["total_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({k: v for k, v in row.items() if k != "narrow"}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--")]))
