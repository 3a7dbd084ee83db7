"""Hostile input against a real server (`python -m cloud_server`) and a malicious server against a real agent.

Each attack is answered with `bad_request` (or the connection is dropped, for a frame over the
socket bound) while the processes' peak memory (VmHWM in /proc/PID/status) stays bounded and a
well-behaved client keeps getting correct answers. Times are printed, never asserted: these
tests must hold on a busy machine. docs/cloud.md "Defences" quotes the figures
(``pytest -s tests/test_hostile.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from edgesplit import protocol as P
from edgesplit.codecs import Encoded, get_codec
from test_cloud_support import REPO, Edge, ServeProc, echo_bundle, mlp_bundle, mlp_reference

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")

MIB = 1 << 20
ECHO_ELEMS = 1 << 18  # echo: h[N, 262144] float32, 1 MiB per sample
MAX_REQUEST_BATCH = 8  # so the largest legitimate echo request is 8 MiB


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    mlp_bundle(root / "mlp")
    echo_bundle(root / "echo", elems=ECHO_ELEMS)
    return root


@pytest.fixture(scope="module")
def server(repo):
    with ServeProc(repo, workers=1, heartbeat_ms=200,
                   extra=["--max-batch", "8", "--max-request-batch", str(MAX_REQUEST_BATCH)]) as s:
        yield s


def _bundles(repo):
    from edgesplit.bundle import Bundle

    return Bundle.load(repo / "mlp"), Bundle.load(repo / "echo")


def _pids(server) -> dict[str, int]:
    return {"broker": server.proc.pid, **{f"worker{i}": p for i, p in enumerate(server.worker_pids())}}


def _good_client_ok(edge: Edge, mlp, rid: str, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((2, 16)).astype(np.float32)
    edge.send_infer(rid, mlp.id, 0, {"x": x})
    msg = edge.recv(timeout_ms=60_000)
    assert msg is not None and msg.kind == "result" and msg.id == rid, msg
    np.testing.assert_allclose(edge.outputs(msg)["y"], mlp_reference(x, mlp.path), rtol=1e-4, atol=1e-4)


def _send(edge: Edge, rid: str, bundle: str, name: str, enc: Encoded, cut: int = 1) -> P.Message:
    P.send(edge.sock, P.infer(rid, bundle, cut, {name: enc}))
    t = time.perf_counter()
    msg = edge.recv(timeout_ms=60_000)
    print(f"  {rid}: {msg.kind if msg else None} {msg.meta.get('code') if msg else ''} "
          f"in {(time.perf_counter() - t) * 1e3:.0f} ms")
    assert msg is not None and msg.id == rid
    return msg


def _zstd_frame(nbytes: int, declare: int | None = None) -> bytes:
    """A zstd frame of `nbytes` zeros (compressed as a stream: the zeros are never in memory),
    whose header declares `declare` bytes instead when given (a lying frame)."""
    import zstandard

    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=nbytes)
    chunk = bytes(MIB)
    parts = [cobj.compress(chunk) for _ in range(nbytes // MIB)]
    parts.append(cobj.flush())
    frame = bytearray(b"".join(parts))
    if declare is not None:
        fhd = frame[4]
        fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
        assert fcs_flag == 2, "this helper patches 4-byte content sizes only"
        at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
        frame[at:at + 4] = declare.to_bytes(4, "little")
    return bytes(frame)


def test_bombs_huge_batches_and_non_finite_are_refused_before_decoding(server, repo):
    mlp, echo = _bundles(repo)
    edge = Edge(server.address)
    try:
        _good_client_ok(edge, mlp, "good-0")
        # 1. The bomb: 28.8 kB of zstd declaring h[900, 262144] (900 MiB) to decompress.
        bomb = _zstd_frame(900 * MIB)
        print(f"  bomb: {len(bomb)} bytes of zstd for 900 MiB")
        msg = _send(edge, "bomb", echo.id, "h", Encoded("raw+zstd", "float32", (900, ECHO_ELEMS), {}, bomb))
        assert msg.kind == "error" and msg.meta["code"] == "bad_request"
        assert "batch 900 exceeds the limit of 8" in msg.meta["message"]
        _good_client_ok(edge, mlp, "good-1", 1)
        # 2. A huge batch: N = 100000 on the mlp cut (12.8 MB raw, zstd'd under the socket bound;
        #    raw, its frame would be over the bound and dropped by the socket: see below).
        h = np.zeros((100_000, 32), np.float32)
        msg = _send(edge, "huge-n", mlp.id, "h", get_codec("raw+zstd").encode(h))
        assert msg.kind == "error" and msg.meta["code"] == "bad_request" and "batch 100000" in msg.meta["message"]
        # 3. A lying frame within the budget: declares 8 MiB (h[8, 262144]) but expands to 512 MiB.
        liar = _zstd_frame(512 * MIB, declare=8 * MIB)
        msg = _send(edge, "liar-zstd", echo.id, "h", Encoded("raw+zstd", "float32", (8, ECHO_ELEMS), {}, liar))
        assert msg.kind == "error" and msg.meta["code"] == "bad_request" and "zstd" in msg.meta["message"]
        # 4. The same with LZ4: 64 MiB of zeros in a block declared as 8 MiB.
        import lz4.block

        block = lz4.block.compress(bytes(64 * MIB), store_size=False)
        msg = _send(edge, "liar-lz4", echo.id, "h", Encoded("raw+lz4", "float32", (8, ECHO_ELEMS), {}, block))
        assert msg.kind == "error" and msg.meta["code"] == "bad_request" and "lz4" in msg.meta["message"]
        _good_client_ok(edge, mlp, "good-2", 2)
        # 5. Non-finite inputs: refused by default and counted.
        for rid, bad in (("nan", np.nan), ("inf", -np.inf)):
            h = np.ones((2, 32), np.float32)
            h[1, 3] = bad
            msg = _send(edge, rid, mlp.id, "h", get_codec("raw").encode(h))
            assert msg.kind == "error" and msg.meta["code"] == "bad_request" and "NaN or infinity" in msg.meta["message"]
        # 6. The largest legitimate request still passes (8 MiB, at max_request_batch).
        x = np.random.default_rng(3).standard_normal((MAX_REQUEST_BATCH, ECHO_ELEMS)).astype(np.float32)
        for codec in ("raw", "raw+zstd"):
            msg = _send(edge, f"max-{codec}", echo.id, "h", get_codec(codec).encode(x))
            assert msg.kind == "result", msg.meta
            np.testing.assert_array_equal(edge.outputs(msg)["y"], x)
        _good_client_ok(edge, mlp, "good-3", 3)
        assert server.metric("edgesplit_refused_requests_total", 'reason="non_finite"') >= 2
        assert server.metric("edgesplit_refused_requests_total", 'reason="oversize"') >= 2
        assert server.metric("edgesplit_refused_requests_total", 'reason="bad_payload"') >= 2
        peaks = {k: vm_hwm(p) for k, p in _pids(server).items()}
        print("  peak RSS (MiB):", {k: round(v / MIB) for k, v in peaks.items()})
        assert peaks["broker"] < 400 * MIB
        assert all(v < 1024 * MIB for k, v in peaks.items() if k.startswith("worker"))
    finally:
        edge.close()


def _oversize_frame_attack(server, mlp, size: int) -> float:
    """One DEALER sends a `size`-byte frame to the front; returns the seconds until the broker
    dropped it (seen as a good client's answer coming through after it)."""
    ctx = zmq.Context()
    attacker = ctx.socket(zmq.DEALER)
    attacker.linger = 0
    attacker.connect(server.address)
    payload = bytearray(size)  # zeros: calloc'd, so this process does not pay for it up front
    t = time.perf_counter()
    attacker.send_multipart([P.encode(P.ping("x"))[0], payload], copy=False)
    edge = Edge(server.address)
    try:
        _good_client_ok(edge, mlp, f"after-{size}")
        # the attacker's connection was dropped silently: nothing ever comes back for it
        assert not attacker.poll(500)
        return time.perf_counter() - t
    finally:
        edge.close()
        attacker.close(0)
        ctx.term()


def test_a_600_mb_frame_is_dropped_by_the_socket_not_buffered(server, repo):
    mlp, _ = _bundles(repo)
    secs = _oversize_frame_attack(server, mlp, 600 * MIB)
    peaks = {k: vm_hwm(p) for k, p in _pids(server).items()}
    print(f"  600 MB frame: good client answered {secs:.2f} s after it; peak RSS (MiB):",
          {k: round(v / MIB) for k, v in peaks.items()})
    assert peaks["broker"] < 400 * MIB
    assert all(v < 1024 * MIB for k, v in peaks.items() if k.startswith("worker"))


def test_a_frame_just_over_the_bound_is_dropped_one_at_it_passes(server, repo):
    """The bound is the largest legitimate frame: h[8, 262144] raw + the compressor slack."""
    mlp, echo = _bundles(repo)
    bound = P.max_frame_bytes([s for k in range(3) for s in echo.cut(k).specs] + list(mlp.outputs),
                              MAX_REQUEST_BATCH, P.Limits())
    assert 8 * MIB < bound < 9 * MIB
    _oversize_frame_attack(server, mlp, bound + 1)


# -- a malicious server against a real agent ---------------------------------------------------
_AGENT = r"""
import json, sys
import numpy as np
from edge_agent import EdgeAgent
from edge_agent.config import AgentConfig
cfg = AgentConfig(connect_timeout_ms=10_000, profile_runs=0, deadline_ms=20_000, ban_initial_ms=60_000,
                  ban_max_ms=60_000)
with EdgeAgent(sys.argv[1], [sys.argv[2]], cut=1, codec="raw", config=cfg) as agent:
    x = np.ones((1, 16), np.float32)
    r = agent.infer({"x": x}, deadline_ms=20_000)
    hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(json.dumps({"where": r.where, "y": r.outputs["y"].tolist(), "hwm": hwm}), flush=True)
"""


class _EvilServer:
    """A ROUTER that answers hello and ping properly and every infer with `reply(msg)`'s frames."""

    def __init__(self, bundle_id: str, reply):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.last_endpoint.decode()
        self.bundle_id, self.reply = bundle_id, reply
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, *frames = self.sock.recv_multipart()
            msg = P.decode(frames)
            if msg.kind == "hello":
                P.send(self.sock, P.welcome(msg.id, bundle=self.bundle_id, held=True), [ident])
            elif msg.kind == "ping":
                P.send(self.sock, P.pong(msg.id, load={"est_wait_ms": 0.0}), [ident])
            elif msg.kind == "infer":
                self.sent += 1
                self.sock.send_multipart([ident, *self.reply(msg)], copy=False)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def _huge_reply(msg):  # 300 MB of "outputs"
    return [P.encode(P.result(msg.id, {}))[0], bytearray(300 * MIB)]


def _bomb_reply(msg):  # y[52428800, 4] float32 (800 MiB, under the decode limit) from a few kB of zstd
    rows = 800 * MIB // 16
    header, payload = P.encode(P.result(msg.id, {"y": Encoded("raw+zstd", "float32", (rows, 4), {},
                                                                _zstd_frame(800 * MIB))}))
    return [header, payload]


def _bundle_bomb_reply(msg):  # the request's batch, a frame that expands past it
    payload = _zstd_frame(512 * MIB, declare=16)
    return P.encode(P.result(msg.id, {"y": Encoded("raw+zstd", "float32", (1, 4), {}, payload)}))


@pytest.mark.parametrize("reply", [_huge_reply, _bomb_reply, _bundle_bomb_reply], ids=["300MB", "bomb", "liar"])
def test_agent_survives_a_malicious_server(repo, reply):
    mlp, _ = _bundles(repo)
    evil = _EvilServer(mlp.id, reply)
    try:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _AGENT, str(mlp.path), evil.address], capture_output=True,
                             text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {reply.__name__}: answered {r['where']} in {time.perf_counter() - t:.1f} s, agent peak "
              f"{r['hwm'] / MIB:.0f} MiB")
        assert evil.sent >= 1  # it was asked, and lied
        assert r["where"] == "local"
        x = np.ones((1, 16), np.float32)
        np.testing.assert_allclose(r["y"], mlp_reference(x, mlp.path), rtol=1e-4, atol=1e-4)
        assert r["hwm"] < 800 * MIB
    finally:
        evil.close()


# -- start-up ----------------------------------------------------------------------------------
def test_a_bundle_that_cannot_load_is_reported_and_does_not_hold_back_ready(tmp_path):
    from edgesplit.bundle import Bundle

    mlp = mlp_bundle(tmp_path / "mlp")
    bad = mlp_bundle(tmp_path / "bad", width=8)
    # the manifest reads fine, but the segment no longer matches the bundle id: a worker refuses it
    import onnx

    seg = onnx.load(str(bad.segments[1].path))
    seg.producer_name = "tampered"
    onnx.save(seg, str(bad.segments[1].path))
    assert Bundle.load(tmp_path / "bad", verify=False).id == bad.id
    t = time.perf_counter()
    # ServeProc waits 60 s for "ready", half the default start-up timeout the bad bundle once held it back for
    with ServeProc(tmp_path, workers=1, heartbeat_ms=200) as server:
        print(f"  ready after {time.perf_counter() - t:.1f} s")
        models = server.json("/v1/models")
        byid = {b["id"]: b for b in models["bundles"]}
        assert byid[mlp.id]["loaded_on"] and "errors" not in byid[mlp.id]
        (why,) = byid[bad.id]["errors"].values()
        assert "changed" in why or "hash" in why or "id" in why, why
        assert server.metric("edgesplit_bundle_load_errors", f'bundle="{bad.id}"') == 1
        assert any(bad.id[:12] in line and "cannot load" in line for line in server.err)
        assert server.get("/readyz")[0] == 200
        edge = Edge(server.address)
        try:
            _good_client_ok(edge, mlp, "ok")
            edge.send_infer("to-bad", bad.id, 0, {"x": np.ones((1, 8), np.float32)})
            msg = edge.recv(timeout_ms=30_000)
            assert msg.kind == "error" and msg.meta["code"] == "unknown_bundle" and "cannot load" in msg.meta["message"]
        finally:
            edge.close()


# -- the bounds themselves, without a server -----------------------------------------------------
def test_decoders_never_expand_past_the_declared_shape():
    import lz4.block
    import zstandard

    from edgesplit.codecs import decode
    from edgesplit.errors import CodecError

    shape, size = (1, 1024), 4096
    good = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(size))
    cases = {
        "liar": _zstd_frame(64 * MIB, declare=size),  # blocks expand past the declared size
        "two frames": good + good,
        "trailing bytes": good + b"\0" * 8,
        "no content size": zstandard.ZstdCompressor(write_content_size=False).compress(bytes(size)),
        "skippable": b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd",
    }
    for what, payload in cases.items():
        with pytest.raises(CodecError, match="zstd"):
            decode(Encoded("raw+zstd", "float32", shape, {}, payload))
    with pytest.raises(CodecError, match="lz4"):
        decode(Encoded("raw+lz4", "float32", shape, {}, lz4.block.compress(bytes(MIB), store_size=False)))
    assert decode(Encoded("raw+zstd", "float32", shape, {}, good)).shape == shape


def test_check_tensors_bounds_batch_bytes_and_bound_dims():
    from edgesplit.bundle import TensorSpec

    specs = [TensorSpec("y", "float32", ("N", 4))]
    msg = P.infer("r", "b", 1, {"y": Encoded("raw", "float32", (9, 4), {}, bytes(144))})
    assert P.check_tensors(msg, specs) == {"N": 9}
    with pytest.raises(P.MessageError, match="batch 9 exceeds the limit of 8") as e:
        P.check_tensors(msg, specs, max_batch=8)
    assert e.value.reason == "oversize"
    with pytest.raises(P.MessageError, match=r"\(N\) is 9 but the request has N=1"):
        P.check_tensors(msg, specs, bound={"N": 1})
    with pytest.raises(P.MessageError, match="declare 144 bytes, over this cut's budget of 100"):
        P.check_tensors(msg, specs, max_bytes=100)
    limits = P.Limits()
    assert P.tensors_budget(specs, 8, limits) == 128
    assert P.max_frame_bytes(specs, 8, limits) == limits.max_header_bytes  # tiny tensors: the header bounds
    big = [TensorSpec("h", "float32", ("N", 1 << 20))]
    assert P.max_frame_bytes(big, 8, limits) == (32 << 20) + (32 << 20) // 128 + 4096
    free = [TensorSpec("h", "float32", ("N", "S"))]  # a second symbol: the specs bound nothing
    assert P.max_frame_bytes(free, 8, limits) == limits.max_message_bytes
    assert P.tensors_budget(free, 8, limits) == limits.max_decoded_bytes


def test_a_thousand_connections_and_a_client_that_never_reads(server, repo):
    """1000 DEALERs connected at once (each says hello with a ping), and one client that floods
    1 MiB requests without ever reading an answer: the broker keeps serving a good client, its
    memory stays bounded (replies to a peer that does not read are dropped at the socket's
    high-water mark, never queued without end)."""
    mlp, echo = _bundles(repo)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    crowd, reader = [], None
    edge = Edge(server.address)
    try:
        for i in range(1000):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(server.address)
            P.send(s, P.ping(f"crowd-{i}"))
            crowd.append(s)
        _good_client_ok(edge, mlp, "among-the-crowd")
        pongs = sum(1 for s in crowd[:50] if s.poll(30_000) and s.recv_multipart())
        assert pongs == 50  # the crowd is answered too, not just ignored
        reader = ctx.socket(zmq.DEALER)
        reader.linger = 0
        reader.sndhwm = 0  # the flood is bounded by the broker's side, not by this socket
        reader.connect(server.address)
        x = get_codec("raw").encode(np.zeros((1, ECHO_ELEMS), np.float32))
        sent = 0
        for i in range(300):  # 300 MiB asked for, 300 MiB of answers nobody reads
            P.send(reader, P.infer(f"flood-{i}", echo.id, 1, {"h": x}))
            sent += 1
            if i % 50 == 0:
                _good_client_ok(edge, mlp, f"during-flood-{i}", seed=i)
        _good_client_ok(edge, mlp, "after-the-flood", seed=1)
        peaks = {k: vm_hwm(p) for k, p in _pids(server).items()}
        print(f"  1000 connections + {sent} unread 1 MiB requests: peak RSS "
              + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in peaks.items()))
        assert peaks["broker"] < 400 * MIB
        assert all(v < 1024 * MIB for k, v in peaks.items() if k.startswith("worker"))
    finally:
        edge.close()
        for s in crowd:
            s.close(0)
        if reader is not None:
            reader.close(0)
        ctx.term()
