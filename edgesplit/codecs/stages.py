"""The table of codec stages: one entry per stage name, used to parse, encode, decode and size.

A codec spec is stages joined by "+" ("int8:pc+zstd:3"): at most one numeric stage first, then
byte stages. Everything that needs to know a stage — parsing a spec, building the encoder,
picking a decoder for a name that came off the wire, the protocol's check of codec names, and
the planner's nominal size ratio — reads its entry here. Adding a stage is one `register_stage`
call (see docs/architecture.md for a worked example).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgesplit.codecs import _bytes, _quant
from edgesplit.errors import CodecError

__all__ = ["StageSpec", "register_stage", "stage_spec", "find_stage", "numeric_stage_names", "byte_stage_names",
           "decoder_for"]


def _same_size(opts: list[str], dtype: np.dtype) -> float:
    return 1.0


@dataclass(frozen=True)
class StageSpec:
    """One codec stage.

    Attributes:
        name: the stage's name in specs and on the wire.
        numeric: a numeric stage (array -> bytes, first in a codec) or a byte stage (bytes -> bytes).
        make: ``make(options, params)`` -> the encoding stage object; `options` are the tokens
            after ":" in the spec, `params` the codec's keyword settings plus "compressed" (a
            compressor follows). Raises CodecError on an option it does not know.
        decoder: ``decoder()`` -> a stage object that decodes any payload carrying this name
            (everything else it needs travels in the message's params).
        ratio: ``ratio(options, dtype)`` -> nominal encoded/raw size for the planner (1 when it
            depends on the data, as for compressors; a measured profile replaces it).
        compresses: an entropy coder: at most one per codec, and it comes last.
    """

    name: str
    numeric: bool
    make: Callable[[list[str], dict], Any]
    decoder: Callable[[], Any]
    ratio: Callable[[list[str], np.dtype], float] = _same_size
    compresses: bool = False


_STAGES: dict[str, StageSpec] = {}
_DECODERS: dict[str, Any] = {}
_lock = threading.Lock()


def register_stage(spec: StageSpec) -> StageSpec:
    """Add a stage to the table (a name can be registered once)."""
    if not spec.name or not spec.name.isidentifier() or spec.name != spec.name.lower():
        raise CodecError(f"stage name {spec.name!r} must be a lower-case identifier")
    with _lock:
        if spec.name in _STAGES:
            raise CodecError(f"codec stage {spec.name!r} is registered already")
        _STAGES[spec.name] = spec
    return spec


def stage_spec(name: str) -> StageSpec:
    """The table entry for `name`; a CodecError naming the known stages if there is none."""
    spec = _STAGES.get(name)
    if spec is None:
        raise CodecError(f"unknown codec stage {name!r}; numeric stages: {', '.join(numeric_stage_names())}; "
                         f"byte stages: {', '.join(byte_stage_names())}")
    return spec


def find_stage(name: str) -> StageSpec | None:
    """The table entry for `name`, or None."""
    return _STAGES.get(name)


def numeric_stage_names() -> tuple[str, ...]:
    return tuple(n for n, s in _STAGES.items() if s.numeric)


def byte_stage_names() -> tuple[str, ...]:
    return tuple(n for n, s in _STAGES.items() if not s.numeric)


def decoder_for(name: str) -> Any:
    """The shared decoding stage for `name` (made once; decoders keep per-thread state themselves)."""
    d = _DECODERS.get(name)
    if d is None:
        spec = stage_spec(name)
        with _lock:
            d = _DECODERS.get(name)
            if d is None:
                d = _DECODERS[name] = spec.decoder()
    return d


# -- the built-in stages ---------------------------------------------------------------------------
def _isint(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _no_options(name: str, make: Callable[[], Any]) -> Callable[[list[str], dict], Any]:
    def build(opts: list[str], params: dict) -> Any:
        if opts:
            raise CodecError(f"{name} takes no options, got {opts}")
        return make()

    return build


def _float_ratio(bytes_per_value: float) -> Callable[[list[str], np.dtype], float]:
    def ratio(opts: list[str], dtype: np.dtype) -> float:
        return 1.0 if dtype.kind != "f" else min(1.0, bytes_per_value / dtype.itemsize)

    return ratio


def _int_stage(bits: int) -> StageSpec:
    def make(opts: list[str], params: dict) -> _quant.IntStage:
        blocks = [o for o in opts if o.startswith("b") and o[1:].isdigit()]
        floors = [o for o in opts if o.startswith("f") and o[1:].isdigit()]
        unknown = set(opts) - {"pc", "pt", "u", "p", "nocal"} - set(blocks) - set(floors)
        modes = [o for o in opts if o in ("pc", "pt")] + blocks
        if unknown or len(modes) > 1 or len(floors) > 1:
            raise CodecError(f"bad option(s) {opts} for int{bits}: at most one of pc, pt, bN (N rows "
                             f"per block); at most one fN (steps >= the per-tensor step / N); and u, p, nocal")
        per_channel, block = params.get("per_channel"), params.get("block")
        # Per channel by default: per-tensor int8 loses top-1 agreement at early cuts where a few
        # channels hold the outliers; on large early maps ("auto") per block of 8 rows too:
        # per channel alone lost agreement there on near-tie images (benchmarks/results/codecs.md).
        pc = per_channel if per_channel is not None else ("pt" not in opts)
        floor = params.get("floor")
        if block is None and per_channel is None and not modes:
            block = "auto"
            floor = floor if floor is not None else _quant.AUTO_FLOOR
        elif block is None and blocks:
            block = int(blocks[0][1:])
        if floors:
            floor = int(floors[0][1:]) or None  # f0: no floor
        # Dense bit packing, unless a compressor follows: zstd's Huffman stage codes one code per
        # byte better than it codes packed ones.
        packed = params.get("packed")
        pk = packed if packed is not None else ("p" in opts or ("u" not in opts and not params["compressed"]))
        return _quant.IntStage(bits, per_channel=pc, axis=params.get("axis", 1), packed=pk,
                               use_calibration=params.get("use_calibration", True) and "nocal" not in opts,
                               block=block, floor=floor, position_major=bool(params.get("position_major")))

    def ratio(opts: list[str], dtype: np.dtype) -> float:
        per_value = bits / 8.0 if "u" not in opts else 1.0
        return 1.0 if dtype.kind != "f" else min(1.0, per_value / dtype.itemsize)

    return StageSpec(f"int{bits}", True, make, lambda: _quant.IntStage(bits), ratio)


def _zstd(opts: list[str], params: dict) -> _bytes.ZstdStage:
    level = params.get("level")
    lvl = level if level is not None else next((int(o) for o in opts if _isint(o)), 1)
    mm = next((int(o[2:]) for o in opts if o.startswith("mm") and _isint(o[2:])), None)
    bad = [o for o in opts if not _isint(o) and not (o.startswith("mm") and _isint(o[2:]))]
    if bad:
        raise CodecError(f"zstd: unknown option(s) {bad} (a level, or mmN for the minimum match)")
    return _bytes.ZstdStage(lvl, mm)


register_stage(StageSpec("raw", True, _no_options("raw", _quant.RawStage), _quant.RawStage))
register_stage(StageSpec("fp16", True, _no_options("fp16", _quant.Fp16Stage), _quant.Fp16Stage, _float_ratio(2)))
register_stage(StageSpec("bf16", True, _no_options("bf16", _quant.Bf16Stage), _quant.Bf16Stage, _float_ratio(2)))
for _bits in range(8, 1, -1):
    register_stage(_int_stage(_bits))
register_stage(StageSpec("shuffle", False, _no_options("shuffle", _bytes.ShuffleStage), _bytes.ShuffleStage))
register_stage(StageSpec("pred", False, _no_options("pred", _bytes.PredictStage), _bytes.PredictStage))
register_stage(StageSpec("delta", False, _no_options("delta", _bytes.DeltaStage), _bytes.DeltaStage))
register_stage(StageSpec("plane", False, _no_options("plane", _bytes.PlaneStage), _bytes.PlaneStage))
register_stage(StageSpec("zstd", False, _zstd, _bytes.ZstdStage, compresses=True))
register_stage(StageSpec("lz4", False, _no_options("lz4", _bytes.Lz4Stage), _bytes.Lz4Stage, compresses=True))
