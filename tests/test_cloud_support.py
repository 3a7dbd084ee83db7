"""Helpers for the cloud_server tests: tiny bundles, a `python -m cloud_server` child, an edge DEALER."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import zmq
from onnx import TensorProto, helper, numpy_helper

from edgesplit import protocol as P
from edgesplit.bundle import Bundle, Cut, TensorSpec, write_bundle
from edgesplit.codecs import decode, get_codec

REPO = Path(__file__).resolve().parents[1]


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def mlp_bundle(out: Path, width: int = 16, hidden: int = 32, classes: int = 4) -> Bundle:
    """x[N,width] -> relu(x W1 + b1) = h[N,hidden] -> h W2 + b2 = y[N,classes]; cut 1 ships h."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((width, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32)
    head = _model([helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Relu", ["m"], ["h"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                  [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", hidden])],
                  [numpy_helper.from_array(w1, "w1")])
    tail = _model([helper.make_node("MatMul", ["h", "w2"], ["y"])],
                  [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", hidden])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
                  [numpy_helper.from_array(w2, "w2")])
    h = TensorSpec("h", "float32", ("N", hidden))
    model = {"name": "mlp", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", width)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", classes)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), h.bytes_per_sample(), (h,))])


def mlp_reference(x: np.ndarray, out: Path) -> np.ndarray:
    """What the whole mlp bundle computes, with numpy from the segment files' weights."""
    b = Bundle.load(out)
    w1 = numpy_helper.to_array(onnx.load(str(b.segments[0].path)).graph.initializer[0])
    w2 = numpy_helper.to_array(onnx.load(str(b.segments[1].path)).graph.initializer[0])
    return np.maximum(x @ w1, 0) @ w2


def echo_bundle(out: Path, elems: int = 1 << 18, small_reply: bool = False) -> Bundle:
    """x[N,elems] -> Identity -> h -> Identity (or ReduceMax: y[N,1]) -> y: a near-zero-compute tail."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", elems])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", elems])
    ydim = 1 if small_reply else elems
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", ydim])
    head = _model([helper.make_node("Identity", ["x"], ["h"])], [x], [h])
    if small_reply:
        tail = _model([helper.make_node("ReduceMax", ["h"], ["y"], keepdims=1, axes=[1])], [h], [y])
        tail.opset_import[0].version = 13
    else:
        tail = _model([helper.make_node("Identity", ["h"], ["y"])], [h], [y])
    hs = TensorSpec("h", "float32", ("N", elems))
    model = {"name": "echo-small" if small_reply else "echo", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", elems)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", ydim)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), hs.bytes_per_sample(), (hs,))])


def slow_bundle(out: Path, width: int = 256, depth: int = 24) -> Bundle:
    """x[N,width] -> Identity -> h; tail: depth x (MatMul + Tanh) -> y[N,width]: a tail of a few ms.

    The weights are scaled orthogonal-ish so values stay finite; the reference is numpy.
    """
    rng = np.random.default_rng(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    head = _model([helper.make_node("Identity", ["x"], ["h"])], [x], [h])
    nodes, inits, prev = [], [], "h"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out_name = "y" if i == depth - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out_name]))
        prev = out_name
    tail = _model(nodes, [h], [y], inits)
    hs = TensorSpec("h", "float32", ("N", width))
    model = {"name": "slow", "source_sha256": "0" * 64,
             "inputs": [TensorSpec("x", "float32", ("N", width)).to_json()],
             "outputs": [TensorSpec("y", "float32", ("N", width)).to_json()]}
    return write_bundle(out, model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])],
                        [Cut(1, ("h",), hs.bytes_per_sample(), (hs,))])


def slow_reference(x: np.ndarray, out: Path) -> np.ndarray:
    b = Bundle.load(out)
    for w in onnx.load(str(b.segments[1].path)).graph.initializer:
        x = np.tanh(x @ numpy_helper.to_array(w))
    return x


class ServeProc:
    """`python -m cloud_server` on random loopback ports; knows its addresses once "ready" is printed."""

    def __init__(self, repository: Path, workers: int = 2, extra: list[str] = (), heartbeat_ms: float = 100,
                 timeout: float = 60):
        self.cmd = [sys.executable, "-m", "cloud_server", "--repository", str(repository),
                    "--bind", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0",
                    *(["--workers", str(workers)] if workers is not None else []),
                    "--heartbeat-ms", str(heartbeat_ms), *extra]
        self.timeout = timeout
        self.lines: list[str] = []
        self.address = self.http = self.back = None

    def start(self) -> "ServeProc":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        ready = threading.Event()
        self.err: list[str] = []

        def read_out():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                m = re.search(r"listening on (\S+)", line)
                if m:
                    self.address = m.group(1)
                m = re.search(r"admin on (http://\S+)", line)
                if m:
                    self.http = m.group(1)
                m = re.search(r"workers connect to (\S+)", line)
                if m:
                    self.back = m.group(1)
                if "ready on" in line:
                    ready.set()
            ready.set()

        def read_err():
            for line in self.proc.stderr:
                self.err.append(line.rstrip())

        threading.Thread(target=read_out, daemon=True).start()
        threading.Thread(target=read_err, daemon=True).start()
        if not ready.wait(self.timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines + self.err[-30:]))
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def json(self, path: str):
        return json.loads(self.get(path)[1])

    def metric(self, name: str, labels: str = "") -> float | None:
        text = self.get("/metrics")[1]
        for line in text.splitlines():
            if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
                if labels or line.split()[0] == name:
                    return float(line.split()[-1])
        return None

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.json("/v1/models")["workers"]]

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Edge:
    """A bare edge DEALER speaking edgesplit.protocol (no EdgeAgent: these tests check the server)."""

    def __init__(self, address: str, ctx: zmq.Context | None = None, curve: tuple | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if curve:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(address)
        self.codec = get_codec("raw")

    def send_infer(self, rid: str, bundle: str, cut: int, tensors: dict, deadline_ms=None, **meta) -> None:
        enc = {k: self.codec.encode(v) for k, v in tensors.items()}
        P.send(self.sock, P.infer(rid, bundle, cut, enc, deadline_ms=deadline_ms, **meta))

    def send_raw(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_ms: int = 10_000) -> P.Message | None:
        if not self.sock.poll(timeout_ms):
            return None
        return P.decode(self.sock.recv_multipart(copy=False))

    def outputs(self, msg: P.Message) -> dict[str, np.ndarray]:
        return {k: decode(v) for k, v in msg.tensors.items()}

    def close(self) -> None:
        self.sock.close(0)


def test_helpers_build_runnable_bundles(tmp_path):
    b = mlp_bundle(tmp_path / "mlp")
    x = np.ones((2, 16), np.float32)
    from edgesplit.runtime import SegmentChain

    with SegmentChain(b, 0, 2, runner="ort-cpu") as chain:
        y = chain.run({"x": x})["y"]
    np.testing.assert_allclose(y, mlp_reference(x, b.path), rtol=1e-5, atol=1e-4)
    e = echo_bundle(tmp_path / "echo", elems=8, small_reply=True)
    with SegmentChain(e, 1, 2, runner="ort-cpu") as chain:
        assert chain.run({"h": np.arange(16, dtype=np.float32).reshape(2, 8)})["y"].tolist() == [[7.0], [15.0]]


def test_slow_bundle_reference(tmp_path):
    from edgesplit.runtime import SegmentChain

    b = slow_bundle(tmp_path / "slow", width=32, depth=3)
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    with SegmentChain(b, 0, 2, runner="ort-cpu") as chain:
        np.testing.assert_allclose(chain.run({"x": x})["y"], slow_reference(x, b.path), rtol=1e-4, atol=1e-5)
