"""Helpers for the agent tests: tiny bundles, the real cloud server in-process, and a faulty peer.

- `RealCloud` is the project's own cloud server (cloud_server.Server: the broker and its tail
  workers as threads of this process) on a random loopback port: every test that wants a
  correctly behaving cloud uses it.
- `MiniServer` is a deliberately faulty peer for fault injection: a ZeroMQ ROUTER that speaks
  the wire protocol but answers with wrong shapes, dtypes or ids, garbage, error codes, or not
  at all. The real server never does that, so those tests need a peer that does.
  Run as a script it serves a bundle in its own process:  python tests/test_agent_support.py BUNDLE
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import zmq
from onnx import TensorProto, helper, numpy_helper

from edgesplit import codecs, protocol
from edgesplit.bundle import Bundle, Cut, TensorSpec, write_bundle

DIM = 16
WIDTHS = (DIM, 32, 24, 8)  # x[N,16] -> a[N,32] -> b[N,24] -> y[N,8]


def _layer(name: str, x: str, y: str, n_in: int, n_out: int, seed: int, act: str | None):
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32) * 0.1, f"{name}_b")
    pre = y + "_pre" if act else y
    nodes = [helper.make_node("Gemm", [x, w.name, b.name], [pre], name=f"{name}_gemm")]
    if act:
        nodes.append(helper.make_node(act, [pre], [y], name=f"{name}_{act.lower()}"))
    return nodes, [w, b]


def _model(nodes, inits, x: str, n_in: int, y: str, n_out: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", n_out])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def chain_bundle(out: Path) -> tuple[Bundle, Path]:
    """A 3-segment MLP bundle (cuts 1 and 2) and the unsplit model beside it."""
    names = ("x", "a", "b", "y")
    acts = ("Relu", "Tanh", None)
    layers = [_layer(f"l{i}", names[i], names[i + 1], WIDTHS[i], WIDTHS[i + 1], seed=i, act=acts[i])
              for i in range(3)]
    segments = [(_model(n, w, names[i], WIDTHS[i], names[i + 1], WIDTHS[i + 1]), [names[i]], [names[i + 1]])
                for i, (n, w) in enumerate(layers)]
    full = _model([n for ls, _ in layers for n in ls], [w for _, ws in layers for w in ws], "x", DIM, "y", WIDTHS[-1])
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / "full.onnx"
    onnx.save(full, str(full_path))
    specs = [TensorSpec(names[i], "float32", ("N", WIDTHS[i])) for i in range(4)]
    model = {"name": "chain", "source_sha256": "0" * 64, "inputs": [specs[0].to_json()],
             "outputs": [specs[3].to_json()]}
    cuts = [Cut(k, (names[k],), specs[k].bytes_per_sample(), (specs[k],)) for k in (1, 2)]
    return write_bundle(out / "chain.bundle", model, segments, cuts), full_path


SLOW_WIDTH = 512


def slow_bundle(out: Path, depth: int = 24) -> tuple[Bundle, Path]:
    """A 2-segment bundle with a heavy tail: its time grows with the batch, its cut stays small.

    x[N,16] -> tanh(Gemm) = h[N,32] | tanh(Gemm) to 512 wide, `depth` x tanh(MatMul 512x512),
    Gemm -> y[N,8]. The tail's MatMuls share one weight (stored once): a few thousand rows take
    a few hundred ms on one CPU core (128 bytes a row on the wire), 2 rows well under a
    millisecond. Also writes the unsplit model as slow_full.onnx beside it.
    """
    cut_w = 32
    head_nodes, head_w = _layer("s_in", "x", "h", DIM, cut_w, seed=10, act="Tanh")
    up_nodes, up_w = _layer("s_up", "h", "s_t", cut_w, SLOW_WIDTH, seed=11, act="Tanh")
    rng = np.random.default_rng(12)
    w = numpy_helper.from_array((rng.standard_normal((SLOW_WIDTH, SLOW_WIDTH)) / np.sqrt(SLOW_WIDTH))
                                .astype(np.float32), "s_w")
    tail_nodes, prev = list(up_nodes), "s_t"
    for i in range(depth):
        tail_nodes += [helper.make_node("MatMul", [prev, "s_w"], [f"s_m{i}"], name=f"s_mm{i}"),
                       helper.make_node("Tanh", [f"s_m{i}"], [f"s_t{i}"], name=f"s_tanh{i}")]
        prev = f"s_t{i}"
    out_nodes, out_w = _layer("s_out", prev, "y", SLOW_WIDTH, WIDTHS[-1], seed=13, act=None)
    tail_w = [*up_w, w, *out_w]
    tail = _model(tail_nodes + out_nodes, tail_w, "h", cut_w, "y", WIDTHS[-1])
    head = _model(head_nodes, head_w, "x", DIM, "h", cut_w)
    full = _model(head_nodes + tail_nodes + out_nodes, [*head_w, *tail_w], "x", DIM, "y", WIDTHS[-1])
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / "slow_full.onnx"
    onnx.save(full, str(full_path))
    x, h, y = (TensorSpec("x", "float32", ("N", DIM)), TensorSpec("h", "float32", ("N", cut_w)),
               TensorSpec("y", "float32", ("N", WIDTHS[-1])))
    model = {"name": "slow", "source_sha256": "0" * 64, "inputs": [x.to_json()], "outputs": [y.to_json()]}
    cuts = [Cut(1, ("h",), h.bytes_per_sample(), (h,))]
    return write_bundle(out / "slow.bundle", model, [(head, ["x"], ["h"]), (tail, ["h"], ["y"])], cuts), full_path


def reference(full_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(full_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


class RealCloud:
    """The project's cloud server in this process: `cloud_server.Server` (broker + tail worker threads).

    The same broker, workers, batching, deadlines and backpressure as `python -m cloud_server`
    (edge_agent.local_cloud.LocalCloud runs that as a child), without a second interpreter to
    start: tests that want a correctly behaving cloud share one per module.

    Args:
        repository: the folder of bundles to serve.
        bind: the edge-facing address (default: a random loopback port).
        workers: tail worker threads (0: a broker with no live worker).
        **config: ServerConfig fields (the defaults here: fast heartbeats, one ORT thread).
    """

    def __init__(self, repository: Path, bind: str = "tcp://127.0.0.1:0", workers: int = 1, **config):
        from cloud_server import Server, ServerConfig

        cfg = ServerConfig(**{"heartbeat_interval_s": 0.1, "intra_op_threads": 1, "drain_timeout_s": 5.0, **config})
        self.server = Server(repository, bind=bind, http=None, devices=["cpu"] * workers, config=cfg,
                             worker_mode="thread")
        self.server.start()
        if not self.server.wait_ready(60):
            self.server.stop()
            raise RuntimeError(f"the cloud server on {bind} did not become ready")
        self.broker = self.server.broker
        self.address = self.broker.front_address
        self._closed = False

    def answered(self, outcome: str | None = None) -> int:
        """Infer requests the broker answered so far: with `outcome` ("ok", "busy", ...), or all."""
        registry = self.broker.metrics.registry
        if outcome is not None:
            return int(registry.get_sample_value("edgesplit_requests_total", {"outcome": outcome}) or 0)
        return int(sum(s.value for m in registry.collect() if m.name == "edgesplit_requests"
                       for s in m.samples if s.name == "edgesplit_requests_total"))

    def held(self) -> int:
        """Infer requests the broker holds now: waiting for a worker, or computing."""
        return self.broker.held

    def requests(self) -> int:
        """Infer requests that reached the broker: answered, or held there now."""
        return self.answered() + self.held()

    def add_worker(self) -> None:
        """A tail worker joins the running broker: a thread on the address local worker processes use."""
        from cloud_server import TailWorker

        srv = self.server
        w = TailWorker(self.broker.back_address, srv.repository, srv.config,
                       name=f"joined-{len(srv.threads)}", context=self.broker.ctx)
        t = threading.Thread(target=w.run, name=w.name, daemon=True)
        t.start()
        srv.threads.append((w, t))

    def crash(self) -> None:
        """Vanish at once, as a killed process does: no drain, no error replies, connections dropped."""
        self.broker.abort()
        self.broker.join(10)
        self.broker.front.close(0)  # the loop has ended: the edges' connections drop now
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MiniServer:
    """A deliberately faulty cloud peer, for fault injection: a ROUTER that misbehaves per `mode`.

    The real cloud server (RealCloud) never sends wrong shapes, dtypes or ids, garbage, error
    codes the agent cannot provoke, or nothing at all; these tests need a peer that does, to
    show that the agent never returns wrong outputs and never hangs. It answers pings and
    hello like a broker and runs the tail with ONNX Runtime, then spoils the answer.

    Modes: "good" (kept for tests/test_agent_cli.py and the kill test's EDGESPLIT_TEST_MINI_SERVER
    switch), "wrong_shape", "wrong_dtype", "wrong_id", "garbage", "silent" (answers pings,
    never results), "error:<code>".
    """

    def __init__(self, bundle: Bundle, mode: str = "good", address: str = "tcp://127.0.0.1:0"):
        from edgesplit.runtime import SegmentChain

        self.bundle = bundle
        self.mode = mode
        self.chains = {k: SegmentChain(bundle, k, bundle.num_segments, runner="ort-cpu")
                       for k in range(bundle.num_segments)}
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.requests = 0
        self.pings = 0
        self.cancels = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mini-server", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import queue
        from concurrent.futures import ThreadPoolExecutor

        raw = codecs.get_codec("raw")
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        # The tail runs on a worker thread, so pings are answered while it computes (as a broker does).
        worker = ThreadPoolExecutor(1)
        done: queue.SimpleQueue = queue.SimpleQueue()   # reply frames from the worker thread

        def compute(ident, msg, mode):
            tensors = {n: codecs.decode(e) for n, e in msg.tensors.items()}
            out = self.chains[msg.cut].run(tensors)
            rid = msg.id
            if mode == "wrong_shape":
                out = {n: np.concatenate([a, a], axis=-1) for n, a in out.items()}
            elif mode == "wrong_dtype":
                out = {n: a.astype(np.float64) for n, a in out.items()}
            elif mode == "wrong_id":
                rid = "someone-else-7"
            reply = protocol.result(rid, {n: raw.encode(a) for n, a in out.items()},
                                    timings={"queue_ms": 0.0, "decode_ms": 0.0, "compute_ms": 0.1, "encode_ms": 0.0},
                                    worker="mini")
            done.put([ident, *protocol.encode(reply)])

        while not self._stop.is_set():
            while not done.empty():
                self.sock.send_multipart(done.get(), copy=False)
            if not poller.poll(2):
                continue
            ident, *frames = self.sock.recv_multipart(copy=False)
            msg = protocol.decode(frames)
            if msg.kind == "ping":
                self.pings += 1
                protocol.send(self.sock, protocol.pong(msg.id, load={"workers": 1, "queued": 0, "inflight": 0,
                                                                     "est_wait_ms": 0.0}), [ident])
                continue
            if msg.kind == "hello":
                protocol.send(self.sock, protocol.welcome(msg.id, held=msg.bundle == self.bundle.id,
                                                         profile={"segment_ms": None, "device": "cpu"}), [ident])
                continue
            if msg.kind == "cancel":
                self.cancels += 1
                continue
            if msg.kind != "infer":
                continue
            self.requests += 1
            mode = self.mode
            if mode == "silent":
                continue
            if mode.startswith("error:"):
                extra = {"retry_after_ms": 1000.0} if mode == "error:busy" else {}
                protocol.send(self.sock, protocol.error(msg.id, mode[6:], "on purpose", **extra), [ident])
                continue
            if mode == "garbage":
                self.sock.send_multipart([ident, b"\xc1 this is not msgpack", b"junk"])
                continue
            worker.submit(compute, ident, msg, mode)
        worker.shutdown(wait=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)
        self.ctx.term()
        for c in self.chains.values():
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":  # a mini server in its own process (prints its address)
    srv = MiniServer(Bundle.load(sys.argv[1]), address=sys.argv[2] if len(sys.argv) > 2 else "tcp://127.0.0.1:0")
    print(srv.address, flush=True)
    print("ready", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        srv.close()


def start_server(repository: Path, address: str, use_mini: bool = False, timeout_s: float = 60.0):
    """Start a cloud server process on `address`; returns (Popen, output lines) once it is ready.

    The real one is `python -m cloud_server`; `use_mini` runs this file's MiniServer instead
    (given a bundle directory rather than a repository).
    """
    import subprocess

    if use_mini:
        cmd = [sys.executable, __file__, str(repository), address]
    else:
        cmd = [sys.executable, "-m", "cloud_server", "--repository", str(repository), "--bind", address,
               "--workers", "1", "--http", "off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    ready = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "ready" in line.lower():
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    if not ready.wait(timeout_s) or proc.poll() is not None:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start: {' '.join(cmd)}\n" + "\n".join(lines[-20:]))
    return proc, lines
