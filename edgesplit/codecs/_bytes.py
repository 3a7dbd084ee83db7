"""Byte stages of a codec: lossless transforms of a flat buffer (byte shuffle, delta, zstd, lz4).

Every decoder is told the exact size its output must have (derived from the declared shape, which
the protocol has already bounded), so a hostile payload can never make it allocate more: zstd
decodes one frame that must declare exactly that content size into a buffer of that size (a frame
without a content size, a skippable frame, a second frame or trailing bytes are refused, and a
frame whose blocks expand past its declared size fails while decoding); LZ4 decodes into a buffer
of that size and fails the moment its output would pass it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from edgesplit.errors import CodecError


def _nbytes(buf: Any) -> int:
    return memoryview(buf).nbytes


class ByteStage:
    name = ""
    compresses = False

    def applies(self, itemsize: int, shape: tuple[int, ...], params: dict) -> bool:
        """Whether this stage does anything for such a payload (else the codec skips it)."""
        return True

    def encode(self, buf: Any, itemsize: int, params: dict) -> Any:
        raise NotImplementedError

    def decode(self, buf: Any, size: int, params: dict) -> Any:
        raise NotImplementedError

    def validate(self, buf: Any, size: int, params: dict) -> None:
        """Cheap checks that need no allocation."""


class ShuffleStage(ByteStage):
    """Byte shuffle (byte k of every element together): floats' exponent bytes then compress well."""

    name = "shuffle"

    def applies(self, itemsize, shape, params):
        return itemsize > 1

    def encode(self, buf, itemsize, params):
        params["shuffle"] = itemsize
        if itemsize <= 1:
            return buf
        a = np.frombuffer(buf, np.uint8)
        if a.size % itemsize:
            raise CodecError(f"shuffle: {a.size} bytes is not a multiple of {itemsize}")
        return np.ascontiguousarray(a.reshape(-1, itemsize).T).reshape(-1)

    def _k(self, size, params):
        k = params.get("shuffle")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16 or size % k:
            raise CodecError(f"shuffle: bad element size {k!r} for {size} bytes")
        return k

    def validate(self, buf, size, params):
        self._k(size, params)
        if _nbytes(buf) != size:
            raise CodecError(f"shuffle: payload has {_nbytes(buf)} bytes, the shape needs {size}")

    def decode(self, buf, size, params):
        self.validate(buf, size, params)
        k = params["shuffle"]
        if k <= 1:
            return buf
        a = np.frombuffer(buf, np.uint8)
        return np.ascontiguousarray(a.reshape(k, -1).T).reshape(-1)


class PredictStage(ByteStage):
    """Planar prediction of one-byte codes over the last two axes (H, W), before a compressor.

    Each code is replaced by its mixed second difference q[h,w] - q[h,w-1] - q[h-1,w] + q[h-1,w-1]
    (mod 256; outside the plane counts as 0), which removes each channel's offset and smooth
    gradients; decoding is two cumulative sums. At EfficientNet's 7x7 cuts it takes int6 codes from
    about 5.0 to 3.7 bits per value after zstd (benchmarks/results/codecs.md).
    """

    name = "pred"

    def applies(self, itemsize, shape, params):
        return itemsize == 1 and len(shape) >= 2 and shape[-1] > 0 and shape[-2] > 0 and not params.get("packed")

    def encode(self, buf, itemsize, params):
        raise NotImplementedError("PredictStage needs the shape: use encode_shaped")

    def encode_shaped(self, buf, shape, params):
        h, w = int(shape[-2]), int(shape[-1])
        q = np.frombuffer(buf, np.uint8).reshape(-1, h, w)
        d = np.diff(q, axis=2, prepend=np.uint8(0))
        d = np.diff(d, axis=1, prepend=np.uint8(0))
        params["pred"] = [h, w]
        return d.reshape(-1)

    max_side: int | None = None  # the largest plane side the params may name (None: any)

    def _hw(self, size, params):
        hw = params.get(self.name)  # [H, W], under the stage's name
        top = self.max_side
        if (type(hw) is not list or len(hw) != 2 or any(type(v) is not int or v < 1 or (top and v > top) for v in hw)
                or size % (hw[0] * hw[1])):
            raise CodecError(f"{self.name}: bad plane shape {hw!r} for {size} bytes"
                             + (f" (sides 1..{top})" if top else ""))
        return hw

    def validate(self, buf, size, params):
        self._hw(size, params)
        if _nbytes(buf) != size:
            raise CodecError(f"{self.name}: payload has {_nbytes(buf)} bytes, the shape needs {size}")

    def decode(self, buf, size, params):
        self.validate(buf, size, params)
        h, w = params["pred"]
        d = np.frombuffer(buf, np.uint8).reshape(-1, h, w)
        out = np.cumsum(d, axis=1, dtype=np.uint8)
        np.cumsum(out, axis=2, dtype=np.uint8, out=out)
        return out.reshape(-1)


# Shortest rows (W) that `delta` codes: on EfficientNet-Lite0 left-neighbour differences cut the
# int8+zstd bytes by 9-12% on 112x112 and 56x56 maps, 1% on 28x28 and nothing on 14x14 and 7x7,
# where the prefix sum would cost more CPU than it saves link time (benchmarks/results/codecs.md).
DELTA_MIN_ROW = 56
_DELTA_CHUNK = 1 << 16


class DeltaStage(ByteStage):
    """Left-neighbour differences of one-byte codes (mod 256), before a compressor.

    Neighbouring pixels of a wide feature map are close, so their differences are small numbers
    that zstd's Huffman stage codes in fewer bits than the codes. The buffer is differenced as one
    flat run (the first code of a row is predicted from the previous row's last), so decoding is
    one prefix sum, with no per-row work; the decoded size is exactly the input size.
    """

    name = "delta"

    def __init__(self):
        self._local = threading.local()

    def applies(self, itemsize, shape, params):
        return (itemsize == 1 and len(shape) >= 3 and shape[-1] >= DELTA_MIN_ROW and shape[-2] > 1
                and not params.get("packed"))

    def encode(self, buf, itemsize, params):
        q = np.frombuffer(buf, np.uint8)
        d = np.empty_like(q)
        if q.size:
            d[0] = q[0]
            np.subtract(q[1:], q[:-1], out=d[1:])
        return d

    def validate(self, buf, size, params):
        if _nbytes(buf) != size:
            raise CodecError(f"delta: payload has {_nbytes(buf)} bytes, the shape needs {size}")

    def _lanes(self) -> np.ndarray:
        # One chunk of uint32 lanes per thread, reused: a fresh 256 KiB temporary per chunk (two,
        # with cumsum's output) doubled the decoder's time in page faults and copies.
        lanes = getattr(self._local, "lanes", None)
        if lanes is None:
            lanes = self._local.lanes = np.empty(_DELTA_CHUNK, np.uint32)
        return lanes

    def decode(self, buf, size, params):
        self.validate(buf, size, params)
        d = np.frombuffer(buf, np.uint8)
        out = np.empty(size, np.uint8)
        # A prefix sum in uint32 lanes, then mod 256 (numpy's uint8 cumsum is 4x slower), in
        # chunks, so the wide temporaries stay small whatever the size.
        lanes = self._lanes()
        carry = np.uint32(0)
        for s in range(0, size, _DELTA_CHUNK):
            part = d[s:s + _DELTA_CHUNK]
            c = lanes[:part.size]
            np.copyto(c, part)
            np.add.accumulate(c, out=c)
            c += carry
            carry = c[-1]
            np.copyto(out[s:s + _DELTA_CHUNK], c, casting="unsafe")
        return out


# Largest map side that travels position-major and predicted (the `plane` stage; its decoder loops
# over rows and columns): planar prediction takes 0.6-8% off the int8+zstd bytes of
# EfficientNet-Lite0's 7x7 maps and adds 0.2-0.7% at 14x14, where position-major codes alone
# decode slower than the usual order (benchmarks/results/codecs.md).
PLANE_MAX_SIDE = 8


class PlaneStage(PredictStage):
    """Planar prediction of position-major one-byte codes of small maps, before a compressor.

    When this stage follows, the int stage writes the codes of a map of at most PLANE_MAX_SIDE rows
    and columns position-major ([H, W, N]: every image's and channel's code for one pixel together;
    params "order": "hw"). Each code then becomes q[h,w] - q[h,w-1] - q[h-1,w] + q[h-1,w-1] (mod 256;
    outside the plane counts as 0), as `pred` does, but each step is one vector operation over N
    codes, so decoding is H - 1 + W - 1 additions of whole rows instead of two cumulative sums over
    7-long axes (70x faster on 7x7 maps). Params: "plane": [H, W]. Skipped on any other layout.
    """

    name = "plane"
    max_side = PLANE_MAX_SIDE

    def applies(self, itemsize, shape, params):
        return itemsize == 1 and params.get("order") == "hw" and len(shape) >= 3 and not params.get("packed")

    def encode(self, buf, itemsize, params):
        raise NotImplementedError("PlaneStage needs the shape: use encode_shaped")

    def encode_shaped(self, buf, shape, params):
        h, w = int(shape[-2]), int(shape[-1])
        q = np.frombuffer(buf, np.uint8).reshape(h, w, -1)
        a = np.empty_like(q)
        a[:, 0] = q[:, 0]
        np.subtract(q[:, 1:], q[:, :-1], out=a[:, 1:])
        r = np.empty_like(q)
        r[0] = a[0]
        np.subtract(a[1:], a[:-1], out=r[1:])
        params["plane"] = [h, w]
        return r.reshape(-1)

    def decode(self, buf, size, params):
        self.validate(buf, size, params)
        h, w = params["plane"]
        r = np.frombuffer(buf, np.uint8).reshape(h, w, -1)
        out = np.empty(r.shape, np.uint8)
        out[0] = r[0]
        for i in range(1, h):
            np.add(out[i - 1], r[i], out=out[i])
        for j in range(1, w):
            np.add(out[:, j - 1], out[:, j], out=out[:, j])
        return out.reshape(-1)


# log2 of the entries in zstd's match-finding hash table for one-byte codes at level 1 (zstd's own
# level 1 has 2**14 entries: 64 KiB). Int codes hold next to no matches worth taking, but zero-rich
# codes (EfficientNet-Lite0's 1280 pooled features, 52% zeros) have many short ones, which the big
# table finds and takes: with 256 entries (1 KiB, in L1) zstd codes those 2.7% smaller in 30% less
# time, and sends the same bytes at every other cut (benchmarks/results/codecs.md, third round).
# Frames stay ordinary zstd frames: decoding is unchanged.
CODE_HASH_LOG = 8


class ZstdStage(ByteStage):
    """Zstandard (level 1-3 keeps pace with the link; the frame records its content size)."""

    name = "zstd"
    compresses = True

    def __init__(self, level: int = 1, min_match: int | None = None):
        import zstandard

        if not -7 <= level <= 22:
            raise CodecError(f"zstd: level {level} is outside -7..22")
        if min_match is not None and not 3 <= min_match <= 7:
            raise CodecError(f"zstd: min_match {min_match} is outside 3..7")
        self.level = level
        self.min_match = min_match
        self._zstd = zstandard
        # zstandard's (de)compressor objects must not be used by two threads at once; codecs are
        # shared (get_codec caches them), so each thread gets its own.
        self._local = threading.local()

    def _compressor(self, codes: bool = False):
        key = "codes" if codes and self.level == 1 and self.min_match is None else "c"
        c = getattr(self._local, key, None)
        if c is None:
            if key == "codes":
                params = self._zstd.ZstdCompressionParameters.from_level(
                    1, hash_log=CODE_HASH_LOG, write_content_size=True)
                c = self._zstd.ZstdCompressor(compression_params=params)
            elif self.min_match is None:
                c = self._zstd.ZstdCompressor(level=self.level, write_content_size=True)
            else:
                # Longer minimum matches leave small codes to the Huffman stage, which codes
                # prediction residuals near their entropy.
                params = self._zstd.ZstdCompressionParameters.from_level(
                    self.level, min_match=self.min_match, write_content_size=True)
                c = self._zstd.ZstdCompressor(compression_params=params)
            setattr(self._local, key, c)
        return c

    def _decompressor(self):
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = self._zstd.ZstdDecompressor()
        return d

    def encode(self, buf, itemsize, params):
        if _nbytes(buf) == 0:
            return b""
        return self._compressor(itemsize == 1).compress(buf)

    def validate(self, buf, size, params):
        n = _nbytes(buf)
        if size == 0:
            if n:
                raise CodecError("zstd: payload for an empty tensor must be empty")
            return
        try:
            declared = self._zstd.frame_content_size(buf)
        except self._zstd.ZstdError as exc:
            raise CodecError(f"zstd: not a zstd frame ({exc})") from None
        if declared != size:
            raise CodecError(f"zstd: frame declares {declared} bytes, the shape needs {size}")

    def decode(self, buf, size, params):
        self.validate(buf, size, params)
        if size == 0:
            return b""
        try:
            # The output buffer is `size` bytes (the frame's content size, checked above equal to
            # the shape's); a frame that expands past it fails in libzstd, and anything after
            # the one frame is refused rather than ignored.
            out = self._decompressor().decompress(buf, max_output_size=size, allow_extra_data=False)
        except self._zstd.ZstdError as exc:
            raise CodecError(f"zstd: corrupt payload ({exc})") from None
        if len(out) != size:
            raise CodecError(f"zstd: got {len(out)} bytes, the shape needs {size}")
        return out


class Lz4Stage(ByteStage):
    """LZ4 block (fastest; sizes come from the shape, not the payload)."""

    name = "lz4"
    compresses = True

    def __init__(self, acceleration: int = 1):
        import lz4.block

        self._lz4 = lz4.block
        self.acceleration = acceleration

    def encode(self, buf, itemsize, params):
        if _nbytes(buf) == 0:
            return b""
        return self._lz4.compress(buf, store_size=False, mode="fast", acceleration=self.acceleration)

    def validate(self, buf, size, params):
        n = _nbytes(buf)
        if size == 0 and n:
            raise CodecError("lz4: payload for an empty tensor must be empty")
        # LZ4 expands at most 255:1; a payload too short for `size` bytes is corrupt.
        if size and (n == 0 or n * 255 + 16 < size):
            raise CodecError(f"lz4: {n} bytes cannot hold {size} bytes")

    def decode(self, buf, size, params):
        self.validate(buf, size, params)
        if size == 0:
            return b""
        try:
            out = self._lz4.decompress(buf, uncompressed_size=size)
        except Exception as exc:  # lz4 raises LZ4BlockError (a bare Exception subclass)
            raise CodecError(f"lz4: corrupt payload ({exc})") from None
        if len(out) != size:
            raise CodecError(f"lz4: got {len(out)} bytes, the shape needs {size}")
        return out
