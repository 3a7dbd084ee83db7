"""Helpers for the cloud_server tests: tiny bundles, a `python -m cloud_server` child, an edge DEALER."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from edgesplit import protocol as P
from edgesplit.codecs import decode, get_codec

from builders import echo_bundle, mlp_bundle, mlp_reference, slow_bundle, slow_reference  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[1]


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


def eventually(check, timeout: float = 10.0) -> bool:
    """Poll `check` until it is true or `timeout` passes; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()


def drive_client(address, bundle_id: str, cut: int, name: str, inputs: dict, results: dict, window: int = 4,
                 deadline_ms: float = 20_000, budget_s: float = 60) -> None:
    """Send every input (id -> array, as tensor `name` at `cut`) with `window` in flight; record every
    reply per id (a duplicate too: replies arriving after the last one are collected for a while)."""
    edge = Edge(address)
    try:
        todo = list(inputs.items())
        outstanding = 0
        end = time.monotonic() + budget_s
        while (todo or outstanding) and time.monotonic() < end:
            while todo and outstanding < window:
                rid, x = todo.pop(0)
                edge.send_infer(rid, bundle_id, cut, {name: x}, deadline_ms=deadline_ms)
                outstanding += 1
            msg = edge.recv(timeout_ms=2000)
            if msg is None:
                continue
            results.setdefault(msg.id, []).append(msg)
            outstanding -= 1
        # anything arriving later would be a duplicate
        while True:
            msg = edge.recv(timeout_ms=300)
            if msg is None:
                break
            results.setdefault(msg.id, []).append(msg)
    finally:
        edge.close()


def answered_once(inputs: list[dict], results: dict, want, rtol: float, atol: float) -> list[P.Message]:
    """Every input (per client: id -> x) got exactly one reply, a result whose "y" is want(x); the replies."""
    msgs = []
    for per_client in inputs:
        for rid, x in per_client.items():
            replies = results.get(rid, [])
            assert len(replies) == 1, (rid, [m.kind for m in replies])
            msg = replies[0]
            assert msg.kind == "result", msg.meta  # answered by the cloud, not an error
            np.testing.assert_allclose(Edge.outputs(None, msg)["y"], want(x), rtol=rtol, atol=atol)
            msgs.append(msg)
    return msgs
