"""Activation codecs: shrink the tensors at a cut (raw, fp16, bf16, int8..int2, + shuffle/zstd/lz4).

    codec = get_codec("int8+zstd")
    enc = codec.encode(array)            # Encoded(codec, dtype, shape, params, payload)
    array2 = decode(enc)                 # or codec.decode(enc)

Decoding trusts nothing in `enc`: params and payload sizes are checked against the declared shape
before anything is allocated, and every failure is a CodecError.
"""

from __future__ import annotations

from edgesplit.codecs._codec import (
    BYTE_STAGES,
    DTYPES,
    NUMERIC_STAGES,
    Codec,
    Encoded,
    decode,
    get_codec,
    parse_spec,
    validate,
)

__all__ = [
    "Codec", "Encoded", "get_codec", "decode", "validate", "parse_spec",
    "NUMERIC_STAGES", "BYTE_STAGES", "DTYPES",
]
