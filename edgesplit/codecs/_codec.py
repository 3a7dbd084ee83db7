"""Codec pipelines named by spec strings ("int8+zstd"), the Encoded form, and the registry."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edgesplit.errors import CodecError
from edgesplit.codecs import _bytes, _quant
from edgesplit.codecs.stages import byte_stage_names, decoder_for, find_stage, numeric_stage_names, stage_spec

# The dtypes a codec accepts (the bundle's; kept in sync by a test).
DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
     "int64", "uint64", "bool"}
)
# numpy's dtype.name is a slow property (~4 us); encode() runs once per tensor per message.
_DTYPE_NAMES = {np.dtype(name): name for name in DTYPES}
# The built-in stage names (the table itself is edgesplit.codecs.stages).
NUMERIC_STAGES = numeric_stage_names()
BYTE_STAGES = byte_stage_names()
MAX_RANK = 32
# The codec the agent, the CLI and the demo use unless told otherwise: int8 codes with ranges
# from the map's shape, left-neighbour differences on wide maps, zstd level 1. Chosen from
# benchmarks/codecs.py on EfficientNet-Lite0 (docs/codecs.md, "Measured").
DEFAULT_CODEC = "int8+delta+zstd"


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor: what the wire carries.

    Attributes:
        codec: the stages actually applied, e.g. "int8+zstd" (a lossy stage on an integer tensor
            falls back to "raw", so this may differ from the codec's spec).
        dtype: the original numpy dtype name.
        shape: the original shape.
        params: what decoding needs (scales, zero points, shuffle width), msgpack-able.
        payload: the bytes (bytes, memoryview or a buffer-protocol object; not copied).
    """

    codec: str
    dtype: str
    shape: tuple[int, ...]
    params: dict = field(default_factory=dict)
    payload: Any = b""

    @property
    def nbytes(self) -> int:
        """Payload bytes (what the link carries besides the small header)."""
        return memoryview(self.payload).nbytes

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the decoded tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n * np.dtype(self.dtype).itemsize


def _parse_stage(token: str) -> tuple[str, list[str]]:
    name, *opts = token.strip().split(":")
    return name.strip().lower(), [o.strip().lower() for o in opts]


def parse_spec(spec: str) -> tuple[tuple[str, list[str]], list[tuple[str, list[str]]]]:
    """Split "int8:pc+zstd:3" into ("int8", ["pc"]) + byte stages; checks every name."""
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 200:
        raise CodecError(f"codec spec must be a non-empty string, got {spec!r}")
    tokens = [_parse_stage(t) for t in spec.split("+")]
    try:
        entries = [stage_spec(name) for name, _ in tokens]
    except CodecError as exc:
        raise CodecError(f"codec {spec!r}: {exc}") from None
    numeric: tuple[str, list[str]] = ("raw", [])
    if entries[0].numeric:
        numeric = tokens.pop(0)
        entries.pop(0)
    for (name, _), entry in zip(tokens, entries):
        if entry.numeric:
            raise CodecError(f"codec {spec!r}: numeric stage {name!r} must come first")
    compressors = [i for i, e in enumerate(entries) if e.compresses]
    if len(compressors) > 1 or (compressors and compressors[0] != len(entries) - 1):
        raise CodecError(f"codec {spec!r}: at most one compressor, and it comes last")
    return numeric, tokens


class Codec:
    """A numeric stage followed by byte stages. Thread-safe to share; build with get_codec()."""

    def __init__(self, spec: str, *, per_channel: bool | None = None, axis: int = 1,
                 level: int | None = None, packed: bool | None = None, shuffle: bool | None = None,
                 use_calibration: bool = True, block: int | str | None = None, floor: int | None = None):
        (name, opts), byte_tokens = parse_spec(spec)
        # `delta` is spatial prediction chosen by the map's shape: left differences on wide maps,
        # and on small maps the planar prediction of `plane` (over position-major codes), so
        # "int8+delta+zstd" is really "int8+delta+plane+zstd" (as "fp16+lz4" is "fp16+shuffle+lz4");
        # enc.codec names what was done.
        names = [n for n, _ in byte_tokens]
        if "delta" in names and "plane" not in names:
            byte_tokens.insert(names.index("delta") + 1, ("plane", []))
        # What the stages' builders may read besides their own options (StageSpec.make).
        self._params = {"per_channel": per_channel, "axis": axis, "level": level, "packed": packed,
                        "use_calibration": use_calibration, "block": block, "floor": floor,
                        "compressed": any(stage_spec(n).compresses for n, _ in byte_tokens),
                        "position_major": any(n == "plane" for n, _ in byte_tokens)}
        self.numeric: _quant.NumericStage = stage_spec(name).make(opts, self._params)
        self.level = level
        self.byte_stages = self._byte_plan(byte_tokens, shuffle,
                                           one_byte_codes=self.numeric.out_itemsize("float32") == 1)
        # Integer tensors pass a lossy codec untouched (raw), so they get the raw byte plan.
        self._raw_byte_stages = self._byte_plan(byte_tokens, shuffle, one_byte_codes=False)
        # The spec as the wire names it: stage names only, options live in params.
        self.spec = "+".join([self.numeric.name] + [b.name for b in self.byte_stages])

    def _byte_plan(self, tokens, shuffle: bool | None, one_byte_codes: bool) -> list[_bytes.ByteStage]:
        plan: list[tuple[str, list[str]]] = []
        # Shuffling one-byte codes changes nothing; otherwise a byte shuffle goes in front of the
        # compressor unless asked not to: it pays for every multi-byte payload
        # (benchmarks/results/codecs.md).
        have_shuffle = one_byte_codes or any(n == "shuffle" for n, _ in tokens) or shuffle is False
        for bname, bopts in tokens:
            if stage_spec(bname).compresses and not have_shuffle:
                plan.append(("shuffle", []))
                have_shuffle = True
            plan.append((bname, bopts))
        return [self._make_byte_stage(n, o) for n, o in plan]

    def _make_byte_stage(self, name: str, opts: list[str]) -> _bytes.ByteStage:
        return stage_spec(name).make(opts, self._params)

    @property
    def lossy(self) -> bool:
        return self.numeric.lossy

    def __repr__(self) -> str:
        return f"Codec({self.spec!r})"

    # -- encode ----------------------------------------------------------------------------
    def encode(self, array: Any, calibration: Mapping[str, Any] | None = None) -> Encoded:
        """Encode one tensor.

        Args:
            array: a numpy array (any dtype in DTYPES, any layout; the payload may alias it).
            calibration: this tensor's entry of the bundle's "calibration" field
                ({"min", "max", "axis", "min_c", "max_c"}); int stages then use the recorded
                range instead of this message's own min/max.
        """
        arr = np.asarray(array)
        dtype = _DTYPE_NAMES.get(arr.dtype) or arr.dtype.name
        if dtype not in DTYPES:
            raise CodecError(f"cannot encode dtype {arr.dtype} (allowed: {', '.join(sorted(DTYPES))})")
        numeric = self.numeric
        if numeric.lossy and dtype not in _quant.FLOAT_DTYPES:
            numeric = _RAW  # lossy stages only touch floating point tensors; ids, masks stay exact
        if numeric.lossy:
            with np.errstate(invalid="ignore", over="ignore"):
                buf, params = numeric.encode(arr, calibration)
        else:
            buf, params = numeric.encode(arr, calibration)
        itemsize = numeric.out_itemsize(dtype)
        names = [numeric.name]
        for stage in (self.byte_stages if numeric is self.numeric else self._raw_byte_stages):
            if not stage.applies(itemsize, arr.shape, params):
                continue  # e.g. shuffling 1-byte codes, or predicting a 1-D tensor
            shaped = getattr(stage, "encode_shaped", None)  # stages that need the map's shape
            buf = stage.encode(buf, itemsize, params) if shaped is None else shaped(buf, arr.shape, params)
            names.append(stage.name)
        payload = buf if isinstance(buf, (bytes, memoryview)) else memoryview(buf)
        return Encoded("+".join(names), dtype, arr.shape, params, payload)

    # -- decode ----------------------------------------------------------------------------
    def decode(self, enc: Encoded) -> np.ndarray:
        """Decode `enc` (which may come from the network); raises CodecError on any inconsistency."""
        return decode(enc)


_RAW = _quant.RawStage()
_lock = threading.Lock()


_STAGES_CACHE: dict[str, tuple[_quant.NumericStage, list[_bytes.ByteStage]]] = {}


def _stages(codec: Any) -> tuple[_quant.NumericStage, list[_bytes.ByteStage]]:
    """The decoders for a codec name; valid names are cached (this runs for every tensor)."""
    hit = _STAGES_CACHE.get(codec) if type(codec) is str else None
    if hit is not None:
        return hit
    if type(codec) is not str or len(codec) > 200:
        raise CodecError("codec name must be a short string")
    names = codec.split("+")
    if not is_codec_name(codec):
        raise CodecError(f"unknown codec {codec!r}")
    hit = (decoder_for(names[0]), [decoder_for(n) for n in names[1:]])
    if len(_STAGES_CACHE) < 512:
        _STAGES_CACHE[codec] = hit
    return hit


def is_codec_name(codec: Any) -> bool:
    """Whether `codec` names stages as the wire carries them: a numeric stage, then byte stages
    with any compressor last (no options: those travel in params)."""
    if type(codec) is not str or len(codec) > 200:
        return False
    entries = [find_stage(n) for n in codec.split("+")]
    if len(entries) > 8 or None in entries or not entries[0].numeric or any(e.numeric for e in entries[1:]):
        return False
    return not any(e.compresses for e in entries[1:-1])


def nominal_ratio(spec: str, dtype: str) -> float:
    """Encoded/raw size of a `dtype` tensor under codec `spec`, as far as it follows from the
    stages alone (each stage's StageSpec.ratio; compressors, which depend on the data, count 1)."""
    (name, opts), byte_tokens = parse_spec(spec)
    dt = np.dtype(dtype)
    ratio = stage_spec(name).ratio(opts, dt)
    for bname, bopts in byte_tokens:
        ratio *= stage_spec(bname).ratio(bopts, dt)
    return ratio


def _plan(enc: Encoded, fields_checked: bool = False) -> tuple[_quant.NumericStage, list[_bytes.ByteStage], int]:
    """Check everything about `enc` that needs no allocation; return the stages and payload size.

    With `fields_checked` (the protocol's decoder has already checked the dtype, the shape and
    the params' type, and wrapped the payload in a memoryview) those checks are skipped.
    """
    if not isinstance(enc, Encoded):
        raise CodecError(f"expected an Encoded, got {type(enc).__name__}")
    checked = enc.__dict__.get("_checked")
    if checked is not None:  # validated when the protocol decoded it (fields are immutable)
        return checked
    numeric, stages = _stages(enc.codec)
    if fields_checked:
        if numeric.lossy and enc.dtype not in _quant.FLOAT_DTYPES:
            raise CodecError(f"{numeric.name} cannot carry dtype {enc.dtype}")
        size = numeric.payload_size(enc.dtype, enc.shape, enc.params)
        if numeric.lossy and type(numeric) is _quant.IntStage:
            numeric.validate(enc.dtype, enc.shape, enc.params)
        return numeric, stages, size
    if type(enc.dtype) is not str or enc.dtype not in DTYPES:
        raise CodecError(f"dtype {enc.dtype!r} is not allowed")
    if not isinstance(enc.shape, tuple) or len(enc.shape) > MAX_RANK or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in enc.shape
    ):
        raise CodecError(f"shape {enc.shape!r} must be a tuple of non-negative ints")
    if not isinstance(enc.params, dict):
        raise CodecError("params must be a dict")
    if numeric.lossy and enc.dtype not in _quant.FLOAT_DTYPES:
        raise CodecError(f"{numeric.name} cannot carry dtype {enc.dtype}")
    try:
        memoryview(enc.payload)
    except TypeError:
        raise CodecError(f"payload must be bytes-like, got {type(enc.payload).__name__}") from None
    size = numeric.payload_size(enc.dtype, enc.shape, enc.params)
    if isinstance(numeric, _quant.IntStage):
        numeric.validate(enc.dtype, enc.shape, enc.params)
    return numeric, stages, size


def validate(enc: Encoded, fields_checked: bool = False) -> None:
    """Check an Encoded (codec, dtype, shape, params, payload size) without decoding it.

    A valid Encoded remembers it, so decoding it later repeats none of these checks (params is
    a dict the caller could still change: decode() re-checks what it reads from it anyway).
    """
    numeric, stages, size = _plan(enc, fields_checked)
    if stages:
        stages[-1].validate(enc.payload, size, enc.params)
    elif memoryview(enc.payload).nbytes != size:
        raise CodecError(
            f"{enc.codec}: payload has {memoryview(enc.payload).nbytes} bytes, "
            f"{enc.dtype}{list(enc.shape)} needs {size}"
        )
    object.__setattr__(enc, "_checked", (numeric, stages, size))


def decode(enc: Encoded) -> np.ndarray:
    """Decode any Encoded, picking the stages from `enc.codec`."""
    numeric, stages, size = _plan(enc)
    buf = enc.payload
    for stage in reversed(stages):
        buf = stage.decode(buf, size, enc.params)
    if memoryview(buf).nbytes != size:
        raise CodecError(
            f"{enc.codec}: payload has {memoryview(buf).nbytes} bytes, {enc.dtype}{list(enc.shape)} needs {size}"
        )
    try:
        if not numeric.lossy:
            return numeric.decode(buf, enc.dtype, enc.shape, enc.params)
        with np.errstate(over="ignore", invalid="ignore"):  # hostile scales may overflow: inf, quietly
            return numeric.decode(buf, enc.dtype, enc.shape, enc.params)
    except (ValueError, TypeError) as exc:
        raise CodecError(f"{enc.codec}: cannot decode ({exc})") from None


_CACHE: dict[tuple, Codec] = {}


def get_codec(spec: str, **params: Any) -> Codec:
    """The codec named by `spec`, e.g. "raw", "fp16+lz4", "int8+zstd", "int4:pc+zstd:3".

    Stages are joined by "+": one numeric stage first (raw, fp16, bf16, int8..int2; default raw),
    then byte stages (shuffle, pred, delta, zstd, lz4). Stage options follow colons: ``int8:pt`` per tensor,
    ``int8:pc`` per channel along axis 1 (when each channel has >= 128 values), ``int8:b8`` per
    channel per block of 8 rows (of a [..., C, H, W] tensor); default: b8 where H >= 28 or H <= 8,
    per channel in between, groups of 128 features on [N, F] (see _quant.IntStage._block_rows).
    ``int4:p`` / ``int4:u``
    packed densely / one code per byte (default: packed unless a compressor follows),
    ``int8:nocal`` ignore calibration, ``int8:pc:f4`` no step finer than the per-tensor step / 4,
    ``zstd:3`` level 3 (default 1). Keyword params override them: per_channel, axis, level,
    packed, shuffle (False: no implicit byte shuffle before a compressor), use_calibration, block
    (rows per block, or "auto"), floor.
    """
    key = (spec, tuple(sorted(params.items())))
    codec = _CACHE.get(key)
    if codec is None:
        try:
            codec = Codec(spec, **params)
        except TypeError as exc:
            raise CodecError(f"bad codec option for {spec!r}: {exc}") from None
        with _lock:
            _CACHE[key] = codec
    return codec
