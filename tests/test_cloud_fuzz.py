"""Hostile edges: garbage, truncated frames, huge declared sizes, wrong dtypes, unknown bundles.

Each bad message gets an error reply or nothing, and the server keeps serving well-formed
requests from the same and other clients, without a single traceback in its log.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesplit import protocol as P
from edgesplit.codecs import get_codec
from test_cloud_support import Edge, ServeProc, mlp_bundle, mlp_reference


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzrepo")
    bundle = mlp_bundle(root / "mlp")
    with ServeProc(root, workers=1, heartbeat_ms=200) as server:
        good = Edge(server.address)
        yield server, bundle, good
        good.close()
        assert server.proc.poll() is None, "the server died"
        assert not [line for line in server.err if "Traceback" in line], "\n".join(server.err[-40:])


def _valid_frames(bundle, rid="v", x=None, **meta):
    x = np.ones((2, 32), np.float32) if x is None else x
    return P.encode(P.infer(rid, bundle.id, 1, {"h": get_codec("raw").encode(x)}, deadline_ms=5000.0, **meta))


def _header(frames):
    return msgpack.unpackb(frames[0], raw=False)


def _pack(h):
    return msgpack.packb(h, use_bin_type=True)


def _check_still_serving(edge, bundle, tag):
    x = np.random.default_rng(abs(hash(tag)) % 1000).standard_normal((2, 16)).astype(np.float32)
    edge.send_infer(f"ok-{tag}", bundle.id, 0, {"x": x})
    while True:
        msg = edge.recv(timeout_ms=10_000)
        assert msg is not None, "no answer to a good request after bad ones"
        if msg.id == f"ok-{tag}":
            assert msg.kind == "result", msg.meta
            np.testing.assert_allclose(edge.outputs(msg)["y"], mlp_reference(x, bundle.path), rtol=1e-4, atol=1e-4)
            return
        assert msg.kind == "error", (msg.kind, msg.id)


def _hostile(bundle):
    """(name, frames) of messages a broken or malicious edge might send."""
    good = _valid_frames(bundle)
    h = _header(good)
    payload = good[1]
    cases = {
        "empty-frame": [b""],
        "garbage": [b"\xc1\xff\x00garbage"],
        "garbage-multi": [b"\x93\x01\x02", b"x" * 100, b""],
        "msgpack-list": [_pack([1, 2, 3])],
        "msgpack-int": [_pack(7)],
        "no-version": [_pack({k: v for k, v in h.items() if k != "v"}), payload],
        "version-2": [_pack({**h, "v": 2}), payload],
        "version-str": [_pack({**h, "v": "1"}), payload],
        "unknown-kind": [_pack({**h, "kind": "exec"}), payload],
        "id-not-str": [_pack({**h, "id": 12}), payload],
        "id-huge": [_pack({**h, "id": "i" * 100_000}), payload],
        "no-bundle": [_pack({k: v for k, v in h.items() if k != "bundle"}), payload],
        "bundle-int": [_pack({**h, "bundle": 5}), payload],
        "unknown-bundle": [_pack({**h, "bundle": "0" * 64}), payload],
        "cut-negative": [_pack({**h, "cut": -1}), payload],
        "cut-str": [_pack({**h, "cut": "1"}), payload],
        "cut-huge": [_pack({**h, "cut": 2**62}), payload],
        "cut-past-end": [_pack({**h, "cut": 2}), payload],
        "deadline-nan": [_pack({**h, "deadline_ms": math.nan}), payload],
        "deadline-str": [_pack({**h, "deadline_ms": "soon"}), payload],
        "deadline-negative": [_pack({**h, "deadline_ms": -5.0}), payload],
        "truncated-payload": [good[0], bytes(payload)[:-7]],
        "missing-payload": [good[0]],
        "extra-frame": [good[0], payload, b"extra"],
        "huge-shape": [_pack({**h, "tensors": [{**h["tensors"][0], "shape": [2**31, 2**31]}]}), payload],
        "huge-nbytes": [_pack({**h, "tensors": [{**h["tensors"][0], "nbytes": 2**40}]}), payload],
        "shape-mismatch": [_pack({**h, "tensors": [{**h["tensors"][0], "shape": [3, 32]}]}), payload],
        "wrong-dtype": [_pack({**h, "tensors": [{**h["tensors"][0], "dtype": "float64",
                                                 "shape": [1, 32]}]}), payload],
        "bad-dtype": [_pack({**h, "tensors": [{**h["tensors"][0], "dtype": "object"}]}), payload],
        "dtype-int": [_pack({**h, "tensors": [{**h["tensors"][0], "dtype": 7}]}), payload],
        "unknown-codec": [_pack({**h, "tensors": [{**h["tensors"][0], "codec": "pickle"}]}), payload],
        "int8-no-params": [_pack({**h, "tensors": [{**h["tensors"][0], "codec": "int8",
                                                     "nbytes": 64}]}), bytes(64)],
        "zstd-bomb": [_pack({**h, "tensors": [{**h["tensors"][0], "codec": "raw+zstd", "nbytes": 9}]}),
                      b"\x28\xb5\x2f\xfd\x00\x00\x00\x00\x00"],
        "wrong-tensor-name": [_pack({**h, "tensors": [{**h["tensors"][0], "name": "x"}]}), payload],
        "two-same-names": [_pack({**h, "tensors": [h["tensors"][0], h["tensors"][0]]}), payload, payload],
        "tensors-not-list": [_pack({**h, "tensors": {"h": 1}}), payload],
        "descriptor-not-map": [_pack({**h, "tensors": [5]}), payload],
        "nested-meta": [_pack({**h, "x": [[[[[[[[[[[[1]]]]]]]]]]]]}), payload],
        "reserved-ext": [good[0][:-1] + b"\xd4\x01\x00", payload],
        "reply-codec-junk": _valid_frames(bundle, rid="rc", reply_codec="nope+nope"),
        "reply-codec-int": [_pack({**h, "reply_codec": 3}), payload],
        "header-too-big": [_pack({**h, "pad": "p" * (300 << 10)}), payload],
        "too-many-frames": [good[0]] + [b"x"] * 200,
        "result-from-edge": P.encode(P.result("r", {})),
        "error-from-edge": P.encode(P.error("e", "internal", "boo")),
        "pong-from-edge": P.encode(P.pong("p")),
        "welcome-from-edge": P.encode(P.welcome("w", bundle="b")),
        "hello-no-bundle": [_pack({"v": 1, "kind": "hello", "id": "h"})],
        "cancel-unknown": P.encode(P.cancel("nobody")),
        "map-bomb": [b"\xdf\xff\xff\xff\xff"],
        "array-bomb": [b"\xdd\xff\xff\xff\xff"],
        "str-bomb": [b"\xdb\xff\xff\xff\xff"],
    }
    return cases


def test_every_hostile_message_gets_an_error_or_nothing(served):
    server, bundle, good = served
    bad = Edge(server.address)
    try:
        for i, (name, frames) in enumerate(_hostile(bundle).items()):
            bad.send_raw([bytes(f) for f in frames])
            silent = name.endswith("-from-edge") or name.startswith("cancel")  # answers are not answered
            msg = bad.recv(timeout_ms=300 if silent else 5000)
            if not silent:
                assert msg is not None, name
            if msg is not None:
                assert msg.kind == "error", (name, msg.kind, msg.meta)
                if msg.kind == "error":
                    assert msg.meta["code"] in P.ERROR_CODES, name
            if i % 8 == 0:
                _check_still_serving(good, bundle, name)
        _check_still_serving(bad, bundle, "bad-client-too")
        _check_still_serving(good, bundle, "end")
    finally:
        bad.close()
    assert server.metric("edgesplit_requests_total", 'outcome="bad_request"') >= 20
    assert server.metric("edgesplit_live_workers") == 1.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_messages_never_break_the_server(served, data):
    server, bundle, good = served
    frames = [bytes(f) for f in _valid_frames(bundle, rid="m")]
    how = data.draw(st.sampled_from(["flip", "truncate", "splice", "frames"]))
    if how == "flip":
        head = bytearray(frames[0])
        for pos in data.draw(st.lists(st.integers(0, len(head) - 1), min_size=1, max_size=4)):
            head[pos] ^= data.draw(st.integers(1, 255))
        frames[0] = bytes(head)
    elif how == "truncate":
        i = data.draw(st.integers(0, len(frames) - 1))
        frames[i] = frames[i][: data.draw(st.integers(0, max(0, len(frames[i]) - 1)))]
    elif how == "splice":
        frames[0] = frames[0] + data.draw(st.binary(min_size=1, max_size=64))
    else:
        frames = data.draw(st.lists(st.binary(max_size=256), min_size=1, max_size=5))
    good.send_raw(frames)
    msg = good.recv(timeout_ms=2000)
    if msg is not None and msg.kind == "result":
        assert set(msg.tensors) == {"y"}  # a mutation that left a well-formed request (e.g. in meta)
    elif msg is not None:
        assert msg.kind == "error" and msg.meta["code"] in P.ERROR_CODES
    if data.draw(st.integers(0, 9)) == 0:
        _check_still_serving(good, bundle, f"hyp-{how}")
