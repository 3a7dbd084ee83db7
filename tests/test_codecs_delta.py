"""The delta byte stage (left-neighbour differences of one-byte codes) and the int step floor
(`int8:fN`): lossless on the codes, applied only where they pay, and defensive decoders."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from edgesplit.codecs import DEFAULT_CODEC, DELTA_MIN_ROW, decode, get_codec, validate
from builders import tamper

from edgesplit.codecs.stages import decoder_for
from edgesplit.errors import CodecError


def _smooth(shape, seed=0) -> np.ndarray:
    """Feature maps whose neighbouring pixels are close, like EfficientNet's early cuts."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return np.cumsum(0.1 * x, axis=-1).astype(np.float32) + rng.standard_normal(shape[:-2] + (1, 1)).astype(np.float32)



def test_delta_keeps_the_codes_and_pays_on_wide_smooth_maps():
    x = _smooth((1, 4, 64, 64))
    plain, delta = get_codec("int8+zstd").encode(x), get_codec("int8+delta+zstd").encode(x)
    assert delta.codec == "int8+delta+zstd" and plain.codec == "int8+zstd"
    assert np.array_equal(decode(delta), decode(plain))  # same codes, other bytes
    assert delta.nbytes < 0.8 * plain.nbytes
    assert DEFAULT_CODEC == "int8+delta+zstd"


@pytest.mark.parametrize("shape", [(1, 4, 9, 9), (2, 3, 14, DELTA_MIN_ROW - 1), (1, 1280), (5000,), (3, 1, 80)])
def test_delta_is_skipped_where_it_does_not_pay(shape):
    x = _smooth(shape) if len(shape) >= 2 else np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    enc = get_codec("int8+delta+zstd").encode(x)
    assert enc.codec == "int8+zstd"
    assert np.array_equal(decode(enc), decode(get_codec("int8+zstd").encode(x)))


def test_delta_is_skipped_for_packed_and_multi_byte_payloads():
    x = _smooth((1, 2, 8, 64))
    assert get_codec("int4:p+delta").encode(x).codec == "int4"
    assert get_codec("int4:u+delta+zstd").encode(x).codec == "int4+delta+zstd"
    assert get_codec("fp16+delta+zstd").encode(x).codec == "fp16+shuffle+zstd"
    raw = get_codec("raw+delta+lz4").encode(x)
    assert raw.codec == "raw+shuffle+lz4" and decode(raw).tobytes() == x.tobytes()


@pytest.mark.parametrize("size", [0, 1, 2, 1000, (1 << 16) - 1, 1 << 16, (3 << 16) + 17])  # chunks of 64 KiB
def test_delta_round_trip_is_exact_across_chunks(size):
    q = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    stage = decoder_for("delta")
    d = stage.encode(q, 1, {})
    assert d.size == size
    assert np.array_equal(stage.decode(d, size, {}), q)


def test_delta_decoder_checks_the_size_before_it_allocates():
    x = _smooth((1, 2, 8, 64))
    enc = get_codec("int8+delta").encode(x)
    assert enc.codec == "int8+delta"
    payload = bytes(memoryview(enc.payload))
    for bad in [payload[:-1], payload + b"\0", b""]:
        with pytest.raises(CodecError):
            decode(tamper(enc, payload=bad))
    # A declared shape far past the payload is refused from the sizes alone.
    with pytest.raises(CodecError):
        decode(tamper(enc, shape=(1 << 20, 2, 8, 64)))
    with pytest.raises(CodecError):
        decoder_for("delta").decode(b"\0" * 10, 11, {})


def test_delta_behind_zstd_refuses_a_frame_of_another_size():
    x = _smooth((1, 2, 8, 64))
    enc = get_codec("int8+delta+zstd").encode(x)
    n = 2 * 8 * 64
    for other in [n - 1, n + 1, 10 * n]:
        frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\1" * other)
        with pytest.raises(CodecError):
            decode(tamper(enc, payload=frame))


def test_delta_decodes_any_bytes_of_the_right_size_to_codes_in_range():
    x = _smooth((1, 2, 8, 64))
    enc = get_codec("int8+delta").encode(x)
    hostile = np.random.default_rng(9).integers(0, 256, enc.nbytes, dtype=np.uint8).tobytes()
    bad = tamper(enc, payload=hostile)
    validate(bad)
    y = decode(bad)
    assert y.shape == x.shape and np.all(np.isfinite(y))


def test_delta_decoders_keep_their_lanes_per_thread():
    """The decoder reuses one chunk of lanes per thread: threads decoding at once each get theirs."""
    import threading

    stage = decoder_for("delta")
    rng = np.random.default_rng(5)
    qs = [rng.integers(0, 256, (3 << 16) + i, dtype=np.uint8) for i in range(4)]
    ds = [stage.encode(q, 1, {}) for q in qs]
    bad = []

    def work(i):
        for _ in range(20):
            if not np.array_equal(stage.decode(ds[i], qs[i].size, {}), qs[i]):
                bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_delta_takes_no_options():
    with pytest.raises(CodecError):
        get_codec("int8+delta:2+zstd")


# -- the step floor ---------------------------------------------------------------------------
def test_floor_caps_how_fine_a_channel_step_gets():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    x[:, 0] *= 100  # one wide channel sets the per-tensor step
    pt = get_codec("int8:pt").encode(x).params["scale"]
    for spec, n in [("int8:pc:f4", 4), ("int8:b8:f2", 2), ("int8:f16", 16)]:
        enc = get_codec(spec).encode(x)
        scales = np.frombuffer(enc.params["scales"], "<f2" if "block" in enc.params else "<f4").astype(np.float32)
        assert scales.min() >= pt / n * (1 - 1e-3), spec
        y = decode(enc)
        assert np.abs(y - x).max() <= 0.51 * scales.max() + 1e-6
    # Without a floor the narrow channels get their own fine steps.
    fine = np.frombuffer(get_codec("int8:pc").encode(x).params["scales"], "<f4")
    assert fine.min() < pt / 16
    assert get_codec("int8:pc:f4").numeric.mode == "pc:f4"
    assert get_codec("int8:f0").numeric.floor is None


@pytest.mark.parametrize("spec", ["int8:f2:f4", "int8:fx", "int8:f99999"])
def test_bad_floor_options_are_refused(spec):
    with pytest.raises(CodecError):
        get_codec(spec)


# -- blocks: the two-run layout (full blocks, then a shorter last one) -------------------------
@pytest.mark.parametrize("shape,b", [((2, 3, 14, 14), 8), ((1, 2, 28, 5), 8), ((1, 4, 7, 7), 8), ((3, 17), 5),
                                     ((2, 1, 9, 3), 4), ((1, 1, 1, 1), 8), ((5,), 2), ((1, 2, 16, 4), 8)])
def test_blocks_match_a_per_row_reference(shape, b):
    """Scales, zero points and codes equal a plain per-row computation of the same rules."""
    x = np.random.default_rng(sum(shape) + b).standard_normal(shape).astype(np.float32) * 3
    enc = get_codec(f"int8:b{b}").encode(x)
    h, w = (shape[-2], shape[-1]) if len(shape) >= 3 else (shape[-1], 1)
    x3 = x.reshape(-1, h, w)
    nb = -(-h // b)
    lo = np.stack([[x3[i, j * b:(j + 1) * b].min() for j in range(nb)] for i in range(len(x3))])
    hi = np.stack([[x3[i, j * b:(j + 1) * b].max() for j in range(nb)] for i in range(len(x3))])
    scale = (np.maximum(hi, 0) - np.minimum(lo, 0)) / np.float32(255)
    sent = np.frombuffer(enc.params["scales"], "<f2").astype(np.float32).reshape(len(x3), nb)
    assert np.all(sent >= scale * (1 - 1e-6)) and np.all(sent <= scale * 1.001 + 1e-30)
    zeros = np.frombuffer(enc.params["zeros"], np.uint8).reshape(len(x3), nb).astype(np.float32)
    rows = np.arange(h) // b
    inv = (np.float32(1) / sent)[:, rows, None]
    expect = np.clip(x3 * inv + (zeros[:, rows, None] + np.float32(0.5)), 0, np.float32(255.5)).astype(np.uint8)
    assert np.array_equal(np.frombuffer(enc.payload, np.uint8), expect.reshape(-1))
    y = decode(enc).reshape(len(x3), h, w)
    assert np.allclose(y, (expect.astype(np.float32) - zeros[:, rows, None]) * sent[:, rows, None])
