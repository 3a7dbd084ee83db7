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
import zmq

from edgesplit import codecs, protocol
from edgesplit.bundle import Bundle

from builders import DIM, WIDTHS, chain_bundle, reference  # noqa: F401 (re-exported)
from builders import slow_tail_bundle as slow_bundle  # noqa: F401

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
