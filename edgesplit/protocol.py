"""The wire protocol: ZeroMQ multipart messages [msgpack header, payload frame, payload frame, ...].

Header (a msgpack map)::

    {"v": 1, "kind": "infer", "id": "...", "bundle": "<id>", "cut": 3, "deadline_ms": 80.0,
     "tensors": [{"name", "dtype", "shape", "codec", "params", "nbytes"}, ...], **meta}

Payloads travel as their own frames and are never copied: `encode` hands out the codecs' buffers,
`decode` wraps the received frames in memoryviews. Everything from the network is untrusted:
`decode` checks sizes against `Limits` before it parses or allocates anything, checks the header's
schema, dtypes, codecs and that every declared size matches its frame, and raises ProtocolError
(never anything else) when a message breaks the protocol. Nothing is ever unpickled.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np
import zmq

from edgesplit.codecs import BYTE_STAGES, DTYPES, NUMERIC_STAGES, Encoded
from edgesplit.codecs import validate as _validate_encoded
from edgesplit.errors import CodecError, ConfigError, ProtocolError

__all__ = [
    "VERSION", "KINDS", "ERROR_CODES", "Limits", "Message", "MessageError",
    "infer", "result", "error", "ping", "pong", "hello", "welcome", "cancel", "session_end",
    "session_fields", "SESSION_ID_CHARS",
    "encode", "decode", "decode_header", "check_tensors", "send", "recv", "send_frames", "recv_frames",
    "error_code", "spec_nbytes", "tensors_budget", "max_frame_bytes", "declared_nbytes",
]

VERSION = 1
KINDS = frozenset({"infer", "result", "error", "ping", "pong", "hello", "welcome", "cancel", "session_end"})
# Kinds whose messages may carry tensors.
TENSOR_KINDS = frozenset({"infer", "result"})
ERROR_CODES = frozenset(
    {"bad_request", "version", "unknown_bundle", "bad_cut", "busy", "deadline", "internal",
     "shutdown", "worker_lost", "session_state", "forbidden"}
)
# A session id and a client token are 32 lowercase hex chars (16 random bytes) each.
SESSION_ID_CHARS = 32
_HEX = frozenset("0123456789abcdef")
_MAX_STEP = 1 << 40
RESERVED = frozenset({"v", "kind", "id", "bundle", "cut", "deadline_ms", "tensors"})
_TENSOR_KEYS = frozenset({"name", "dtype", "shape", "codec", "params", "nbytes"})
# The codecs' dtype table is the one list of what may cross the wire.
_DTYPES = DTYPES
_ITEMSIZE = {name: np.dtype(name).itemsize for name in DTYPES}


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; everything is checked before parsing or allocating."""

    max_message_bytes: int = 256 << 20  # all frames together, header included
    max_header_bytes: int = 256 << 10  # the msgpack header frame (per-channel scales live here)
    max_decoded_bytes: int = 1 << 30  # all tensors of one message once decoded
    max_tensors: int = 64  # tensors (payload frames) per message
    max_rank: int = 8  # dims per tensor
    max_dim: int = 1 << 31  # largest single dimension
    max_name_length: int = 256  # tensor names, request ids, bundle ids, codec names, meta keys
    max_meta_depth: int = 8  # nesting of meta values (timings, load, profile)
    max_items: int = 4096  # msgpack arrays and maps (the parser allocates for the declared count)

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Limits.{name} must be a positive int, got {value!r}")


class MessageError(ProtocolError):
    """A ProtocolError that knows the reply code and, when the header was readable, the request id.

    Attributes:
        code: the error code a server answers with ("version" or "bad_request").
        request_id: the message's id if it could be read, else None.
        reason: "oversize" when a batch or byte count is over a limit (for metrics), else None.
    """

    def __init__(self, message: str, code: str = "bad_request", request_id: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.reason = reason


def error_code(exc: BaseException) -> str:
    """The protocol error code to answer a failed decode with."""
    return getattr(exc, "code", "bad_request") if isinstance(exc, ProtocolError) else "internal"


@dataclass
class Message:
    """One wire message. `deadline_ms` is a relative budget at send time (no clock sync needed)."""

    kind: str
    id: str = ""
    bundle: str | None = None
    cut: int | None = None
    deadline_ms: float | None = None
    tensors: dict[str, Encoded] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def payload_nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


# -- constructors ------------------------------------------------------------------------------
def infer(id: str, bundle: str, cut: int, tensors: Mapping[str, Encoded], deadline_ms: float | None = None,
          **meta: Any) -> Message:
    """An inference request: run the bundle's segments from `cut` on `tensors`."""
    return Message("infer", id, bundle, cut, deadline_ms, dict(tensors), meta)


def result(id: str, tensors: Mapping[str, Encoded], **meta: Any) -> Message:
    """The answer to an infer: the model outputs (meta: timings, worker)."""
    return Message("result", id, tensors=dict(tensors), meta=meta)


def error(id: str, code: str, message: str, **meta: Any) -> Message:
    """An error reply (codes in ERROR_CODES; meta may hold retry_after_ms)."""
    return Message("error", id, meta={"code": code, "message": message, **meta})


def ping(id: str = "", **meta: Any) -> Message:
    return Message("ping", id, meta=meta)


def pong(id: str = "", **meta: Any) -> Message:
    return Message("pong", id, meta=meta)


def hello(id: str = "", bundle: str | None = None, **meta: Any) -> Message:
    """Ask the broker whether it holds `bundle` (also readable as meta["bundle"]); answered by `welcome`."""
    return Message("hello", id, bundle=bundle, meta=meta)


def welcome(id: str = "", bundle: str | None = None, **meta: Any) -> Message:
    """The broker's answer to hello (meta: held, profile, load); `bundle` is also in meta on decode."""
    return Message("welcome", id, bundle=bundle, meta=meta)


def cancel(id: str, **meta: Any) -> Message:
    """The edge no longer wants the answer to request `id` (best effort)."""
    return Message("cancel", id, meta=meta)


def session_end(id: str, session: str, client: str, **meta: Any) -> Message:
    """The edge is done with `session`: the worker holding it may drop its state (never answered)."""
    return Message("session_end", id, meta={"session": session, "client": client, **meta})


def _token(value: Any) -> bool:
    return type(value) is str and len(value) == SESSION_ID_CHARS and _HEX.issuperset(value)


def session_fields(header: Mapping[str, Any], kind: str = "infer") -> tuple[str, int, str] | None:
    """(session, step, client) of a stateful infer (step is -1 for session_end), or None for a stateless one.

    `session` and `client` are 32 lowercase hex chars, `step` an int in [0, 2**40); an infer
    with a session carries all three, a session_end the first and the last. Raises
    MessageError (bad_request) otherwise. Reads only these fields: the broker calls it on the
    header alone.
    """
    rid = header.get("id") if type(header.get("id")) is str else None
    sid = header.get("session")
    if sid is None:
        if kind == "session_end" or "step" in header or "client" in header:
            _fail("'step' and 'client' come only with a 'session'" if kind == "infer"
                  else "a session_end message needs a 'session'", rid)
        return None
    if not _token(sid):
        _fail(f"session must be {SESSION_ID_CHARS} lowercase hex chars, got {_short(sid)}", rid)
    client = header.get("client")
    if not _token(client):
        _fail(f"a session needs a client token of {SESSION_ID_CHARS} lowercase hex chars, got {_short(client)}",
              rid)
    if kind == "session_end":
        return sid, -1, client
    step = header.get("step")
    if not (_int(step) and 0 <= step < _MAX_STEP):
        _fail(f"a session step must be an int in [0, 2**40), got {_short(step)}", rid)
    return sid, step, client


_ENCODE_LIMITS = Limits()
_local = threading.local()


def _packer() -> msgpack.Packer:
    # Reusing a Packer saves its construction on every message; one per thread (it has a buffer).
    p = getattr(_local, "packer", None)
    if p is None:
        p = _local.packer = msgpack.Packer(use_bin_type=True)
    return p


# -- encode ------------------------------------------------------------------------------------
def encode(msg: Message) -> list[Any]:
    """Header frame + one payload frame per tensor; payloads are the codecs' buffers, not copies.

    Send with ``socket.send_multipart(frames, copy=False)``. Raises ProtocolError for a message
    that the peer would refuse (unknown kind, reserved meta key, non-finite number, ...).
    """
    if msg.kind not in KINDS:
        raise ProtocolError(f"unknown message kind {msg.kind!r} (known: {', '.join(sorted(KINDS))})")
    if msg.tensors and msg.kind not in TENSOR_KINDS:
        raise ProtocolError(f"a {msg.kind!r} message carries no tensors")
    meta = dict(msg.meta)
    bundle = msg.bundle
    if "bundle" in meta and (bundle is None or bundle == meta["bundle"]):
        # hello/welcome name their bundle in meta (CONTRACTS.md); the header has one place for it.
        bundle = meta.pop("bundle")
    clash = RESERVED.intersection(meta)
    if clash:
        raise ProtocolError(f"meta keys {sorted(clash)} are reserved header fields")
    header: dict[str, Any] = {"v": VERSION, "kind": msg.kind, "id": msg.id}
    if bundle is not None:
        header["bundle"] = bundle
    if msg.cut is not None:
        header["cut"] = msg.cut
    if msg.deadline_ms is not None:
        header["deadline_ms"] = float(msg.deadline_ms)
    frames: list[Any] = [None]
    if msg.tensors:
        descs = []
        for name, enc in msg.tensors.items():
            if not isinstance(enc, Encoded):
                raise ProtocolError(f"tensor {name!r} must be an Encoded (use a codec), got {type(enc).__name__}")
            nbytes = enc.nbytes
            descs.append({"name": name, "dtype": enc.dtype, "shape": list(enc.shape), "codec": enc.codec,
                          "params": enc.params, "nbytes": nbytes})
            frames.append(enc.payload)
        header["tensors"] = descs
    if meta:
        _check_header_values(meta, _ENCODE_LIMITS, ("meta",))
    header.update(meta)
    try:
        frames[0] = _packer().pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode the {msg.kind} header: {exc}") from None
    return frames


# -- decode ------------------------------------------------------------------------------------
def _fail(message: str, request_id: str | None = None, code: str = "bad_request"):
    raise MessageError(message, code=code, request_id=request_id)


def _buffer(frame: Any, i: int) -> memoryview:
    # zmq.Frame (copy=False), bytes, bytearray, memoryview: all expose the buffer protocol.
    try:
        view = memoryview(frame)
    except TypeError:
        _fail(f"frame {i} is a {type(frame).__name__}, not a bytes-like object")
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B")
        except TypeError:
            _fail(f"frame {i} is not a contiguous byte buffer")
    return view


_SCALAR_TYPES = frozenset({str, int, bool, bytes, type(None)})
_CONTAINER_TYPES = (dict, list, tuple)


def _check_header_values(obj: Any, limits: Limits, where: tuple = ("header",)) -> None:
    """Reject extension types, non-finite floats, non-str keys and deep nesting anywhere.

    Iterative, and paths are only built for containers: this runs on every message.
    """
    max_depth, max_key = limits.max_meta_depth, limits.max_name_length
    stack = [(obj, 0, where)]
    while stack:
        node, depth, path = stack.pop()
        if depth > max_depth:
            raise MessageError(f"{'.'.join(map(str, path))}: nested deeper than {max_depth} levels")
        items = node.items() if type(node) is dict else enumerate(node)
        for k, v in items:
            if type(node) is dict and (type(k) is not str or len(k) > max_key):
                raise MessageError(f"{'.'.join(map(str, path))}: keys must be strings of at most {max_key} chars")
            t = type(v)
            if t in _SCALAR_TYPES:
                continue
            if t is float:
                if not math.isfinite(v):
                    raise MessageError(f"{'.'.join(map(str, path + (k,)))}: number {v!r} is not finite")
            elif t in _CONTAINER_TYPES:
                stack.append((v, depth + 1, path + (k,)))
            elif not isinstance(v, (bytearray, memoryview)):
                raise MessageError(f"{'.'.join(map(str, path + (k,)))}: values of type {t.__name__} are not allowed")


def _str(value: Any, what: str, limits: Limits, rid: str | None, allow_empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > limits.max_name_length or (not allow_empty and not value):
        _fail(f"{what} must be a{' non-empty' if not allow_empty else ''} string of at most "
              f"{limits.max_name_length} chars, got {_short(value)}", rid)
    return value


def _int(value: Any) -> bool:
    return type(value) is int


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KNOWN_CODECS: set[str] = set()


def _known_codec(codec: str) -> bool:
    if codec in _KNOWN_CODECS:
        return True
    names = codec.split("+")
    ok = names[0] in NUMERIC_STAGES and all(n in BYTE_STAGES for n in names[1:]) and len(names) <= 8
    if ok and len(_KNOWN_CODECS) < 512:
        _KNOWN_CODECS.add(codec)
    return ok


def decode(frames: Sequence[Any], limits: Limits = Limits()) -> Message:
    """Parse and check a received message (without a ROUTER identity frame).

    Frames may be zmq.Frame objects (recv_multipart(copy=False)); payloads then stay in ZeroMQ's
    buffers. Raises ProtocolError (a MessageError with .code and .request_id) and nothing else.
    """
    try:
        return _decode(frames, limits)
    except ProtocolError:
        raise
    except RecursionError:
        raise MessageError("header nested too deeply") from None


def decode_header(frames: Sequence[Any], limits: Limits = Limits()) -> dict:
    """Check a message's frame count and sizes, then read and check its header's envelope.

    The envelope is what any reader needs before looking further: a msgpack map, a readable
    request id, and this protocol's version. The broker routes on this alone (the tensors are
    checked by the worker that decodes them); `decode` goes on from here. Raises MessageError.
    """
    try:
        return _read_header(_views(frames, limits), limits)
    except RecursionError:
        raise MessageError("header nested too deeply") from None


def _views(frames: Sequence[Any], limits: Limits) -> list[memoryview]:
    if not isinstance(frames, (list, tuple)):
        _fail(f"a message is a list of frames, got {type(frames).__name__}")
    if not frames:
        _fail("empty message (no header frame)")
    if len(frames) > limits.max_tensors + 1:
        _fail(f"{len(frames) - 1} payload frames exceed the limit of {limits.max_tensors} tensors")
    views = [_buffer(f, i) for i, f in enumerate(frames)]
    total = sum(v.nbytes for v in views)
    if total > limits.max_message_bytes:
        _fail(f"message of {total} bytes exceeds the limit of {limits.max_message_bytes}")
    return views


def _read_header(views: list[memoryview], limits: Limits) -> dict:
    head = views[0]
    if head.nbytes > limits.max_header_bytes:
        _fail(f"header of {head.nbytes} bytes exceeds the limit of {limits.max_header_bytes}")
    if head.nbytes == 0:
        _fail("empty header frame")
    try:
        header = msgpack.unpackb(
            head, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limits.max_header_bytes, max_bin_len=limits.max_header_bytes,
            max_array_len=limits.max_items, max_map_len=limits.max_items, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo (ValueError, ExtraData, FormatError, StackError...)
        _fail(f"header is not valid msgpack ({type(exc).__name__}: {_short(str(exc))})")
    if not isinstance(header, dict):
        _fail(f"header must be a msgpack map, got {type(header).__name__}")
    rid = _request_id(header, limits)
    v = header.get("v")
    if not _int(v):
        _fail(f"header lacks an integer protocol version 'v' (got {_short(v)}); this peer speaks "
              f"version {VERSION}", rid)
    if v != VERSION:
        _fail(f"protocol version {_short(v)} is not supported: this peer speaks version {VERSION}",
              rid, code="version")
    return header


def _request_id(header: dict, limits: Limits) -> str | None:
    rid = header.get("id")
    return rid if type(rid) is str and len(rid) <= limits.max_name_length else None


def _decode(frames: Sequence[Any], limits: Limits) -> Message:
    views = _views(frames, limits)
    header = _read_header(views, limits)
    rid = _request_id(header, limits)
    # Tensor descriptors are checked field by field below (their params by the codec); the
    # generic walk covers everything else.
    meta = {k: val for k, val in header.items() if k not in RESERVED}
    if meta:
        _check_header_values(meta, limits, ("meta",))
    kind = header.get("kind")
    if type(kind) is not str or kind not in KINDS:
        _fail(f"unknown message kind {_short(kind)} (known: {', '.join(sorted(KINDS))})", rid)
    mid = _str(header.get("id", ""), "id", limits, rid)
    bundle = header.get("bundle")
    if bundle is not None:
        _str(bundle, "bundle", limits, rid, allow_empty=False)
    cut = header.get("cut")
    if cut is not None and not (_int(cut) and 0 <= cut <= 1_000_000):
        _fail(f"cut must be a non-negative int, got {_short(cut)}", rid)
    deadline = header.get("deadline_ms")
    if deadline is not None:
        if type(deadline) not in (int, float) or not math.isfinite(deadline):
            _fail(f"deadline_ms must be a finite number, got {_short(deadline)}", rid)
        deadline = float(deadline)
    if kind == "infer":
        if bundle is None or cut is None:
            _fail("an infer message needs 'bundle' and 'cut'", rid)
    if kind in ("infer", "session_end"):
        session_fields(header, kind)
    if kind == "error":
        _str(header.get("code"), "error code", limits, rid, allow_empty=False)
        if not isinstance(header.get("message", ""), str):
            _fail("error message must be a string", rid)

    descs = header.get("tensors", [])
    if not isinstance(descs, list):
        _fail("'tensors' must be a list", rid)
    if descs and kind not in TENSOR_KINDS:
        _fail(f"a {kind!r} message carries no tensors", rid)
    if len(descs) != len(views) - 1:
        _fail(f"header describes {len(descs)} tensors but {len(views) - 1} payload frames came", rid)
    tensors: dict[str, Encoded] = {}
    decoded_total = 0
    for i, d in enumerate(descs):
        enc, size = _tensor(d, views[i + 1], i, limits, rid)
        if d["name"] in tensors:
            _fail(f"tensor {d['name']!r} appears twice", rid)
        decoded_total += size
        if decoded_total > limits.max_decoded_bytes:
            _fail(f"tensors decode to more than the limit of {limits.max_decoded_bytes} bytes", rid)
        tensors[d["name"]] = enc
    if kind in ("hello", "welcome") and bundle is not None:
        meta["bundle"] = bundle  # also where CONTRACTS.md's readers look for it
    return Message(kind, mid, bundle, cut, deadline, tensors, meta)


def _tensor(d: Any, view: memoryview, i: int, limits: Limits, rid: str | None) -> tuple[Encoded, int]:
    if type(d) is not dict:
        _fail(f"tensor {i}: descriptor must be a map", rid)
    try:
        name, dtype, shape, codec, params, nbytes = (d["name"], d["dtype"], d["shape"], d["codec"], d["params"],
                                                     d["nbytes"])
    except KeyError:
        _fail(f"tensor {i}: descriptor lacks {sorted(_TENSOR_KEYS.difference(d))}", rid)
    if type(name) is not str or not name or len(name) > limits.max_name_length:
        _fail(f"tensor {i}: name must be a non-empty string of at most {limits.max_name_length} chars, "
              f"got {_short(name)}", rid)
    if type(dtype) is not str or dtype not in _DTYPES:
        _fail(f"tensor {name!r}: dtype {_short(dtype)} is not allowed (allowed: {', '.join(sorted(_DTYPES))})", rid)
    if type(shape) is not list or len(shape) > limits.max_rank:
        _fail(f"tensor {name!r}: shape must be a list of at most {limits.max_rank} dims", rid)
    count = 1
    max_dim = limits.max_dim
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= max_dim:
            _fail(f"tensor {name!r}: dim {_short(dim)} must be an int in [0, {limits.max_dim}]", rid)
        count *= dim
    size = count * _ITEMSIZE[dtype]
    if size > limits.max_decoded_bytes:
        _fail(f"tensor {name!r}: {dtype}{shape} decodes to {size} bytes, over the limit of "
              f"{limits.max_decoded_bytes}", rid)
    if type(codec) is not str or len(codec) > limits.max_name_length or not _known_codec(codec):
        _fail(f"tensor {name!r}: unknown codec {_short(codec)}", rid)
    if type(params) is not dict:
        _fail(f"tensor {name!r}: params must be a map", rid)
    if type(nbytes) is not int or nbytes != view.nbytes:
        _fail(f"tensor {name!r}: header declares {_short(nbytes)} bytes but its frame has {view.nbytes}", rid)
    enc = Encoded(codec, dtype, tuple(shape), params, view)
    try:
        _validate_encoded(enc, True)
    except CodecError as exc:
        _fail(f"tensor {name!r}: {exc}", rid)
    return enc, size


# -- checks against the bundle -----------------------------------------------------------------
def spec_nbytes(spec: Any, batch: int) -> int | None:
    """Bytes of one tensor of `spec` (a TensorSpec) with its symbolic leading dim at `batch`.

    None when any other dim is symbolic: then the spec alone bounds nothing.
    """
    n = np.dtype(spec.dtype).itemsize
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim >= 0:
            n *= dim
        elif axis == 0:
            n *= batch
        else:
            return None
    return n


def tensors_budget(specs: Iterable[Any], max_batch: int, limits: Limits) -> int:
    """The most raw bytes a message carrying `specs` at up to `max_batch` samples may declare.

    Specs with another symbolic dim than the leading one leave the budget at
    `limits.max_decoded_bytes`; the budget never exceeds it.
    """
    total = 0
    for s in specs:
        n = spec_nbytes(s, max_batch)
        if n is None:
            return limits.max_decoded_bytes
        total += n
    return min(total, limits.max_decoded_bytes)


# A compressor's worst case on incompressible input: zstd adds < 1/256 plus a few block headers,
# LZ4 < 1/255 + 16 bytes. 1/128 + 4 KiB covers both with room.
_FRAME_SLACK = 4096


def max_frame_bytes(specs: Iterable[Any], max_batch: int, limits: Limits) -> int:
    """ZMQ_MAXMSGSIZE for a socket whose messages carry tensors of `specs` (up to `max_batch` samples).

    libzmq checks each frame against it as it arrives, before the whole frame is buffered, and
    drops the connection of a peer that sends a bigger one (without telling it). So it is the
    largest legitimate frame: the bigger of the header limit and the largest tensor at
    `max_batch` with a compressor's worst-case expansion; never more than
    `limits.max_message_bytes`, which is also the bound when a spec has a symbolic dim other
    than the batch (nothing smaller is known to be safe).
    """
    largest = limits.max_header_bytes
    for s in specs:
        n = spec_nbytes(s, max_batch)
        if n is None:
            return limits.max_message_bytes
        largest = max(largest, n + n // 128 + _FRAME_SLACK)
    return min(largest, limits.max_message_bytes)


def declared_nbytes(msg: Message) -> int:
    """Raw bytes the tensors of `msg` decode to, from their declared dtypes and shapes (no decoding)."""
    total = 0
    for enc in msg.tensors.values():
        n = _ITEMSIZE.get(enc.dtype, 8)
        for d in enc.shape:
            n *= d
        total += n
    return total


def check_tensors(msg: Message, specs: Sequence[Any], max_batch: int | None = None,
                  bound: Mapping[str, int] | None = None, max_bytes: int | None = None) -> dict[str, int]:
    """Check that `msg.tensors` are exactly `specs` (a cut's TensorSpecs): names, dtypes, shapes.

    Only the declared fields are read: nothing is decoded, so a caller that checks first bounds
    what decoding may allocate. A symbolic dim (a str such as "N") matches any size, but the same
    symbol must have the same size in every tensor and in `bound` (sizes fixed already, e.g. the
    batch a request was sent with); with `max_batch`, a symbolic leading dim may not exceed it;
    with `max_bytes`, the tensors together may not declare more raw bytes than that.
    Returns the symbol bindings, e.g. {"N": 4}. Raises ProtocolError.
    """
    rid = msg.id
    want = {s.name: s for s in specs}
    missing = [n for n in want if n not in msg.tensors]
    extra = [n for n in msg.tensors if n not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise MessageError(f"tensors do not match the cut: {'; '.join(parts)}", request_id=rid)
    given = dict(bound or {})
    bindings: dict[str, int] = dict(given)
    for name, spec in want.items():
        enc = msg.tensors[name]
        if enc.dtype != spec.dtype:
            raise MessageError(f"tensor {name!r}: dtype {enc.dtype} but the cut needs {spec.dtype}", request_id=rid)
        if not _known_codec(enc.codec):
            raise MessageError(f"tensor {name!r}: unknown codec {enc.codec!r}", request_id=rid)
        if len(enc.shape) != len(spec.shape):
            raise MessageError(
                f"tensor {name!r}: shape {list(enc.shape)} has rank {len(enc.shape)}, the cut needs "
                f"{list(spec.shape)}", request_id=rid)
        for axis, (got, dim) in enumerate(zip(enc.shape, spec.shape)):
            if isinstance(dim, str) or dim is None or (isinstance(dim, int) and dim < 0):
                sym = dim if isinstance(dim, str) else f"?{name}:{axis}"
                if max_batch is not None and axis == 0 and got > max_batch:
                    raise MessageError(f"tensor {name!r}: batch {got} exceeds the limit of {max_batch}",
                                       request_id=rid, reason="oversize")
                bound_to = bindings.setdefault(sym, got)
                if bound_to != got:
                    where = "the request has" if sym in given else "another tensor has"
                    raise MessageError(
                        f"tensor {name!r}: dim {axis} ({sym}) is {got} but {where} {sym}={bound_to}",
                        request_id=rid)
            elif got != dim:
                raise MessageError(
                    f"tensor {name!r}: shape {list(enc.shape)} does not match the cut's {list(spec.shape)}",
                    request_id=rid)
    if max_bytes is not None:
        declared = declared_nbytes(msg)
        if declared > max_bytes:
            raise MessageError(f"tensors declare {declared} bytes, over this cut's budget of {max_bytes}",
                               request_id=rid, reason="oversize")
    return {k: v for k, v in bindings.items() if not k.startswith("?")}


_SNDMORE, _RCVMORE = zmq.SNDMORE, zmq.RCVMORE


# -- sockets -----------------------------------------------------------------------------------
# Every product hop (edge, broker, worker) and the protocol benchmark go through these four.
def send(socket: Any, msg: Message, envelope: Iterable[bytes] = (), flags: int = 0) -> None:
    """Send `msg` on a ZeroMQ socket without copying payloads (ROUTER: pass the identity as envelope)."""
    frames = [*envelope, *encode(msg)]
    send_frames(socket, frames, len(frames) - len(msg.tensors), flags)


def send_frames(socket: Any, frames: Sequence[Any], small: int, flags: int = 0) -> None:
    """Send one multipart message: the first `small` frames as plain copies, the rest without a copy.

    The small frames (envelope, control, header) cost less as copies than as zero-copy frames
    (and less than send_multipart's per-part dispatch); payloads, and frames received with
    recv_frames, are passed on without a copy.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        more = _SNDMORE if i < last else 0
        if i < small:
            socket.send(frame, flags | more)
        else:
            socket.send(frame, flags | more, copy=False)


def recv(socket: Any, limits: Limits = Limits(), envelope: int = 0, flags: int = 0) -> tuple[list[Any], Message]:
    """Receive one message; returns (envelope frames, Message). ROUTER: envelope=1 (the identity)."""
    frames = recv_frames(socket, envelope + 1, flags)
    if len(frames) < envelope:
        raise MessageError("message shorter than its envelope")
    return frames[:envelope], decode(frames[envelope:], limits)


def recv_frames(socket: Any, small: int = 1, flags: int = 0) -> list[Any]:
    """Receive one multipart message: the first `small` frames as bytes, the rest as zmq.Frames.

    Small frames (envelope, control, header) are cheaper as bytes than as zmq.Frame objects
    (the socket's ZMQ_MAXMSGSIZE bounds what a peer can make us copy); payload frames stay
    zero-copy in ZeroMQ's buffers. `flags` (e.g. zmq.NOBLOCK) applies to the first frame: the
    rest of a multipart message is delivered with it.
    """
    frames: list[Any] = [socket.recv(flags)]
    while socket.get(_RCVMORE):
        frames.append(socket.recv(copy=len(frames) < small))
    return frames
