"""Quantisation folded into the segments gives the same answer as the numpy int8 codec."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgesplit.codecs import decode, get_codec
from edgesplit.codecs.calibration import RangeCollector
from edgesplit.codecs.fold import QSUFFIX, codes_of, encoded_from_codes, fold_dequantize, fold_quantize, int8_params
from edgesplit.errors import CutError
from edgesplit.runtime import OnnxRuntimeRunner, SegmentChain


@pytest.mark.parametrize("per_channel", [False, True])
def test_folded_head_and_tail_match_the_codec(mlp_bundle, tmp_path, per_channel):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 16)).astype(np.float32)  # 128 values per channel: per channel applies
    with SegmentChain(mlp_bundle, 0, 1) as head, SegmentChain(mlp_bundle, 1, 2) as tail:
        h = head.run({"x": x})["h"]
        col = RangeCollector(percentile=100)
        col.update("h", h)
        entry = col.result()["tensors"]["h"]
        scale, zero, axis = int8_params(entry, per_channel=per_channel)
        head_q = fold_quantize(onnx.load(mlp_bundle.segments[0].path), "h", scale, zero, axis)
        tail_q = fold_dequantize(onnx.load(mlp_bundle.segments[1].path), "h", scale, zero, axis)
        onnx.checker.check_model(head_q, full_check=True)
        onnx.checker.check_model(tail_q, full_check=True)
        onnx.save(head_q, tmp_path / "head_q.onnx")
        onnx.save(tail_q, tmp_path / "tail_q.onnx")
        with OnnxRuntimeRunner(tmp_path / "head_q.onnx") as hq, OnnxRuntimeRunner(tmp_path / "tail_q.onnx") as tq:
            codes = hq.infer({"x": x})["h" + QSUFFIX]
            assert codes.dtype == np.uint8 and codes.shape == h.shape
            codec = get_codec("int8:pc" if per_channel else "int8:pt")
            ref = codec.encode(h, calibration=entry)
            # Same codes as the numpy codec, up to round-half-even vs round-half-up on exact ties.
            assert np.abs(codes.astype(int) - codes_of(ref).astype(int)).max() <= 1
            enc = encoded_from_codes(codes, scale, zero, axis, compress="zstd")
            assert enc.codec == "int8+zstd"
            step = np.broadcast_to(scale, h.shape) if per_channel else scale
            assert np.all(np.abs(decode(enc) - h) <= step * 0.5 + 1e-6)
            assert np.array_equal(codes_of(enc), codes)
            y_folded = tq.infer({"h" + QSUFFIX: codes_of(enc)})["y"]
            y_codec = tail.run({"h": decode(enc)})["y"]
            assert np.allclose(y_folded, y_codec, atol=1e-4)


def test_fold_refuses_unknown_tensors(mlp_bundle):
    with pytest.raises(CutError):
        fold_quantize(onnx.load(mlp_bundle.segments[0].path), "nope", 1.0, 0)
    with pytest.raises(CutError):
        fold_dequantize(onnx.load(mlp_bundle.segments[1].path), "x", 1.0, 0)
