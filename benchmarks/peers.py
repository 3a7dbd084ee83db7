"""edgesplit's cloud half beside the servers a user would otherwise run, interleaved, in one run.

The same EfficientNet-Lite0 tail (segments after one cut), the same real activations (the head
run on the shipped photos), one ONNX Runtime thread everywhere, on this machine:

- edgesplit: `python -m cloud_server` (default workers), clients speaking the wire protocol
  (raw codec: the same bytes every peer gets);
- aiohttp: the ~40-line aiohttp + ONNX Runtime server a user would write in an afternoon
  (POST the float32 bytes, get the logits back), clients on keep-alive HTTP connections;
- PyTriton / Ray Serve: only with --peer-python PATH, a Python whose environment has them
  (they are large; this box's CI does not install them);
- edgesplit_before: with --baseline DIR (a directory holding another version's cloud_server and
  edgesplit packages, e.g. `git archive <commit> cloud_server edgesplit`), that version's default
  `python -m cloud_server` with the same options, in the same rounds.

Rows: p50 / p90 latency with one client, throughput with 8 closed-loop clients, server CPU per
request; and the limits in the same run: memcpy of the payload, a bare pyzmq DEALER/ROUTER
round trip of the same bytes, ONNX Runtime alone on the tail. Rounds alternate between the
systems so a change in the machine's load hits all of them alike.

    python benchmarks/peers.py [--rounds 5] [--requests 200] [--seconds 4] [--baseline DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from common import REPO, cpu_seconds, free_port, load_average, machine, process_tree
from edgesplit import protocol as P
from edgesplit.codecs import get_codec

DATA = REPO / "edge_agent" / "demo_data"
CUT_TENSOR = "/_blocks.8/_project_conv/Conv_output_0"

# The hand-rolled peer: what a user writes in an afternoon (kept short on purpose).
AIOHTTP_SERVER = r'''
import sys, numpy as np, onnxruntime as ort
from aiohttp import web
seg, port, name, shape = sys.argv[1], int(sys.argv[2]), sys.argv[3], [int(d) for d in sys.argv[4].split(",")]
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
sess = ort.InferenceSession(seg, opts, providers=["CPUExecutionProvider"])
out_name = sess.get_outputs()[0].name

async def infer(request):
    body = await request.read()
    x = np.frombuffer(body, np.float32).reshape([-1] + shape[1:])
    y = sess.run([out_name], {name: x})[0]
    return web.Response(body=y.tobytes(), content_type="application/octet-stream")

app = web.Application(client_max_size=64 << 20)
app.router.add_post("/infer", infer)
print("ready", flush=True)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
'''

# A bare ZeroMQ echo of the same bytes (the floor of any ZeroMQ design on this box).
ZMQ_ECHO = r'''
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1]); print("ready", flush=True)
reply = b"\0" * int(sys.argv[2])
while True:
    f = s.recv_multipart(copy=False)
    s.send_multipart([f[0], reply], copy=False)
'''


def _child(code: str, *args: str, python: str = sys.executable) -> subprocess.Popen:
    proc = subprocess.Popen([python, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"a peer did not start: {code.splitlines()[1][:60]}")
    return proc


def make_bundle(tmp: Path):
    """EfficientNet-Lite0 cut once at CUT_TENSOR, and the real activations there for every photo."""
    from edge_agent.inputs import preprocess_image
    from edgesplit.graph import partition
    from edgesplit.runtime import SegmentRunner

    model = DATA / "efficientnet_lite0.onnx"
    bundle = partition(model, [[CUT_TENSOR]], tmp / "repo" / "effnet")
    photos = sorted((DATA / "photos").glob("*.jpg"))
    name = bundle.inputs[0].name
    with SegmentRunner(bundle, "ort-cpu", intra_op_threads=1) as seg:
        acts = [seg.run({name: preprocess_image(p)}, 0, 1)[CUT_TENSOR] for p in photos]
    return bundle, acts


# -- clients -------------------------------------------------------------------------------------
class ZmqClient:
    """One DEALER speaking the wire protocol (what an edge agent sends, raw codec)."""

    def __init__(self, ctx: zmq.Context, address: str, bundle_id: str | None, tag: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.bundle_id, self.tag, self.n = bundle_id, tag, 0
        self.raw = get_codec("raw")
        self.timings: list[dict] = []  # what the worker says it spent (queue, decode, compute, encode)

    def call(self, x: np.ndarray) -> None:
        self.n += 1
        if self.bundle_id is None:  # the bare echo: the same bytes, no protocol
            self.sock.send(x, copy=False)
            self.sock.recv(copy=False)
            return
        rid = f"{self.tag}-{self.n}"
        t0 = time.perf_counter()
        P.send(self.sock, P.infer(rid, self.bundle_id, 1, {CUT_TENSOR: self.raw.encode(x)}, deadline_ms=60_000.0))
        t1 = time.perf_counter()
        frames = P.recv_frames(self.sock)
        t2 = time.perf_counter()
        msg = P.decode(frames)
        t3 = time.perf_counter()
        if msg.kind != "result" or msg.id != rid:
            raise RuntimeError(f"edgesplit answered {msg.kind} {msg.meta.get('code')}: {msg.meta.get('message')}")
        # the client's own Python (encode + send, decode) beside what the worker says it spent
        self.timings.append({**(msg.meta.get("timings") or {}), "client_send_ms": (t1 - t0) * 1e3,
                             "client_decode_ms": (t3 - t2) * 1e3})

    def close(self) -> None:
        self.sock.close()


class HttpClient:
    """One keep-alive HTTP connection POSTing the float32 bytes."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, x: np.ndarray) -> None:
        self.conn.request("POST", "/infer", body=memoryview(np.ascontiguousarray(x)).cast("B"),
                          headers={"Content-Type": "application/octet-stream"})
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200 or not body:
            raise RuntimeError(f"aiohttp peer answered {resp.status}")

    def close(self) -> None:
        self.conn.close()


def latency(make_client, acts, n: int, timings: list | None = None) -> list[float]:
    c = make_client("lat")
    try:
        for x in acts:  # warm-up: every photo once
            c.call(x)
        if timings is not None and hasattr(c, "timings"):
            c.timings.clear()
        out = []
        for i in range(n):
            t = time.perf_counter()
            c.call(acts[i % len(acts)])
            out.append((time.perf_counter() - t) * 1e3)
        if timings is not None and hasattr(c, "timings"):
            timings += c.timings
        return out
    finally:
        c.close()


def throughput(make_client, acts, clients: int, seconds: float) -> float:
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(k):
        c = make_client(f"t{k}")
        try:
            c.call(acts[k % len(acts)])
            start.wait()
            i = 0
            while time.perf_counter() < stop_at[0]:
                c.call(acts[(k + i) % len(acts)])
                counts[k] += 1
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported below, the run is void
            errors.append(exc)
            start.abort()
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 1e9
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a throughput client failed: {errors[0]}")
    return sum(counts) / (time.perf_counter() - t0)


def ort_alone(bundle, acts, n: int) -> list[float]:
    from edgesplit.runtime import SegmentRunner

    with SegmentRunner(bundle, "ort-cpu", intra_op_threads=1) as seg:
        for x in acts:
            seg.run({CUT_TENSOR: x}, 1, 2)
        out = []
        for i in range(n):
            t = time.perf_counter()
            seg.run({CUT_TENSOR: acts[i % len(acts)]}, 1, 2)
            out.append((time.perf_counter() - t) * 1e3)
    return out


def memcpy_ms(acts, n: int) -> list[float]:
    dst = np.empty_like(acts[0])
    out = []
    for i in range(n):
        t = time.perf_counter()
        np.copyto(dst, acts[i % len(acts)])
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _q(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per system")
    ap.add_argument("--requests", type=int, default=200, help="latency requests per round")
    ap.add_argument("--seconds", type=float, default=4.0, help="throughput seconds per round")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="edgesplit serve --workers (default: its own)")
    ap.add_argument("--threads", type=int, default=1,
                    help="edgesplit serve --threads (default 1, as every peer; 0: the server's own default)")
    ap.add_argument("--serve-arg", action="append", default=[], help="more `edgesplit serve` options")
    ap.add_argument("--baseline", metavar="DIR", default=None,
                    help="also run the cloud_server of another version (a directory holding its packages)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    out: dict = {"machine": machine(), "load_before": load_average(), "cut": CUT_TENSOR,
                 "command": "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bundle, acts = make_bundle(tmp)
        out["activation_bytes"] = int(acts[0].nbytes)
        ready = tmp / "ready.json"

        def serve(ready: Path, pythonpath: str | None = None) -> subprocess.Popen:
            cmd = [sys.executable, "-m", "cloud_server", "--repository", str(tmp / "repo"), "--bind",
                   "tcp://127.0.0.1:0", "--http", "off", "--ready-file", str(ready),
                   *(["--threads", str(args.threads)] if args.threads else []),
                   *(["--workers", str(args.workers)] if args.workers else []), *args.serve_arg]
            if pythonpath is None:
                return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # the other version's packages first (its cwd must not shadow them)
            env = dict(os.environ, PYTHONPATH=os.path.abspath(pythonpath))
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                    cwd=os.path.abspath(pythonpath))

        es = serve(ready)
        ready_old = tmp / "ready-before.json"
        old = serve(ready_old, args.baseline) if args.baseline else None
        port = free_port()
        seg1 = str(bundle.segments[1].path)
        shape = ",".join(str(d if isinstance(d, int) else 1) for d in bundle.cut(1).specs[0].shape)
        aio = _child(AIOHTTP_SERVER, seg1, str(port), CUT_TENSOR, shape)
        echo_addr = f"tcp://127.0.0.1:{free_port()}"
        echo = _child(ZMQ_ECHO, echo_addr, str(4 * 1000))
        ctx = zmq.Context()
        try:
            fronts = {}
            for name, f in (("edgesplit", ready), ("edgesplit_before", ready_old if old else None)):
                for _ in range(600 if f else 0):
                    if f.exists():
                        fronts[name] = json.loads(f.read_text())["front"]
                        break
                    time.sleep(0.1)
                else:
                    if f:
                        raise RuntimeError(f"{name}: edgesplit serve did not get ready")
            systems = {
                "edgesplit": (lambda tag: ZmqClient(ctx, fronts["edgesplit"], bundle.id, tag), es.pid),
                "aiohttp": (lambda tag: HttpClient(port), aio.pid),
            }
            if old is not None:
                systems["edgesplit_before"] = (
                    lambda tag: ZmqClient(ctx, fronts["edgesplit_before"], bundle.id, tag), old.pid)
            res = {k: {"lat": [], "tput": [], "cpu_per_req_ms": [], "timings": []} for k in systems}
            for r in range(args.rounds):
                for name, (make, pid) in systems.items():
                    pids = process_tree(pid)
                    c0 = cpu_seconds(pids)
                    lat = latency(make, acts, args.requests, res[name]["timings"])
                    c1 = cpu_seconds(pids)
                    res[name]["lat"] += lat
                    res[name]["cpu_per_req_ms"].append((c1 - c0) * 1e3 / (args.requests + len(acts)))
                    res[name]["tput"].append(throughput(make, acts, args.clients, args.seconds))
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{k} p50 {statistics.median(v['lat']):.2f} ms, {v['tput'][-1]:.0f}/s" for k, v in res.items()),
                    file=sys.stderr)
            limits = {"memcpy": memcpy_ms(acts, 2000), "ort_alone": ort_alone(bundle, acts, args.requests),
                      "bare_zmq": latency(lambda tag: ZmqClient(ctx, echo_addr, None, tag), acts, args.requests)}
        finally:
            procs = [p for p in (es, old, aio, echo) if p is not None]
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            ctx.term()
    rows = {}
    for name, v in res.items():
        rows[name] = {"p50_ms": round(statistics.median(v["lat"]), 3), "p90_ms": round(_q(v["lat"], 90), 3),
                      f"throughput_{args.clients}_clients_per_s": round(statistics.median(v["tput"]), 1),
                      "cpu_per_request_ms": round(statistics.median(v["cpu_per_req_ms"]), 3)}
        if v["timings"]:  # the worker's own account of the latency runs: medians of each stage
            rows[name]["worker_ms"] = {k: round(statistics.median(t.get(k, 0.0) for t in v["timings"]), 3)
                                       for k in ("queue_ms", "decode_ms", "compute_ms", "encode_ms",
                                                 "client_send_ms", "client_decode_ms")}
            # what is left of the median round trip: the hops, wake-ups and the broker
            rows[name]["worker_ms"]["rest"] = round(rows[name]["p50_ms"] - sum(rows[name]["worker_ms"].values()), 3)
    for name, v in limits.items():
        rows[name] = {"p50_ms": round(statistics.median(v), 4), "p90_ms": round(_q(v, 90), 4)}
    tk = f"throughput_{args.clients}_clients_per_s"
    ratios = {"p50_edgesplit_over_aiohttp": round(rows["edgesplit"]["p50_ms"] / rows["aiohttp"]["p50_ms"], 3),
              "throughput_edgesplit_over_aiohttp": round(rows["edgesplit"][tk] / rows["aiohttp"][tk], 3)}
    if "edgesplit_before" in rows:
        ratios.update(p50_before_over_aiohttp=round(rows["edgesplit_before"]["p50_ms"] / rows["aiohttp"]["p50_ms"], 3),
                      throughput_before_over_aiohttp=round(rows["edgesplit_before"][tk] / rows["aiohttp"][tk], 3))
    out.update(rows=rows, ratios=ratios, load_after=load_average())
    print(f"{'system':<17} {'p50 ms':>8} {'p90 ms':>8} {'req/s (' + str(args.clients) + ' cl)':>14} {'CPU ms/req':>11}"
          "  worker's ms (queue/decode/compute/encode), client's (send/decode), rest")
    for name, r in rows.items():
        w = r.get("worker_ms")
        print(f"{name:<17} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r.get(tk, float('nan')):>14.1f} "
              f"{r.get('cpu_per_request_ms', float('nan')):>11.3f}" + ("  " + " / ".join(f"{x:.3f}" for x in w.values()) if w else ""))
    print(json.dumps(ratios))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
