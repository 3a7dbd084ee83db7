"""Wire protocol: round trips over real ZeroMQ sockets, strict checks, and a fuzz test that feeds
arbitrary and mutated frames to the decoder (it returns or raises ProtocolError, nothing else,
and never allocates more than its limits allow)."""

from __future__ import annotations

import os
import tracemalloc

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesplit import protocol as P
from edgesplit.bundle import TensorSpec
from edgesplit.codecs import decode as decode_tensor
from edgesplit.codecs import get_codec
from edgesplit.errors import CodecError, ConfigError, ProtocolError

CODECS = ["raw", "fp16", "bf16", "int8", "int8:pc", "int4", "int6+zstd", "int8+zstd", "fp16+lz4", "zstd", "lz4",
          "int6:pt+pred+zstd"]


def _msg(n=2, codec="int8+zstd", **meta):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": get_codec(codec).encode(rng.standard_normal((1, 4, 3, 3)).astype(np.float32))
               for i in range(n)}
    return P.infer("req-1", "b" * 64, 2, tensors, deadline_ms=25.5, reply_codec="raw", **meta)


def test_round_trip_all_kinds():
    cases = [
        _msg(),
        P.result("r", {"y": get_codec("raw").encode(np.arange(10, dtype=np.int64))},
                 timings={"queue_ms": 0.1, "decode_ms": 0.2, "compute_ms": 3.0, "encode_ms": 0.1}, worker="w0"),
        P.error("r", "busy", "queue full", retry_after_ms=12.5),
        P.ping(), P.pong("p", load={"workers": 2, "queued": 0, "inflight": 1, "est_wait_ms": 0.0}),
        P.hello("h", bundle="b" * 64), P.welcome("h", bundle="b" * 64, held=True,
                                                  profile={"segment_ms": None, "device": "cpu"}),
        P.cancel("r"),
    ]
    for msg in cases:
        back = P.decode(P.encode(msg))
        if msg.kind in ("hello", "welcome"):
            assert back.bundle == back.meta.pop("bundle") == "b" * 64
            msg.bundle = back.bundle
        assert (back.kind, back.id, back.bundle, back.cut, back.deadline_ms, back.meta) == \
            (msg.kind, msg.id, msg.bundle, msg.cut, msg.deadline_ms, msg.meta)
        assert list(back.tensors) == list(msg.tensors)
        for name, enc in msg.tensors.items():
            assert np.array_equal(decode_tensor(back.tensors[name]), decode_tensor(enc))


def test_payload_frames_are_the_codec_buffers():
    msg = P.result("r", {"x": get_codec("raw").encode(np.ones((64, 64), np.float32))})
    frames = P.encode(msg)
    assert frames[1] is msg.tensors["x"].payload  # handed to ZeroMQ as-is, no copy
    back = P.decode(frames)
    assert np.shares_memory(np.frombuffer(back.tensors["x"].payload, np.uint8),
                            np.frombuffer(frames[1], np.uint8))


def _sockets():
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvtimeo = 5000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.rcvtimeo = 5000
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


def test_dealer_router_loopback_round_trip():
    router, dealer = _sockets()
    try:
        x = np.random.default_rng(1).standard_normal((2, 16, 8, 8)).astype(np.float32)
        P.send(dealer, P.infer("a1", "b" * 64, 1, {"h": get_codec("int8:pc+zstd").encode(x)}, deadline_ms=100))
        env, msg = P.recv(router, envelope=1)
        assert msg.kind == "infer" and msg.id == "a1" and msg.cut == 1
        assert isinstance(msg.tensors["h"].payload, memoryview)
        h = decode_tensor(msg.tensors["h"])
        assert np.abs(h - x).max() < 0.05
        P.send(router, P.result("a1", {"y": get_codec("raw").encode(h.sum(axis=(2, 3)))}), envelope=env)
        _, reply = P.recv(dealer)
        assert reply.kind == "result" and reply.id == "a1"
        assert np.allclose(decode_tensor(reply.tensors["y"]), h.sum(axis=(2, 3)))
        # A bad message over the socket is a ProtocolError that still knows the request id.
        dealer.send_multipart([msgpack.packb({"v": 1, "kind": "infer", "id": "bad", "bundle": "b", "cut": 1,
                                              "tensors": [{"name": "h"}]}), b"x"])
        with pytest.raises(P.MessageError) as info:
            P.recv(router, envelope=1)
        assert info.value.request_id == "bad" and info.value.code == "bad_request"
    finally:
        router.close()
        dealer.close()


def test_unknown_version_names_both_versions():
    frames = P.encode(P.ping("x"))
    header = msgpack.unpackb(frames[0])
    header["v"] = 7
    with pytest.raises(P.MessageError, match=r"version 7 .*version 1") as info:
        P.decode([msgpack.packb(header)])
    assert info.value.code == "version" and info.value.request_id == "x"
    assert P.error_code(info.value) == "version"


def _with_header(frames, **changes):
    header = msgpack.unpackb(frames[0])
    for k, v in changes.items():
        if v is ...:
            header.pop(k, None)
        else:
            header[k] = v
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def _with_tensor(frames, i=0, **changes):
    header = msgpack.unpackb(frames[0])
    header["tensors"][i].update(changes)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def test_schema_violations_are_protocol_errors():
    f = P.encode(_msg())
    bad = {
        "no frames": [],
        "not a list": "abc",
        "not bytes": [12],
        "garbage header": [b"\xc1\xc1\xc1"],
        "header is a list": [msgpack.packb([1, 2])],
        "missing version": _with_header(f, v=...),
        "kind": _with_header(f, kind="launch_missiles"),
        "id type": _with_header(f, id=5),
        "cut negative": _with_header(f, cut=-1),
        "cut bool": _with_header(f, cut=True),
        "infer without bundle": _with_header(f, bundle=...),
        "deadline nan": _with_header(f, deadline_ms=float("nan")),
        "deadline str": _with_header(f, deadline_ms="soon"),
        "meta inf": _with_header(f, load={"est_wait_ms": float("inf")}),
        "too few frames": f[:-1],
        "too many frames": f + [b"extra"],
        "tensors not list": _with_header(f, tensors={}),
        "dtype": _with_tensor(f, dtype="object"),
        "dtype complex": _with_tensor(f, dtype="complex64"),
        "codec": _with_tensor(f, codec="pickle"),
        "nbytes": _with_tensor(f, nbytes=3),
        "shape negative": _with_tensor(f, shape=[1, -4, 3, 3]),
        "shape float": _with_tensor(f, shape=[1, 4.0, 3, 3]),
        "shape rank": _with_tensor(f, shape=[1] * 20),
        "shape huge": _with_tensor(f, shape=[1 << 40, 1 << 40]),
        "shape mismatch": _with_tensor(f, shape=[1, 4, 3, 4]),
        "params": _with_tensor(f, params=[]),
        "scale": _with_tensor(f, params={"bits": 8, "scale": -1.0, "zero": 0, "packed": False}),
        "name empty": _with_tensor(f, name=""),
        "name long": _with_tensor(f, name="x" * 5000),
        "duplicate names": _with_tensor(f, 1, name="t0"),
        "descriptor keys": [msgpack.packb({**msgpack.unpackb(f[0]), "tensors": [{"name": "a"}, {}]}), *f[1:]],
        "error without code": [msgpack.packb({"v": 1, "kind": "error", "id": "x"})],
        "ping with tensors": _with_header(f, kind="ping"),
        "ext type": [msgpack.packb({"v": 1, "kind": "ping", "id": msgpack.ExtType(1, b"x")})],
        "deep meta": [msgpack.packb({"v": 1, "kind": "ping", "id": "x", "m": [[[[[[[[[[[1]]]]]]]]]]]})],
        "non-str key": [b"\x83\xa1v\x01\xa4kind\xa4ping\x01\x02"],
        "bad utf8": [b"\x83\xa1v\x01\xa4kind\xa4ping\xa2id\xa2\xff\xfe"],
        "trailing bytes": [msgpack.packb({"v": 1, "kind": "ping", "id": "x"}) + b"\x00"],
    }
    for why, frames in bad.items():
        with pytest.raises(ProtocolError):
            P.decode(frames)
            pytest.fail(f"accepted: {why}")


def test_limits_are_checked_before_parsing():
    msg = _msg(n=3, codec="raw")
    frames = P.encode(msg)
    total = sum(memoryview(f).nbytes for f in frames)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        P.decode(frames, P.Limits(max_message_bytes=total - 1))
    P.decode(frames, P.Limits(max_message_bytes=total))
    with pytest.raises(ProtocolError, match="tensors"):
        P.decode(frames, P.Limits(max_tensors=2))
    with pytest.raises(ProtocolError, match="header of"):
        P.decode(frames, P.Limits(max_header_bytes=50))
    with pytest.raises(ProtocolError, match="decode"):
        P.decode(frames, P.Limits(max_decoded_bytes=100))
    with pytest.raises(ProtocolError, match="dims"):
        P.decode(frames, P.Limits(max_rank=3))
    with pytest.raises(ConfigError):
        P.Limits(max_tensors=0)


def test_encode_refuses_what_a_peer_would_refuse():
    with pytest.raises(ProtocolError):
        P.encode(P.Message("launch"))
    with pytest.raises(ProtocolError):
        P.encode(P.ping(cut=3))  # reserved key as meta
    with pytest.raises(ProtocolError):
        P.encode(P.pong(load={"est_wait_ms": float("inf")}))
    with pytest.raises(ProtocolError):
        P.encode(P.ping(obj=object()))
    with pytest.raises(ProtocolError):
        P.encode(P.Message("ping", tensors={"x": get_codec("raw").encode(np.zeros(1))}))


def test_check_tensors_against_cut_specs():
    specs = [TensorSpec("a", "float32", ("N", 4, 3, 3)), TensorSpec("b", "float32", ("N", 4, 3, 3))]
    rng = np.random.default_rng(0)

    def msg(shapes, dtype=np.float32, names=("a", "b")):
        return P.infer("i", "b", 1, {n: get_codec("raw").encode(rng.standard_normal(s).astype(dtype))
                                      for n, s in zip(names, shapes)})

    assert P.check_tensors(msg([(2, 4, 3, 3), (2, 4, 3, 3)]), specs) == {"N": 2}
    assert P.check_tensors(msg([(0, 4, 3, 3), (0, 4, 3, 3)]), specs) == {"N": 0}
    bad = [
        (msg([(2, 4, 3, 3), (3, 4, 3, 3)]), "another tensor"),
        (msg([(2, 4, 3, 3)], names=("a",)), "missing"),
        (msg([(2, 4, 3, 3)] * 3, names=("a", "b", "c")), "unexpected"),
        (msg([(2, 4, 3, 3), (2, 4, 3, 4)]), "does not match"),
        (msg([(2, 4, 3, 3), (2, 4, 3)]), "rank"),
        (msg([(2, 4, 3, 3)] * 2, dtype=np.float64), "dtype"),
    ]
    for m, why in bad:
        with pytest.raises(ProtocolError, match=why):
            P.check_tensors(m, specs)
    with pytest.raises(ProtocolError, match="batch"):
        P.check_tensors(msg([(9, 4, 3, 3), (9, 4, 3, 3)]), specs, max_batch=8)


def test_check_tensors_with_a_real_bundle(mlp_bundle):
    cut = mlp_bundle.cut(1)
    h = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    msg = P.decode(P.encode(P.infer("i", mlp_bundle.id, 1, {"h": get_codec("int8+zstd").encode(h)})))
    assert P.check_tensors(msg, cut.specs, max_batch=8) == {"N": 3}
    with pytest.raises(ProtocolError):
        P.check_tensors(msg, mlp_bundle.cut(0).specs)


# -- fuzzing ------------------------------------------------------------------------------------
FUZZ_LIMITS = P.Limits(max_message_bytes=64 << 10, max_header_bytes=8 << 10, max_decoded_bytes=256 << 10,
                       max_tensors=4, max_items=256)

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def valid_frames(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for i in range(draw(st.integers(0, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
        dtype = draw(st.sampled_from(["float32", "float16", "int64", "uint8", "bool"]))
        x = (rng.standard_normal(shape) * 4).astype(dtype)
        tensors[f"t{i}"] = get_codec(draw(st.sampled_from(CODECS))).encode(x)
    kind = draw(st.sampled_from(["infer", "result"])) if tensors else draw(st.sampled_from(sorted(P.KINDS)))
    msg = P.Message(kind, "id", bundle="b", cut=1, deadline_ms=5.0, tensors=tensors,
                    meta={"code": "busy", "message": "m"} if kind == "error" else {})
    return [bytes(memoryview(f)) for f in P.encode(msg)]


@st.composite
def mutated_frames(draw):
    frames = draw(valid_frames())
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "drop", "add", "header_value", "header_raw", "swap"]))
        i = draw(st.integers(0, max(len(frames) - 1, 0))) if frames else 0
        if op == "flip" and frames and frames[i]:
            b = bytearray(frames[i])
            for _ in range(draw(st.integers(1, 4))):
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
            frames[i] = bytes(b)
        elif op == "truncate" and frames:
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
        elif op == "drop" and frames:
            frames.pop(i)
        elif op == "add":
            frames.insert(draw(st.integers(0, len(frames))), draw(st.binary(max_size=64)))
        elif op == "header_value" and frames:
            try:
                header = msgpack.unpackb(frames[0], strict_map_key=False)
            except Exception:
                continue
            if isinstance(header, dict):
                target = header
                if header.get("tensors") and draw(st.booleans()):
                    target = header["tensors"][draw(st.integers(0, len(header["tensors"]) - 1))]
                    if draw(st.booleans()) and isinstance(target.get("params"), dict):
                        target = target["params"]
                keys = sorted(target, key=str) + ["v", "shape", "nbytes", "scale", "bits", "zero"]
                target[draw(st.sampled_from(keys))] = draw(_json)
                frames[0] = msgpack.packb(header, use_bin_type=True)
        elif op == "header_raw" and frames:
            frames[0] = draw(st.binary(max_size=200))
        elif op == "swap" and len(frames) > 2:
            frames[1], frames[-1] = frames[-1], frames[1]
    return frames


_HEADER_KEYS = ["v", "kind", "id", "bundle", "cut", "deadline_ms", "tensors", "code", "message", "load"]
_TENSOR_FIELDS = ["name", "dtype", "shape", "codec", "params", "nbytes"]
_PARAM_KEYS = ["bits", "scale", "zero", "packed", "axis", "scales", "zeros", "shuffle", "pred", "block", "order", "plane"]


@st.composite
def field_mutated_frames(draw):
    """A valid message with exactly one known field (header, descriptor or param) replaced."""
    frames = draw(valid_frames())
    header = msgpack.unpackb(frames[0])
    value = draw(_json | st.sampled_from([[], {}, [1], -1, 0, 2**63, 1e308, float("nan"), "", "x" * 300]))
    where = draw(st.sampled_from(["header", "tensor", "params"]))
    if where != "header" and header.get("tensors"):
        desc = header["tensors"][draw(st.integers(0, len(header["tensors"]) - 1))]
        if where == "params":
            desc["params"][draw(st.sampled_from(_PARAM_KEYS))] = value
        else:
            desc[draw(st.sampled_from(_TENSOR_FIELDS))] = value
    else:
        header[draw(st.sampled_from(_HEADER_KEYS))] = value
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def _decode_fully(frames):
    """What a server does with received frames: decode the message, then each tensor."""
    try:
        msg = P.decode(frames, FUZZ_LIMITS)
    except ProtocolError:
        return None
    for enc in msg.tensors.values():
        try:
            arr = decode_tensor(enc)
        except CodecError:
            continue
        assert arr.shape == enc.shape and arr.dtype.name == enc.dtype
    return msg


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    mutated_frames(),
    field_mutated_frames(),
    valid_frames(),
    st.lists(st.binary(max_size=300), max_size=6),
    st.lists(_json.map(lambda v: msgpack.packb(v, use_bin_type=True)), min_size=1, max_size=3),
))
def test_fuzz_decoder_only_raises_protocol_error_and_stays_within_limits(frames):
    tracemalloc.start()
    try:
        _decode_fully(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Decoding a tensor holds at most its codes plus the float output: about twice the limit.
    assert peak <= 2 * FUZZ_LIMITS.max_decoded_bytes + (64 << 10)


def test_a_tiny_frame_declaring_a_huge_tensor_allocates_nothing_big():
    # 1 GB of zeros compresses to a few KB; the header claims it; the limits refuse it first.
    small = get_codec("int8:pt+zstd").encode(np.zeros((64, 64), np.float32))
    frames = _with_tensor(P.encode(P.result("r", {"x": small})), shape=[16384, 65536])
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="limit"):
            P.decode(frames, P.Limits(max_decoded_bytes=64 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # Within the limits, a shape that disagrees with the zstd frame is refused before decompressing.
    frames = _with_tensor(P.encode(P.result("r", {"x": small})), shape=[4096, 4096])
    with pytest.raises(ProtocolError, match="frame declares"):
        P.decode(frames)
