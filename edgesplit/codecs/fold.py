"""Fold int8 quantisation into the segments: QuantizeLinear at the end of the head, DequantizeLinear
at the start of the tail, so the accelerator (TensorRT, CUDA, or ONNX Runtime's kernels) does the
work instead of numpy on the edge CPU.

With a calibration the scale is fixed, so the head can emit uint8 codes directly:

    head_q = fold_quantize(head, "t", scale, zero)        # output "t" becomes uint8 "t__q"
    enc = encoded_from_codes(codes, scale, zero)          # wire form; the int8 codec decodes it
    tail_q = fold_dequantize(tail, "t", scale, zero)      # input "t__q" (uint8) replaces "t"
    codes = codes_of(enc)                                 # feed the folded tail without dequantising

ONNX QuantizeLinear rounds half to even where the numpy codec rounds half up: codes may differ
by one on exact ties, both decode with the same error bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgesplit.codecs._bytes import ZstdStage, Lz4Stage
from edgesplit.codecs._codec import Encoded, _plan
from edgesplit.errors import CodecError, CutError

__all__ = ["QSUFFIX", "fold_quantize", "fold_dequantize", "encoded_from_codes", "codes_of", "int8_params"]

QSUFFIX = "__q"


def int8_params(calibration: dict, per_channel: bool = False) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(scale float32, zero point uint8, axis or None) from a calibration entry, like the int8 codec."""
    if per_channel and "min_c" in calibration:
        lo = np.asarray(calibration["min_c"], np.float32)
        hi = np.asarray(calibration["max_c"], np.float32)
        axis = int(calibration.get("axis", 1))
    else:
        lo = np.asarray(calibration["min"], np.float32)
        hi = np.asarray(calibration["max"], np.float32)
        axis = None
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 255).astype(np.uint8)
    return scale, zero, axis


def _qparams(name: str, scale, zero) -> list[TensorProto]:
    return [numpy_helper.from_array(np.asarray(scale, np.float32), f"{name}{QSUFFIX}_scale"),
            numpy_helper.from_array(np.asarray(zero, np.uint8), f"{name}{QSUFFIX}_zero")]


def _axis_attr(axis: int | None) -> dict[str, Any]:
    return {} if axis is None else {"axis": int(axis)}


def _replace_with_codes(values, i: int, qname: str) -> None:
    """Replace graph input/output `values[i]` by a uint8 value `qname` of the same shape."""
    old = values[i]
    new = helper.make_tensor_value_info(qname, TensorProto.UINT8, None)
    new.type.tensor_type.shape.CopyFrom(old.type.tensor_type.shape)
    values.remove(old)
    values.insert(i, new)


def fold_quantize(head: onnx.ModelProto, tensor: str, scale, zero, axis: int | None = None) -> onnx.ModelProto:
    """A copy of `head` whose output `tensor` is replaced by uint8 codes named tensor + "__q"."""
    model = onnx.ModelProto()
    model.CopyFrom(head)
    outs = [o.name for o in model.graph.output]
    if tensor not in outs:
        raise CutError(f"{tensor!r} is not an output of this segment (outputs: {outs})")
    qname = tensor + QSUFFIX
    model.graph.initializer.extend(_qparams(tensor, scale, zero))
    model.graph.node.append(helper.make_node(
        "QuantizeLinear", [tensor, f"{tensor}{QSUFFIX}_scale", f"{tensor}{QSUFFIX}_zero"], [qname],
        name=f"{tensor}{QSUFFIX}_quantize", **_axis_attr(axis)))
    _replace_with_codes(model.graph.output, outs.index(tensor), qname)
    _need_opset(model, 13 if axis is not None else 10)
    return model


def fold_dequantize(tail: onnx.ModelProto, tensor: str, scale, zero, axis: int | None = None) -> onnx.ModelProto:
    """A copy of `tail` that reads uint8 codes `tensor` + "__q" and dequantises them itself."""
    model = onnx.ModelProto()
    model.CopyFrom(tail)
    ins = [x.name for x in model.graph.input]
    if tensor not in ins:
        raise CutError(f"{tensor!r} is not an input of this segment (inputs: {ins})")
    qname = tensor + QSUFFIX
    _replace_with_codes(model.graph.input, ins.index(tensor), qname)
    model.graph.initializer.extend(_qparams(tensor, scale, zero))
    node = helper.make_node(
        "DequantizeLinear", [qname, f"{tensor}{QSUFFIX}_scale", f"{tensor}{QSUFFIX}_zero"], [tensor],
        name=f"{tensor}{QSUFFIX}_dequantize", **_axis_attr(axis))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([node, *nodes])
    _need_opset(model, 13 if axis is not None else 10)
    return model


def _need_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            if op.version < version:
                raise CodecError(f"folding needs opset >= {version}; the segment has {op.version}")
            return


def encoded_from_codes(codes: np.ndarray, scale, zero, axis: int | None = None, dtype: str = "float32",
                       compress: str | None = None) -> Encoded:
    """Wrap uint8 codes from a folded head as an int8 Encoded (optionally + "zstd" or "lz4")."""
    q = np.ascontiguousarray(codes, dtype=np.uint8)
    scale = np.asarray(scale, np.float32)
    zero = np.asarray(zero, np.uint8)
    if axis is None:
        params: dict[str, Any] = {"bits": 8, "scale": float(scale), "zero": int(zero)}
    else:
        params = {"bits": 8, "axis": int(axis) % q.ndim, "scales": scale.astype("<f4").tobytes(),
                  "zeros": zero.tobytes()}
    params["packed"] = False
    payload: Any = memoryview(q.reshape(-1))
    codec = "int8"
    if compress:
        stage = {"zstd": ZstdStage, "lz4": Lz4Stage}[compress]()
        payload = stage.encode(payload, 1, params)
        codec = f"int8+{compress}"
    return Encoded(codec, dtype, tuple(int(d) for d in q.shape), params, payload)


def codes_of(enc: Encoded) -> np.ndarray:
    """The uint8 codes of an int8 Encoded (byte stages undone, not dequantised): a folded tail's input."""
    numeric, stages, size = _plan(enc)
    if numeric.name != "int8":
        raise CodecError(f"codes_of needs an int8 codec, got {enc.codec!r}")
    buf = enc.payload
    for stage in reversed(stages):
        buf = stage.decode(buf, size, enc.params)
    return np.frombuffer(buf, np.uint8).reshape(enc.shape)

