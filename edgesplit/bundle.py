"""The bundle on disk: a manifest and the segment files of one partitioned model.

Layout (DESIGN.md, "Bundle format")::

    BUNDLE/manifest.json
    BUNDLE/segments/<i>.onnx   (+ external data files beside them when needed)

The bundle id is a content hash over the manifest (without its ``id``) and every file under
``segments/``, so two servers holding the same id hold the same bytes. Every file a segment reads
(its .onnx, and any external data file the .onnx names) must resolve inside ``segments/``: no
absolute path, no "..", no symlink that leaves it. So the id covers everything that runs, and a
hostile manifest cannot make a server read or execute a file of its choice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from edgesplit.errors import BundleError

__all__ = ["FORMAT", "TensorSpec", "Segment", "Cut", "StateSpec", "Bundle", "write_bundle", "update_manifest"]

FORMAT = "edgesplit-bundle/1"
MANIFEST = "manifest.json"
SEGMENT_DIR = "segments"

# The dtypes a bundle tensor (and so a wire tensor) may have.
DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
     "int64", "uint64", "bool"}
)


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of a tensor; a str dim is symbolic (e.g. "N")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def bytes_per_sample(self) -> int:
        """Bytes with every symbolic dim taken as 1 (batch = 1)."""
        n = 1
        for d in self.shape:
            n *= d if isinstance(d, int) and d >= 0 else 1
        return n * self.itemsize


@dataclass(frozen=True)
class Segment:
    """Segment `index` of the chain: an ONNX file and the tensors it reads and makes."""

    index: int
    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Cut:
    """Cut `index` lies between segment index-1 and segment index.

    `tensors` are every tensor the segments from `index` on (or the model's outputs) need
    from before the cut; `specs` gives their dtype and shape.
    """

    index: int
    tensors: tuple[str, ...]
    bytes_per_sample: int
    specs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class StateSpec:
    """A state pair: model output `output` feeds model input `input` at the next step.

    Segment `segment` reads the input and makes the output, so whoever runs that segment keeps
    the state (the edge for its head, the cloud worker for its tail). `spec` is the input's
    dtype and shape; a fresh session starts from zeros of it (see initial).
    """

    output: str
    input: str
    segment: int
    spec: TensorSpec

    def initial(self, bound: dict[str, int]) -> np.ndarray:
        """Zeros of the input's shape: a dim the feeds bound (the batch) takes its size, any
        other symbolic dim (a past sequence length) starts at 0."""
        dims = [d if isinstance(d, int) and d >= 0 else int(bound.get(str(d), 0)) for d in self.spec.shape]
        return np.zeros(dims, dtype=self.spec.dtype)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def contained_path(root: Path, rel: Any, what: str) -> Path:
    """`root / rel`, refused unless `rel` is a relative path that stays inside `root`.

    Checked on the text first (absolute paths, "..", empty parts, NUL), then on the resolved
    path, so a symlink anywhere on the way that leads out of `root` is refused too.
    """
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        raise BundleError(f"{root}: {what} {rel!r} is not a relative path")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise BundleError(f"{root}: {what} {rel!r} leaves the bundle (absolute path or '..')")
    full = root / rel
    try:
        real, real_root = full.resolve(strict=False), root.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise BundleError(f"{root}: {what} {rel!r} cannot be resolved ({exc})") from exc
    if not real.is_relative_to(real_root):
        raise BundleError(f"{root}: {what} {rel!r} resolves to {real}, outside the bundle")
    return full


def external_data_files(onnx_path: Path) -> list[str]:
    """The external data locations an ONNX file names (weights stay on disk; subgraphs included)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise BundleError(f"{onnx_path}: not a readable ONNX file ({exc})") from exc
    found: list[str] = []

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from tensors(attr.g)
                for g in attr.graphs:
                    yield from tensors(g)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc not in found:
                found.append(loc)
    return found


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def compute_id(path: Path, manifest: dict[str, Any]) -> str:
    """sha256 over the manifest without its id and every file under segments/."""
    h = hashlib.sha256()
    h.update(_canonical({k: v for k, v in manifest.items() if k != "id"}))
    seg_dir = path / SEGMENT_DIR
    for f in _files_under(seg_dir) if seg_dir.is_dir() else []:
        if f.is_symlink():  # hashing what a link points to is fine only while it stays inside
            contained_path(seg_dir, f.relative_to(seg_dir).as_posix(), "file")
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A loaded bundle. `Bundle.load(path)` checks the format, the files and the id."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.segment_bytes: tuple[int, ...] = ()  # per segment, set by load()
        self.manifest = manifest
        try:
            self.id: str = manifest["id"]
            model = manifest["model"]
            self.name: str = model.get("name", path.name)
            self.inputs = tuple(TensorSpec.from_json(t) for t in model["inputs"])
            self.outputs = tuple(TensorSpec.from_json(t) for t in model["outputs"])
            self.segments = tuple(
                Segment(i, path / s["file"], tuple(s["inputs"]), tuple(s["outputs"]))
                for i, s in enumerate(manifest["segments"])
            )
            self.state = tuple(
                StateSpec(str(e["output"]), str(e["input"]), int(e["segment"]), TensorSpec.from_json(e["spec"]))
                for e in manifest.get("state", ()))
            self._cuts = {
                int(c["index"]): Cut(
                    int(c["index"]),
                    tuple(c["tensors"]),
                    int(c["bytes_per_sample"]),
                    tuple(TensorSpec.from_json(s) for s in c.get("specs", [])),
                )
                for c in manifest["cuts"]
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path / MANIFEST}: malformed manifest ({exc!r})") from exc
        if not self.segments:
            raise BundleError(f"{path / MANIFEST}: the bundle has no segments")
        for st in self.state:
            if not 0 <= st.segment < len(self.segments) or st.input not in self.segments[st.segment].inputs \
                    or st.output not in self.segments[st.segment].outputs:
                raise BundleError(f"{path / MANIFEST}: state {st.output} -> {st.input} is not kept by a segment "
                                  f"that reads and makes it (segment {st.segment})")
        if sorted(self._cuts) != list(range(1, len(self.segments))):
            raise BundleError(
                f"{path / MANIFEST}: {len(self.segments)} segments need cuts 1..{len(self.segments) - 1}, "
                f"found {sorted(self._cuts)}"
            )

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        """Load a bundle directory; with `verify`, recompute the content hash and compare."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory")
        if not mpath.is_file():
            raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath}: unreadable manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise BundleError(f"{mpath}: format {got!r} is not {FORMAT!r}")
        bundle = cls(path, manifest)
        seg_root = path / SEGMENT_DIR
        for seg, entry in zip(bundle.segments, manifest["segments"]):
            rel = entry["file"]
            if not (isinstance(rel, str) and rel.startswith(SEGMENT_DIR + "/")):
                raise BundleError(f"{path}: segment file {rel!r} is not under {SEGMENT_DIR}/")
            contained_path(seg_root, rel[len(SEGMENT_DIR) + 1:], "segment file")
            if not seg.path.is_file():
                raise BundleError(f"{path}: segment file {rel} is missing")
        if verify:
            actual = compute_id(path, manifest)
            if actual != bundle.id:
                raise BundleError(
                    f"{path}: content does not match the bundle id (manifest says {bundle.id[:12]}, "
                    f"files hash to {actual[:12]}): the bundle was modified or is incomplete"
                )
        sizes = []
        for seg, entry in zip(bundle.segments, manifest["segments"]):
            rel = entry["file"]
            size = seg.path.stat().st_size
            # External data is resolved relative to the segment's own directory (ONNX's rule).
            base = seg.path.parent.relative_to(seg_root).as_posix()
            for loc in external_data_files(seg.path):
                data = contained_path(seg_root, loc if base == "." else f"{base}/{loc}",
                                      f"external data of {rel}")
                if not data.is_file():
                    raise BundleError(f"{path}: external data file {loc!r} of {rel} is missing")
                size += data.stat().st_size
            sizes.append(size)
        bundle.segment_bytes = tuple(sizes)
        return bundle

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def cuts(self) -> tuple[Cut, ...]:
        """The interior cuts 1..n-1, as written in the manifest."""
        return tuple(self._cuts[k] for k in sorted(self._cuts))

    def cut(self, k: int) -> Cut:
        """Cut k for k in 0..n: 0 ships the model inputs, n ships the model outputs."""
        n = self.num_segments
        if k == 0:
            return Cut(0, tuple(t.name for t in self.inputs),
                       sum(t.bytes_per_sample() for t in self.inputs), self.inputs)
        if k == n:
            return Cut(n, tuple(t.name for t in self.outputs),
                       sum(t.bytes_per_sample() for t in self.outputs), self.outputs)
        if k not in self._cuts:
            raise BundleError(f"bundle {self.name} has no cut {k} (valid: 0..{n})")
        return self._cuts[k]

    def weight_bytes(self, start: int = 0, stop: int | None = None) -> int:
        """Bytes on disk of segments [start, stop) (each ONNX file with its external data): what
        running them holds in memory, about (a worker's memory budget is counted in these)."""
        return sum(self.segment_bytes[start:self.num_segments if stop is None else stop])

    def state_of(self, start: int, stop: int) -> tuple[StateSpec, ...]:
        """The state pairs kept by segments [start, stop)."""
        return tuple(st for st in self.state if start <= st.segment < stop)

    def get(self, key: str, default: Any = None) -> Any:
        """An optional manifest field (e.g. "calibration", "profiles")."""
        return self.manifest.get(key, default)

    def __repr__(self) -> str:
        return f"Bundle({self.name!r}, id={self.id[:12]}, segments={self.num_segments})"


def save_segment(model, path: Path, external_threshold: int = 1 << 30) -> None:
    """Save one segment; weights go to an external file when the proto would be too large."""
    import onnx

    big = sum(t.ByteSize() if not t.external_data else 0 for t in model.graph.initializer)
    if big > external_threshold or any(t.external_data for t in model.graph.initializer):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _is_bundle_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_bundle(
    out: str | os.PathLike,
    model: dict[str, Any],
    segments: Sequence[tuple[Any, Iterable[str], Iterable[str]]],
    cuts: Sequence[Cut],
    extra: dict[str, Any] | None = None,
) -> Bundle:
    """Write a bundle directory atomically and return it loaded.

    Args:
        out: the bundle directory. If it exists it must be a bundle; it is replaced.
        model: the manifest's "model" object (name, source_sha256, inputs, outputs).
        segments: (onnx.ModelProto, inputs, outputs) per segment, in chain order.
        cuts: the interior cuts 1..n-1.
        extra: more manifest fields (calibration, profiles, ...).
    """
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_bundle_dir(out))):
        raise BundleError(f"{out}: exists and is not a bundle; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / SEGMENT_DIR).mkdir()
        seg_entries = []
        for i, (proto, ins, outs) in enumerate(segments):
            rel = f"{SEGMENT_DIR}/{i}.onnx"
            save_segment(proto, tmp / rel)
            seg_entries.append({"file": rel, "inputs": list(ins), "outputs": list(outs)})
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "model": model,
            "segments": seg_entries,
            "cuts": [
                {"index": c.index, "tensors": list(c.tensors), "bytes_per_sample": c.bytes_per_sample,
                 "specs": [s.to_json() for s in c.specs]}
                for c in cuts
            ],
            **(extra or {}),
        }
        manifest["id"] = compute_id(tmp, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        Bundle.load(tmp)  # refuse to publish what we could not read back
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(out, verify=False)  # the same files were verified in tmp a moment ago


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def update_manifest(path: str | os.PathLike, **fields: Any) -> Bundle:
    """Add or replace manifest fields (calibration, profiles) and recompute the id."""
    bundle = Bundle.load(path)
    manifest = dict(bundle.manifest)
    manifest.update(fields)
    manifest["id"] = compute_id(bundle.path, manifest)
    tmp = bundle.path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, bundle.path / MANIFEST)
    return Bundle.load(bundle.path)
