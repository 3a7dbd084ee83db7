"""Block-wise int codecs ("int8:b8"): one scale and zero point per channel per block of rows.

Round trips stay within half a step of each block's own range, the default picks blocks only on
large maps, and decoding refuses hostile block params with CodecError before allocating."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit import protocol as P
from edgesplit.codecs import Encoded, decode, get_codec, validate
from edgesplit.codecs import AUTO_BLOCK, AUTO_FEATURE_GROUP, AUTO_MIN_BLOCK_VALUES
from edgesplit.errors import CodecError, ProtocolError


def _rows_scaled(shape, seed=0):
    """Activations whose magnitude changes along H (as early feature maps do: sky vs texture)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return x * np.geomspace(0.05, 8, shape[-2], dtype=np.float32)[:, None] + np.float32(0.3)


def _block_steps(x: np.ndarray, b: int, bits: int) -> np.ndarray:
    """Half-step bound per element: each block's span (including 0) / (2**bits - 1)."""
    h, w = x.shape[-2:]
    x3 = x.reshape(-1, h, w).astype(np.float64)
    step = np.empty_like(x3)
    for s in range(0, h, b):
        blk = x3[:, s:s + b]
        span = np.maximum(blk.max(axis=(1, 2)), 0) - np.minimum(blk.min(axis=(1, 2)), 0)
        step[:, s:s + b] = (span / (2**bits - 1))[:, None, None]
    return step.reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("block", [1, 3, 8, 64])
@pytest.mark.parametrize("compress", ["", "+zstd"])
def test_block_error_is_within_half_a_block_step(bits, block, compress):
    x = _rows_scaled((2, 5, 19, 11), seed=bits * block)  # 19 rows: the last block is short
    codec = get_codec(f"int{bits}:b{block}{compress}")
    enc = codec.encode(x)
    assert enc.params["block"] == block and "axis" not in enc.params
    groups = 2 * 5 * -(-19 // block)
    assert len(enc.params["zeros"]) == groups and len(enc.params["scales"]) in (2 * groups, 4 * groups)
    validate(enc)
    y = decode(enc)
    assert y.shape == x.shape and y.dtype == np.float32
    # float16 scales are rounded up (relative 2**-10 at most), so the step may grow that much.
    bound = 0.5 * _block_steps(x, block, bits) * (1 + 2**-10) + 1e-6
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)
    # Exact zeros survive, as per channel.
    z = np.maximum(x, 0)
    assert np.all(decode(codec.encode(z))[z == 0] == 0)


def test_blocks_beat_per_channel_when_rows_differ():
    x = _rows_scaled((1, 8, 64, 32), seed=1)
    err = {m: np.abs(decode(get_codec(f"int8:{m}").encode(x)) - x).mean() for m in ("pc", "b8")}
    assert err["b8"] < err["pc"] / 2


def test_default_int8_uses_blocks_on_maps_with_long_enough_rows():
    # Behaviour change (issue 13): every EfficientNet-Lite0 map, 14x14 included, now gets blocks;
    # per channel only where a block would hold < AUTO_MIN_BLOCK_VALUES values.
    big = _rows_scaled((1, 4, 14, 14))
    narrow = AUTO_MIN_BLOCK_VALUES // AUTO_BLOCK - 1
    small = _rows_scaled((1, 4, 64, narrow))
    for spec in ["int8", "int8+zstd", "int8+lz4"]:
        enc = get_codec(spec).encode(big)
        assert enc.params["block"] == AUTO_BLOCK
        assert decode(enc).tobytes() == decode(get_codec(f"int8:b{AUTO_BLOCK}").encode(big)).tobytes()
        enc = get_codec(spec).encode(small)
        assert "block" not in enc.params and enc.params["axis"] == 1
    # Explicit modes are kept: pc and pt never use blocks, nor does a calibrated codec.
    assert "block" not in get_codec("int8:pc").encode(big).params
    assert "block" not in get_codec("int8:pt").encode(big).params
    assert "block" not in get_codec("int8", per_channel=True).encode(big).params
    cal = {"min": -9.0, "max": 9.0, "axis": 1, "min_c": [-9.0] * 4, "max_c": [9.0] * 4}
    assert "block" not in get_codec("int8").encode(big, calibration=cal).params
    assert "block" in get_codec("int8:nocal").encode(big, calibration=cal).params
    # 7x7 maps: one block per channel (per channel with compact scales, not per tensor).
    enc = get_codec("int8").encode(_rows_scaled((1, 6, 7, 7)))
    assert enc.params["block"] == AUTO_BLOCK and len(enc.params["zeros"]) == 6
    # Feature vectors [N, F]: groups of AUTO_FEATURE_GROUP consecutive features.
    enc = get_codec("int8").encode(np.ones((2, 4 * AUTO_FEATURE_GROUP), np.float32))
    assert enc.params["block"] == AUTO_FEATURE_GROUP and len(enc.params["zeros"]) == 2 * 4


@pytest.mark.parametrize("shape", [(3, 100), (100,), (2, 3, 1, 1), (1, 2, 40, 3)])
def test_blocks_on_low_rank_tensors_group_the_last_axis(shape):
    x = _rows_scaled(shape if len(shape) > 1 else (1, 100)).reshape(shape)
    enc = get_codec("int8:b16").encode(x)
    y = decode(enc)
    flat = x.reshape(-1, shape[-1]) if len(shape) < 3 else x.reshape(-1, shape[-2], shape[-1])
    groups = flat.shape[0] * -(-(shape[-1] if len(shape) < 3 else shape[-2]) // 16)
    assert len(enc.params["zeros"]) == groups
    bound = 0.5 * _block_steps(x.reshape(-1, shape[-1], 1) if len(shape) < 3 else x, 16, 8) * (1 + 2**-10)
    assert np.all(np.abs(y - x).reshape(bound.shape) <= bound + 1e-6)


def test_tiny_or_huge_scales_travel_as_float32():
    x = _rows_scaled((1, 2, 16, 16))
    assert len(get_codec("int8:b8").encode(x).params["scales"]) == 2 * 2 * 2  # float16
    for factor in (1e-7, 1e9):
        xs = x * np.float32(factor)
        enc = get_codec("int8:b8").encode(xs)
        assert len(enc.params["scales"]) == 4 * 2 * 2
        assert np.all(np.abs(decode(enc) - xs) <= 0.5 * _block_steps(xs, 8, 8) * (1 + 1e-6) + 1e-30)


def test_block_encodings_cross_the_wire():
    x = _rows_scaled((1, 3, 20, 9))
    enc = get_codec("int8:b8+zstd").encode(x)
    msg = P.decode([bytes(f) for f in P.encode(P.infer("r1", "b", 1, {"t": enc}))])
    assert np.array_equal(decode(msg.tensors["t"]), decode(enc))


def _tamper(enc: Encoded, **params) -> Encoded:
    new = dict(enc.params)
    for k, v in params.items():
        if v is None:
            new.pop(k, None)
        else:
            new[k] = v
    return Encoded(enc.codec, enc.dtype, enc.shape, new, enc.payload)


def test_hostile_block_params_are_refused():
    x = _rows_scaled((1, 4, 16, 8))
    enc = get_codec("int8:b8").encode(x)
    zenc = get_codec("int4:b8+zstd").encode(x)
    groups = 4 * 2
    f16 = np.full(groups, 0.1, "<f2").tobytes()
    bad = [
        _tamper(enc, block=0),
        _tamper(enc, block=-8),
        _tamper(enc, block=True),
        _tamper(enc, block=8.0),
        _tamper(enc, block=1 << 40),
        _tamper(enc, block=4),  # 16 groups expected, 8 sent
        _tamper(enc, scales=f16[:-2]),
        _tamper(enc, scales=f16 + b"\x00"),
        _tamper(enc, scales="x" * 16),
        _tamper(enc, zeros=b"\x00" * (groups + 1)),
        _tamper(enc, zeros=None),
        _tamper(enc, scales=None),
        _tamper(enc, scales=np.full(groups, np.nan, "<f2").tobytes()),
        _tamper(enc, scales=np.full(groups, np.inf, "<f2").tobytes()),
        _tamper(enc, scales=np.full(groups, -0.1, "<f2").tobytes()),
        _tamper(enc, scales=np.zeros(groups, "<f4").tobytes()),
        _tamper(enc, axis=1),  # block and per-channel params mixed
        _tamper(enc, scale=1.0),
        _tamper(zenc, zeros=b"\x10" * groups),  # zero point 16 > int4's 15
        Encoded(enc.codec, enc.dtype, (4, 128), dict(enc.params), enc.payload),  # 32 groups, not 8
        Encoded(enc.codec, enc.dtype, (), dict(enc.params), enc.payload),  # a scalar
        # A huge declared map with no elements: the group count (from the shape) cannot match the
        # header's bytes, and nothing is allocated from it.
        Encoded(enc.codec, enc.dtype, (1 << 20, 1 << 20, 0), dict(enc.params), b""),
    ]
    for e in bad:
        with pytest.raises(CodecError):
            decode(e)
    # Through the protocol: a ProtocolError, never anything else.
    frames = [bytes(f) for f in P.encode(P.infer("r2", "b", 1, {"t": _tamper(enc, block=4)}))]
    with pytest.raises(ProtocolError):
        P.decode(frames)


def test_spec_options():
    assert get_codec("int8:b8+zstd").numeric.mode == "b8"
    assert get_codec("int8").numeric.mode == "auto"
    assert get_codec("int8:pc").numeric.mode == "pc" and get_codec("int8:pt").numeric.mode == "pt"
    assert get_codec("int8", block=4).numeric.mode == "b4"
    for bad in ["int8:b0", "int8:bx", "int8:b8:pt", "int8:pc:b8", "int8:b4:b8", "int8:b999999"]:
        with pytest.raises(CodecError):
            get_codec(bad)
