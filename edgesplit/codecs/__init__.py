"""Activation codecs: shrink the tensors at a cut (raw, fp16, bf16, int8..int2, + shuffle/delta/zstd/lz4).

    codec = get_codec(DEFAULT_CODEC)     # "int8+delta+zstd"
    enc = codec.encode(array)            # Encoded(codec, dtype, shape, params, payload)
    array2 = decode(enc)                 # or codec.decode(enc)

Decoding trusts nothing in `enc`: params and payload sizes are checked against the declared shape
before anything is allocated, and every failure is a CodecError.
"""

from __future__ import annotations

from edgesplit.codecs.stages import StageSpec, register_stage, stage_spec
from edgesplit.codecs._bytes import CODE_HASH_LOG, DELTA_MIN_ROW
from edgesplit.codecs._quant import AUTO_BLOCK, AUTO_MIN_BLOCK_VALUES, AUTO_FEATURE_GROUP, pack_bits, unpack_bits
from edgesplit.codecs._codec import (
    BYTE_STAGES,
    DEFAULT_CODEC,
    DTYPES,
    NUMERIC_STAGES,
    Codec,
    Encoded,
    decode,
    get_codec,
    is_codec_name,
    parse_spec,
    nominal_ratio,
    validate,
)

__all__ = [
    "Codec", "Encoded", "DEFAULT_CODEC", "get_codec", "decode", "validate", "parse_spec",
    "NUMERIC_STAGES", "BYTE_STAGES", "DTYPES", "is_codec_name",
    "StageSpec", "register_stage", "stage_spec", "nominal_ratio",
    "pack_bits", "unpack_bits", "AUTO_BLOCK", "AUTO_MIN_BLOCK_VALUES", "AUTO_FEATURE_GROUP",
    "DELTA_MIN_ROW", "CODE_HASH_LOG", "wire_codes",
]


def wire_codes(enc: Encoded):
    """The integer codes an Encoded carries, its byte stages undone, in wire order (a uint8 array;
    for tests and tools that compare codecs' codes). Checks `enc` as decode does."""
    import numpy as np

    from edgesplit.codecs._codec import _plan

    _, stages, size = _plan(enc)
    buf = enc.payload
    for stage in reversed(stages):
        buf = stage.decode(buf, size, enc.params)
    return np.frombuffer(buf, np.uint8)
