"""The plane byte stage: position-major codes of small maps with planar prediction.

The default (`int8+delta+zstd`, really `int8+delta+plane+zstd`) sends 7x7 maps' codes
position-major and planar-predicted: the same codes as `int8:b8`, other bytes. Decoding refuses
hostile `plane` and `order` params with CodecError."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from edgesplit.codecs import DEFAULT_CODEC, Encoded, decode, get_codec, validate
from builders import tamper

from edgesplit.codecs.stages import decoder_for
from edgesplit.errors import CodecError


def _smooth(shape, seed=0) -> np.ndarray:
    """Small maps whose neighbouring pixels are close, around a per-channel offset."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(np.cumsum(0.2 * rng.standard_normal(shape), axis=-1), axis=-2)
    return (x + 3 * rng.standard_normal(shape[:-2] + (1, 1))).astype(np.float32)



def _codes(enc: Encoded) -> np.ndarray:
    """The int codes an Encoded carries (byte stages undone), in their wire order."""
    from edgesplit.codecs import wire_codes

    return wire_codes(enc)


@pytest.mark.parametrize("shape", [(1, 4, 7, 7), (3, 5, 7, 7), (2, 3, 8, 8), (1, 2, 1, 6), (1, 3, 5, 1), (2, 6, 3, 8)])
def test_default_sends_the_block_codes_of_small_maps_position_major(shape):
    x = _smooth(shape, seed=sum(shape))
    enc = get_codec(DEFAULT_CODEC).encode(x)
    ref = get_codec("int8:b8").encode(x)
    assert enc.codec == "int8+plane+zstd"
    assert enc.params["order"] == "hw" and enc.params["plane"] == [shape[-2], shape[-1]]
    assert enc.params["scales"] == ref.params["scales"] and enc.params["zeros"] == ref.params["zeros"]
    n, p = int(np.prod(shape[:-2])), shape[-2] * shape[-1]
    # Position-major: the code of image-channel i at pixel k lies at k * N + i.
    assert np.array_equal(_codes(enc).reshape(p, n).T.reshape(-1), np.frombuffer(ref.payload, np.uint8))
    assert np.array_equal(decode(enc), decode(ref))  # the same values, bit for bit


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_plane_keeps_the_dtype(dtype):
    x = _smooth((2, 3, 7, 7)).astype(dtype)
    enc = get_codec(DEFAULT_CODEC).encode(x)
    y = decode(enc)
    assert enc.codec == "int8+plane+zstd" and y.dtype == np.dtype(dtype)
    assert np.array_equal(y, decode(get_codec("int8:b8").encode(x)))


def test_plane_pays_on_smooth_small_maps():
    x = _smooth((1, 64, 7, 7), seed=3)
    plane = get_codec(DEFAULT_CODEC).encode(x).nbytes
    plain = get_codec("int8:b8+zstd").encode(x).nbytes
    assert plane < 0.9 * plain


@pytest.mark.parametrize("spec,shape", [("int8+delta+zstd", (1, 4, 9, 9)), ("int8+delta+zstd", (2, 3, 14, 14)),
                                        ("int8+delta+zstd", (1, 1280)), ("int8+plane+zstd", (1, 16, 56, 56)),
                                        ("int4:p+plane", (1, 4, 7, 7)), ("fp16+plane+zstd", (1, 4, 7, 7)),
                                        ("int8:pt+plane+zstd", (1, 4, 7, 7)), ("int8:pc+plane+zstd", (1, 4, 7, 7))])
def test_plane_is_skipped_off_small_block_maps(spec, shape):
    x = _smooth(shape) if len(shape) >= 3 else np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    enc = get_codec(spec).encode(x)
    assert "plane" not in enc.codec and "order" not in enc.params
    assert np.allclose(decode(enc), x, atol=0.1 * np.abs(x).max())


def test_plane_is_skipped_under_a_calibration_and_for_integer_tensors():
    x = _smooth((1, 4, 7, 7))
    cal = {"min": float(x.min()), "max": float(x.max()), "axis": 1,
           "min_c": x.min(axis=(0, 2, 3)).tolist(), "max_c": x.max(axis=(0, 2, 3)).tolist()}
    enc = get_codec(DEFAULT_CODEC).encode(x, calibration=cal)
    assert "plane" not in enc.codec and "order" not in enc.params
    ids = np.arange(4 * 49, dtype=np.int32).reshape(1, 4, 7, 7)
    enc = get_codec(DEFAULT_CODEC).encode(ids)
    assert enc.codec.startswith("raw") and np.array_equal(decode(enc), ids)


def test_delta_spec_names_the_plane_stage():
    assert get_codec("int8+delta+zstd").spec == "int8+delta+plane+zstd"
    assert get_codec("int8+zstd").spec == "int8+zstd"
    assert get_codec("int8+plane+zstd").spec == "int8+plane+zstd"


@pytest.mark.parametrize("b", [1, 3, 4, 8])
def test_position_major_row_blocks_match_the_usual_order(b):
    x = _smooth((2, 5, 7, 6), seed=b) * np.geomspace(0.1, 10, 7, dtype=np.float32)[:, None]
    enc = get_codec(f"int8:b{b}+plane+zstd").encode(x)
    ref = get_codec(f"int8:b{b}").encode(x)
    assert enc.codec == "int8+plane+zstd"
    assert np.array_equal(decode(enc), decode(ref))


def test_plane_round_trip_is_exact_on_any_codes():
    stage = decoder_for("plane")
    rng = np.random.default_rng(7)
    for h, w, n in [(7, 7, 320), (1, 1, 5), (8, 3, 1), (2, 8, 17)]:
        q = rng.integers(0, 256, h * w * n, dtype=np.uint8)
        params = {"order": "hw"}
        r = stage.encode_shaped(q, (n, h, w), params)
        assert params["plane"] == [h, w] and r.size == q.size
        assert np.array_equal(stage.decode(r, q.size, params), q)


@pytest.mark.parametrize("bad", [None, [7], [7, 7, 1], [0, 7], [7, 9], [7, 7.0], [True, 7], "7x7", [7, -1], [3, 3]])
def test_plane_decoder_refuses_bad_plane_params(bad):
    x = _smooth((1, 4, 7, 7))
    enc = get_codec("int8+plane").encode(x)
    params = {k: v for k, v in enc.params.items() if k != "plane"}
    if bad is not None:
        params["plane"] = bad
    with pytest.raises(CodecError):
        decode(tamper(enc, params=params))


def test_plane_decoder_checks_sizes_before_it_allocates():
    x = _smooth((1, 4, 7, 7))
    enc = get_codec("int8+plane").encode(x)
    payload = bytes(memoryview(enc.payload))
    for bad in [payload[:-1], payload + b"\0", b""]:
        with pytest.raises(CodecError):
            decode(tamper(enc, payload=bad))
    with pytest.raises(CodecError):
        decode(tamper(enc, shape=(1 << 20, 4, 7, 7)))
    with pytest.raises(CodecError):
        decoder_for("plane").decode(b"\0" * 48, 49, {"plane": [7, 7]})
    n = 4 * 49
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\1" * (n + 1))
    with pytest.raises(CodecError):
        decode(tamper(get_codec("int8+plane+zstd").encode(x), payload=frame))


@pytest.mark.parametrize("change", [
    {"order": "wh"}, {"order": 1}, {"order": None}, {"packed": True},
])
def test_int_decoder_refuses_bad_order_params(change):
    x = _smooth((1, 4, 7, 7))
    enc = get_codec("int8+plane").encode(x)
    with pytest.raises(CodecError):
        decode(tamper(enc, params={**enc.params, **change}))


@pytest.mark.parametrize("shape", [(1, 4, 9, 9), (1, 4, 7, 9), (4, 49), (196,)])
def test_int_decoder_refuses_position_major_codes_off_small_maps(shape):
    x = _smooth((1, 4, 7, 7))
    enc = get_codec("int8").encode(x.reshape(1, 4, 7, 7))
    n = int(np.prod(shape))
    params = {**enc.params, "order": "hw"}
    bad = Encoded("int8", "float32", shape, params, np.zeros(n, np.uint8).tobytes())
    with pytest.raises(CodecError):
        decode(bad)


def test_order_goes_only_with_block_params():
    x = _smooth((1, 4, 7, 7))
    for spec in ["int8:pt", "int8:pc:f1"]:
        enc = get_codec(spec).encode(x)
        with pytest.raises(CodecError):
            decode(tamper(enc, params={**enc.params, "order": "hw"}))


def test_plane_decodes_any_bytes_of_the_right_size_to_finite_values():
    x = _smooth((2, 4, 7, 7))
    enc = get_codec("int8+plane").encode(x)
    hostile = np.random.default_rng(9).integers(0, 256, enc.nbytes, dtype=np.uint8).tobytes()
    bad = tamper(enc, payload=hostile)
    validate(bad)
    y = decode(bad)
    assert y.shape == x.shape and np.all(np.isfinite(y))


def test_plane_takes_no_options():
    with pytest.raises(CodecError):
        get_codec("int8+plane:2+zstd")
