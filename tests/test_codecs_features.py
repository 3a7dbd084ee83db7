"""Feature vectors and other non-negative tensors under the default codec (issue 13, third round).

Pooled features (EfficientNet-Lite0's 1280 after ReLU6 and the average pool) are half zeros: zstd
codes their one-byte codes with a small hash table (same frames, fewer bytes, less time), block
ranges of a tensor with no negative value skip the per-block minima, and blocks whose zero
points are all 0 decode with one multiply. Every shortcut gives the codes and values of the
general path, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from edgesplit.codecs import DEFAULT_CODEC, Encoded, decode, get_codec, validate
from edgesplit.codecs import CODE_HASH_LOG
from edgesplit.errors import CodecError


def _pooled(n: int, f: int = 1280, seed: int = 0) -> np.ndarray:
    """Post-ReLU6 pooled features: about half exactly zero, the rest spread over (0, 6]."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.gamma(0.6, 0.5, (n, f)) - 0.15, 0, 6).astype(np.float32)
    return x


def test_the_default_sends_zero_rich_features_in_fewer_bytes_as_plain_zstd_frames():
    x = _pooled(64, seed=1)
    assert 0.4 < (x == 0).mean() < 0.6
    enc = get_codec(DEFAULT_CODEC).encode(x)
    assert enc.codec == "int8+zstd"
    # An ordinary zstd frame: any zstd decoder reads it, and it declares its size.
    codes = zstandard.ZstdDecompressor().decompress(bytes(memoryview(enc.payload)))
    plain = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(codes)
    assert enc.nbytes < len(plain)
    assert zstandard.frame_content_size(bytes(memoryview(enc.payload))) == x.size
    assert np.array_equal(decode(enc), decode(Encoded(enc.codec, enc.dtype, enc.shape, enc.params, plain)))


def test_small_hash_table_only_for_one_byte_codes_at_level_1():
    stage = get_codec("int8+zstd").byte_stages[-1]
    assert stage._compressor(True) is stage._compressor(True) is not stage._compressor(False)
    assert CODE_HASH_LOG < 14  # zstd's level 1 table has 2**14 entries
    for spec in ["int8+zstd:3", "int8+pred+zstd:3:mm7"]:
        st = get_codec(spec).byte_stages[-1]
        assert st._compressor(True) is st._compressor(False)
    x = np.random.default_rng(2).standard_normal((4, 3, 16, 16)).astype(np.float32)
    for spec in ["fp16+zstd", "raw+zstd", "int8+zstd:3", "int4:u+zstd"]:
        enc = get_codec(spec).encode(x)
        validate(enc)
        assert np.allclose(decode(enc), x, atol=0.5)


@pytest.mark.parametrize("shape,spec", [((7, 1280), "int8"), ((3, 1000), "int8:b128"), ((2, 5, 19, 11), "int8:b8"),
                                        ((1, 16, 56, 56), DEFAULT_CODEC), ((2, 4, 7, 7), DEFAULT_CODEC),
                                        ((3, 300), "int6:b64")])
def test_non_negative_tensors_get_the_codes_of_the_general_path(shape, spec):
    x = np.abs(np.random.default_rng(sum(shape)).standard_normal(shape)).astype(np.float32)
    x[x < 0.5] = 0
    # The same images beside one with a negative value take the general path (per-block minima):
    # the non-negative images' scales, zero points and values must not change.
    y = np.concatenate([x, -np.ones((1,) + shape[1:], np.float32)])
    codec = get_codec(spec)
    a, b = codec.encode(x), codec.encode(y)
    blocks = len(a.params["zeros"])
    assert a.params["zeros"] == b.params["zeros"][:blocks] == bytes(blocks)
    width = len(a.params["scales"]) // blocks
    assert a.params["scales"] == b.params["scales"][:width * blocks]
    assert np.array_equal(decode(a), decode(b)[:shape[0]])


def test_zero_offset_decode_matches_the_general_one():
    x = _pooled(5, 300, seed=3)
    enc = get_codec("int8:b64").encode(x)
    assert enc.params["zeros"] == bytes(len(enc.params["zeros"]))
    q = np.frombuffer(enc.payload, np.uint8).reshape(5, -1).astype(np.float32)
    scales = np.frombuffer(enc.params["scales"], "<f2").astype(np.float32).reshape(5, -1)
    ref = np.empty_like(x)
    for j in range(scales.shape[1]):
        ref[:, 64 * j:64 * (j + 1)] = (q[:, 64 * j:64 * (j + 1)] - np.float32(0)) * scales[:, j:j + 1]
    assert np.array_equal(decode(enc), ref)
    # One nonzero zero point takes the general path, and the block's values move by one step.
    zeros = bytearray(enc.params["zeros"])
    zeros[0] = 1
    shifted = decode(Encoded(enc.codec, enc.dtype, enc.shape, {**enc.params, "zeros": bytes(zeros)}, enc.payload))
    assert np.allclose(shifted[0, :64], ref[0, :64] - scales[0, 0]) and np.array_equal(shifted[1:], ref[1:])


def test_nan_still_refused_on_the_non_negative_path():
    x = _pooled(2, 256)
    x[1, 5] = np.nan
    with pytest.raises(CodecError):
        get_codec(DEFAULT_CODEC).encode(x)
