"""Loading ONNX files by path: external data, large models, and one clear error for bad files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from edgesplit.errors import ModelError

# A serialized proto above this cannot be checked or inferred in memory (protobuf's 2 GiB limit).
PROTO_LIMIT = (1 << 31) - (1 << 20)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else text
    return line if len(line) <= 300 else line[:297] + "..."


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in _all_tensors(model))


def _all_tensors(model: onnx.ModelProto):
    # Only top-level and subgraph initializers and Constant attributes can be external.
    return external_data_helper._get_all_tensors(model)


def _check_external_files(model: onnx.ModelProto, path: Path) -> None:
    base = path.parent
    for t in _all_tensors(model):
        if not external_data_helper.uses_external_data(t):
            continue
        info = external_data_helper.ExternalDataInfo(t)
        loc = Path(info.location)
        if loc.is_absolute() or ".." in loc.parts:
            raise ModelError(f"{path}: tensor {t.name!r} points outside the model directory ({info.location})")
        f = base / loc
        if not f.is_file():
            raise ModelError(f"{path}: external data file {info.location!r} of tensor {t.name!r} is missing")
        if f.is_symlink():
            raise ModelError(f"{path}: external data file {info.location!r} is a symbolic link, which onnx "
                             "refuses to read; copy the file next to the model")
        end = (info.offset or 0) + (info.length or 0)
        if info.length and os.path.getsize(f) < end:
            raise ModelError(f"{path}: external data file {info.location!r} is truncated "
                             f"(tensor {t.name!r} needs bytes up to {end})")


def _check_initializer_sizes(model: onnx.ModelProto, path: Path) -> None:
    import numpy as np
    from onnx import helper

    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t) or not t.raw_data:
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except Exception:  # string, 4-bit and float8 types: left to the checker
            continue
        if t.data_type in (onnx.TensorProto.BFLOAT16,):
            itemsize = 2
        numel = 1
        for d in t.dims:
            numel *= d
        if len(t.raw_data) != numel * itemsize:
            raise ModelError(f"{path}: initializer {t.name!r} holds {len(t.raw_data)} bytes, its shape "
                             f"{list(t.dims)} needs {numel * itemsize} (truncated or corrupt)")


def load_model(path: str | os.PathLike, load_weights: bool = True, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model by path.

    Args:
        path: the .onnx file; external data files are looked up beside it.
        load_weights: read external data into the proto. Leave False to analyse the graph of
            a large model without holding its weights (initializers keep their dims and type).
        check: run onnx.checker on the graph (by path when the model has external data).

    Raises:
        ModelError: the file is missing, not ONNX, truncated, or fails the checker.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file")
    if p.is_dir():
        raise ModelError(f"{p}: is a directory, not an ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise ModelError(f"{p}: not an ONNX model, or truncated ({_first_line(exc)})") from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelError(f"{p}: not an ONNX model (no ir_version, graph or opset_import)")
    if not model.graph.output:
        raise ModelError(f"{p}: the graph has no outputs (not an ONNX model, or truncated)")
    external = has_external_data(model)
    if external:
        _check_external_files(model, p)
    if check:
        _check_initializer_sizes(model, p)
        try:  # the graph's structure; weights stay out of the (serializing) checker
            onnx.checker.check_model(weightless(model))
        except Exception as exc:
            raise ModelError(f"{p}: fails the ONNX checker, truncated or invalid ({_first_line(exc)})") from exc
    if load_weights and external:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise ModelError(f"{p}: cannot read its external data ({_first_line(exc)})") from exc
    return model


def load_tensor_data(tensor: onnx.TensorProto, base_dir: Path) -> None:
    """Pull the external data of one initializer into the proto (no-op for embedded ones)."""
    if external_data_helper.uses_external_data(tensor):
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
        except Exception as exc:  # onnx raises ValidationError, OSError, ValueError
            raise ModelError(f"cannot read the external data of {tensor.name!r} in {base_dir} "
                             f"({_first_line(exc)})") from exc
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def file_sha256(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> str:
    """sha256 of the model file followed by its external data files (sorted by name)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p]
    if model is not None:
        locs = sorted({external_data_helper.ExternalDataInfo(t).location for t in _all_tensors(model)
                       if external_data_helper.uses_external_data(t)})
        files += [p.parent / loc for loc in locs]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# Initializers with at most this many elements keep their values in a weightless copy (Reshape
# shapes, axes); bigger ones become typed inputs so inference does not copy the weights.
KEEP_VALUES = 4096


def weightless(model: onnx.ModelProto, value_info: bool = True) -> onnx.ModelProto:
    """A copy of `model` without its large weights (they become graph inputs of the same type),
    for the checker and shape inference, which serialise the model."""
    m = onnx.ModelProto()
    m.ir_version = max(model.ir_version, 4)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    if value_info:
        g.value_info.extend(src.value_info)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        small = numel <= KEEP_VALUES and t.data_location != onnx.TensorProto.EXTERNAL
        if small:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    g.sparse_initializer.extend(src.sparse_initializer)
    return m
