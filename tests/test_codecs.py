"""Codecs: lossless stages round-trip bit-exactly, lossy ones stay within their error bound,
and decoding refuses inconsistent input with CodecError before allocating."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.bundle import DTYPES as BUNDLE_DTYPES
from edgesplit.codecs import DTYPES, decode, get_codec, validate
from edgesplit.codecs import pack_bits, unpack_bits
from builders import tamper

from edgesplit.errors import CodecError

LOSSLESS = ["raw", "zstd", "lz4", "raw+shuffle+zstd", "raw+lz4", "shuffle+lz4", "zstd:3", "raw+pred+zstd",
            "pred+lz4", "zstd:3:mm7", "raw+delta+zstd", "delta+lz4"]
LOSSY = ["fp16", "bf16", "int8", "int8:pc", "int6", "int5", "int4", "int4:pc", "int3", "int2",
         "int8+zstd", "int8+lz4", "fp16+lz4", "fp16+zstd", "bf16+zstd", "int4:pc+zstd", "int6:u+zstd",
         "int4:u+lz4", "int6:pt+pred+zstd:3:mm7", "int8+pred+lz4", "int4:p+pred+zstd", "int8:b8",
         "int8:b3+zstd", "int4:b2", "int8:b1+pred+zstd", "int8+delta+zstd", "int8:pt+delta+lz4",
         "int4:u+delta+zstd", "int8:pc:f4+zstd", "int8:f2"]


def _sample(dtype: str, shape, rng) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) < 0.3
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.standard_normal(shape) * 3).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


def test_dtypes_match_the_bundle():
    assert DTYPES == BUNDLE_DTYPES


@pytest.mark.parametrize("spec", LOSSLESS)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_lossless_round_trip_is_bit_exact(spec, dtype):
    rng = np.random.default_rng(hash((spec, dtype)) % 2**32)
    codec = get_codec(spec)
    for shape in [(2, 3, 5, 7), (0,), (4, 0, 3), (), (1,), (257,)]:
        x = _sample(dtype, shape, rng)
        enc = codec.encode(x)
        validate(enc)
        y = decode(enc)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("spec", LOSSLESS + LOSSY)
def test_non_contiguous_and_big_endian_inputs(spec):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((4, 6, 8, 10)).astype(np.float32)
    for x in [base[:, ::2, :, 1::3], base.transpose(0, 3, 1, 2), base.astype(">f4")]:
        y = get_codec(spec).decode(get_codec(spec).encode(x))
        assert y.shape == x.shape and y.dtype == np.float32
        tol = 0 if spec in LOSSLESS else 0.7 * (np.ptp(x) + 1e-6)
        assert np.abs(y - x).max() <= tol


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int_error_is_within_half_a_step(bits, per_channel):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((2, 16, 9, 8)).astype(np.float32) * np.linspace(0.1, 5, 16)[None, :, None, None]
    codec = get_codec(f"int{bits}", per_channel=per_channel, packed=True)
    enc = codec.encode(x)
    y = codec.decode(enc)
    if per_channel:
        reduce = (0, 2, 3)
        span = np.maximum(x.max(reduce), 0) - np.minimum(x.min(reduce), 0)
        step = (span / (2**bits - 1))[None, :, None, None]
    else:
        step = (max(x.max(), 0) - min(x.min(), 0)) / (2**bits - 1)
    assert np.all(np.abs(y - x) <= step * 0.5 + 1e-5)
    assert enc.nbytes == (x.size * bits + 7) // 8
    # Exact zeros survive (ReLU outputs are mostly zeros, and must stay zeros).
    z = np.maximum(x, 0)
    assert np.all(codec.decode(codec.encode(z))[z == 0] == 0)


def test_per_channel_beats_per_tensor_on_uneven_channels():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 32, 16, 8)).astype(np.float32) * np.geomspace(0.01, 10, 32)[None, :, None, None]
    err_pt = np.abs(get_codec("int4:pt").decode(get_codec("int4:pt").encode(x)) - x).mean()
    err_pc = np.abs(get_codec("int4").decode(get_codec("int4").encode(x)) - x).mean()
    assert err_pc < err_pt / 2


def test_calibration_ranges_are_used_and_clip():
    x = np.array([[-1.0, 0.0, 0.5, 2.0, 100.0]], np.float32)
    codec = get_codec("int8")
    enc = codec.encode(x, calibration={"min": -1.0, "max": 2.0})
    y = codec.decode(enc)
    assert y[0, 4] == pytest.approx(2.0, abs=0.02)  # the outlier is clipped to the calibrated range
    assert np.abs(y[0, :4] - x[0, :4]).max() <= 3.0 / 255
    assert enc.params["scale"] == pytest.approx(3.0 / 255)
    pc = get_codec("int8:pc").encode(np.ones((1, 2, 128), np.float32),
                                      calibration={"min": 0, "max": 9, "min_c": [0, 0], "max_c": [1, 4]})
    assert np.frombuffer(pc.params["scales"], "<f4") == pytest.approx([1 / 255, 4 / 255])
    assert get_codec("int8:nocal").encode(x, calibration={"min": -1.0, "max": 2.0}).params["scale"] == \
        pytest.approx(101 / 255)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    for n in [0, 1, 2, 3, 4, 5, 7, 8, 9, 1001]:
        q = rng.integers(0, 2**bits, n, dtype=np.uint8)
        packed = pack_bits(q, bits)
        assert packed.size == (n * bits + 7) // 8
        assert np.array_equal(unpack_bits(packed, bits, n), q)


def test_lossy_stage_leaves_integer_tensors_exact():
    ids = np.arange(-5, 5, dtype=np.int64)
    enc = get_codec("int4+zstd").encode(ids)
    assert enc.codec == "raw+shuffle+zstd"
    assert np.array_equal(decode(enc), ids)


def test_float_specials_and_float64():
    x = np.array([0.0, -0.0, 1e-30, 65504.0, 3.4e38, -np.inf, np.inf, np.nan], np.float32)
    for spec in ["raw", "raw+zstd"]:
        assert get_codec(spec).decode(get_codec(spec).encode(x)).tobytes() == x.tobytes()
    y = get_codec("bf16").decode(get_codec("bf16").encode(x))
    assert np.isnan(y[-1]) and np.isinf(y[-2]) and y[-3] == -np.inf and y[3] == 65536.0 and y[2] == pytest.approx(1e-30, rel=1e-2)
    with pytest.raises(CodecError, match="NaN or infinity"):
        get_codec("int8").encode(x)
    d = np.linspace(-3, 3, 100)
    assert decode(get_codec("int8").encode(d)).dtype == np.float64


def test_spec_parsing():
    assert get_codec("int8+zstd").spec == "int8+zstd"
    assert get_codec("fp16+lz4").spec == "fp16+shuffle+lz4"
    assert get_codec("fp16+lz4", shuffle=False).spec == "fp16+lz4"
    assert get_codec("zstd").spec == "raw+shuffle+zstd"
    assert get_codec("int8:pc+zstd:5").byte_stages[-1].level == 5
    assert get_codec("int4").numeric.packed and not get_codec("int4+zstd").numeric.packed
    assert get_codec("int4:p+zstd").numeric.packed and not get_codec("int4:u").numeric.packed
    assert get_codec("int8").numeric.per_channel and not get_codec("int8:pt").numeric.per_channel
    for bad in ["", "int9", "zstd+int8", "gzip", "int8+fp16", "raw+zstd+lz4", "zstd+shuffle", "int8:xx", 3]:
        with pytest.raises(CodecError):
            get_codec(bad)



def test_decode_refuses_inconsistent_encodings():
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 16)).astype(np.float32)
    raw = get_codec("raw").encode(x)
    i8 = get_codec("int8:pc+zstd").encode(x)
    lz = get_codec("int4+lz4").encode(x)
    bad = [
        tamper(raw, shape=(2, 8, 8, 17)),
        tamper(raw, shape=(2, 8, 8, -16)),
        tamper(raw, dtype="object"),
        tamper(raw, dtype="float64"),
        tamper(raw, codec="gzip"),
        tamper(raw, payload=bytes(raw.payload)[:-1]),
        tamper(raw, payload=12),
        tamper(i8, shape=(2, 8, 8, 4000)),  # the zstd frame says how big it is: no allocation
        tamper(i8, shape=(2, 9, 8, 16)),
        tamper(i8, params={**i8.params, "scales": b"\x00" * 32}),
        tamper(i8, params={**i8.params, "scales": b"\xff" * 32}),
        tamper(i8, params={**i8.params, "axis": 7}),
        tamper(i8, params={**i8.params, "bits": 4}),
        tamper(i8, params={**i8.params, "bits": True}),
        tamper(i8, params={}),
        tamper(i8, payload=b"garbage"),
        tamper(i8, payload=bytes(i8.payload)[:-3]),
        tamper(i8, dtype="int32"),
        tamper(lz, payload=b"\x00"),
        tamper(lz, payload=bytes(lz.payload)[:10]),
        tamper(lz, shape=(2, 8, 8, 16, 1000)),
        tamper(get_codec("int8").encode(x), params={"bits": 8, "scale": float("nan"), "zero": 0, "packed": False}),
        tamper(get_codec("int8").encode(x), params={"bits": 8, "scale": 1.0, "zero": 256, "packed": False}),
        tamper(get_codec("int8").encode(x), params={"bits": 8, "scale": 1.0, "zero": 0, "packed": "yes"}),
    ]
    for enc in bad:
        with pytest.raises(CodecError):
            decode(enc)


def test_payload_is_not_copied_for_raw():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    enc = get_codec("raw").encode(x)
    x[0, 0] = 42  # the payload aliases the array (documented: encode late, send at once)
    assert decode(enc)[0, 0] == 42
    assert np.shares_memory(np.frombuffer(enc.payload, np.float32), x)


@pytest.mark.parametrize("spec", LOSSY)
def test_lossy_codecs_on_odd_shapes(spec):
    codec = get_codec(spec)
    for x in [np.float32(1.5), np.zeros((0, 3), np.float32), np.full((2, 3), -2.0, np.float32),
              np.zeros((1, 5, 1, 1), np.float16), np.arange(7, dtype=np.float64)]:
        x = np.asarray(x)
        y = codec.decode(codec.encode(x))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert np.allclose(y, x, atol=0.7 * (np.ptp(x) + abs(x).max() if x.size else 0) + 1e-6)


def test_per_channel_needs_enough_values_per_channel():
    feats = np.random.default_rng(4).standard_normal((1, 1280)).astype(np.float32)
    enc = get_codec("int4:pc").encode(feats)  # one value per channel: scales would outweigh codes
    assert "scale" in enc.params and "scales" not in enc.params
    assert "scale" in get_codec("int4:pc").encode(np.tile(feats, (127, 1))).params
    assert "scales" in get_codec("int4:pc").encode(np.tile(feats, (128, 1))).params


def test_a_shared_codec_is_safe_across_threads():
    from concurrent.futures import ThreadPoolExecutor

    codec = get_codec("int8+zstd")
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1, 8, 64, 64)).astype(np.float32) * (i + 1) for i in range(8)]
    expected = [codec.decode(codec.encode(x)) for x in xs]

    def work(i):
        for _ in range(20):
            assert np.array_equal(codec.decode(codec.encode(xs[i])), expected[i])
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))


def test_prediction_is_lossless_on_codes_and_pays_on_smooth_maps():
    rng = np.random.default_rng(6)
    # Channels with different offsets and smooth 7x7 maps, like a late EfficientNet cut.
    yy, xx = np.mgrid[0:7, 0:7].astype(np.float32)
    x = (np.linspace(-4, 4, 64, dtype=np.float32)[None, :, None, None] + 0.3 * (yy + xx)[None, None]
         + 0.05 * rng.standard_normal((2, 64, 7, 7)).astype(np.float32))
    plain, pred = get_codec("int6:pt+zstd"), get_codec("int6:pt+pred+zstd")
    e_plain, e_pred = plain.encode(x), pred.encode(x)
    assert e_pred.codec == "int6+pred+zstd" and e_pred.params["pred"] == [7, 7]
    assert np.array_equal(decode(e_pred), decode(e_plain))  # same codes, other bytes
    assert e_pred.nbytes < 0.8 * e_plain.nbytes
    # Not applicable: 1-D tensors, packed codes, multi-byte payloads.
    assert get_codec("int6:pt+pred+zstd").encode(x.reshape(-1)).codec == "int6+zstd"
    assert get_codec("int6:p+pred").encode(x).codec == "int6"
    assert get_codec("fp16+pred+zstd").encode(x).codec == "fp16+shuffle+zstd"


def test_prediction_params_are_checked():
    x = np.random.default_rng(7).standard_normal((1, 4, 6, 5)).astype(np.float32)
    enc = get_codec("int8+pred+zstd").encode(x)
    for bad in [None, [6], [0, 5], [7, 5], ["6", 5], [6, 5, 1], True]:
        with pytest.raises(CodecError):
            decode(tamper(enc, params={**enc.params, "pred": bad}))
    with pytest.raises(CodecError):
        get_codec("zstd:fast")


def test_a_new_stage_is_one_registry_entry():
    """The worked example of docs/architecture.md: a byte stage added by one register_stage call
    is parsed, encoded, decoded by name, accepted by the protocol's name check and sized."""
    from edgesplit.codecs import StageSpec, is_codec_name, nominal_ratio, register_stage
    from edgesplit.codecs.stages import find_stage

    class XorStage:
        name = "xor"
        compresses = False

        def applies(self, itemsize, shape, params):
            return True

        def encode(self, buf, itemsize, params):
            return (np.frombuffer(buf, np.uint8) ^ 0x5A).tobytes()

        def decode(self, buf, size, params):
            return (np.frombuffer(buf, np.uint8) ^ 0x5A).tobytes()

        def validate(self, buf, size, params):
            if memoryview(buf).nbytes != size:
                raise CodecError("xor: wrong size")

    if find_stage("xor") is None:
        register_stage(StageSpec("xor", False, lambda opts, params: XorStage(), XorStage))
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    enc = get_codec("fp16+xor").encode(a)
    assert enc.codec == "fp16+xor" and bytes(enc.payload) != a.astype(np.float16).tobytes()
    np.testing.assert_array_equal(decode(enc), a)
    assert is_codec_name("fp16+xor") and not is_codec_name("fp16+xxor")
    assert nominal_ratio("fp16+xor", "float32") == 0.5
    with pytest.raises(CodecError, match="xxor"):
        get_codec("fp16+xxor")
    with pytest.raises(CodecError, match="registered already"):
        register_stage(StageSpec("xor", False, lambda opts, params: XorStage(), XorStage))
