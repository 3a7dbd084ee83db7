"""Benchmark of the cloud pool (`edgesplit serve`), side by side in one run:

1. per-request overhead of the whole path (edge DEALER -> broker -> tail worker -> broker -> edge)
   with a near-zero-compute tail, against a bare pyzmq DEALER/ROUTER round trip of the same
   bytes (an echo server in its own process), for 1 MB requests, with the worker as a process
   (the default), a thread, or inline (run by the broker's own thread);
2. throughput against the number of workers (closed loop, batching off);
3. the effect of dynamic batching on a batchable model (1 worker, max_batch 1 vs 16).

    python benchmarks/cloud_pool.py [--quick] [--json benchmarks/results/cloud_pool.json] [--baseline DIR]

Prints the machine, medians and ratios; writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from common import REPO, Serve, cpu_seconds, echo_bundle, load_average, machine, mlp_bundle, process_tree
from edgesplit import protocol as P
from edgesplit.codecs import get_codec

_ECHO_SERVER = r"""
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER); s.linger = 0
port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
small = sys.argv[1] == "small"
tiny = b"\x00" * 4
read = len(sys.argv) > 2 and sys.argv[2] == "read"
if read:
    import numpy as np
while True:
    f = s.recv_multipart(copy=False)
    if f[1].bytes == b"quit":
        break
    if read:  # what any tail must do at least once: read its input
        np.frombuffer(f[-1].buffer, np.float32).max()
    # the reply a tail would send: a small header and the output payload (no copy)
    s.send_multipart([f[0], f[1], tiny if small else f[-1]], copy=False)
"""


# The floor of any design with the worker in another process: a C-speed relay (zmq.proxy, no
# Python per message) in one process and a trivial echo worker in another.
_RELAY = r"""
import sys, threading, zmq
ctx = zmq.Context()
front = ctx.socket(zmq.ROUTER); front.linger = 0
fport = front.bind_to_random_port("tcp://127.0.0.1")
back = ctx.socket(zmq.DEALER); back.linger = 0
bport = back.bind_to_random_port("tcp://127.0.0.1")
small = sys.argv[1] == "small"
print(fport, bport, flush=True)
try:
    zmq.proxy(front, back)
except zmq.ContextTerminated:
    pass
"""
_RELAY_WORKER = r"""
import sys, zmq
ctx = zmq.Context()
w = ctx.socket(zmq.DEALER); w.linger = 0
w.connect(sys.argv[1])
small = sys.argv[2] == "small"
tiny = b"\x00" * 4
while True:
    f = w.recv_multipart(copy=False)
    w.send_multipart([f[0], f[1], tiny if small else f[-1]], copy=False)
"""


def _roundtrips(sock, frames_fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        frames = frames_fn(i)
        t = time.perf_counter()
        sock.send_multipart(frames, copy=False)
        if not sock.poll(10_000):
            raise RuntimeError("no reply within 10 s")
        sock.recv_multipart(copy=False)
        out.append(time.perf_counter() - t)
    return out


def overhead(tmp: Path, ctx: zmq.Context, size: int, n: int, rounds: int, baseline: str | None = None) -> dict:
    """Full path vs bare round trip of `size` bytes, interleaved in `rounds` blocks of n.

    With `baseline` (a directory holding another version's cloud_server and edgesplit packages),
    that version's server runs side by side too (process and thread workers only).
    """
    elems = size // 4
    res = {}
    for small, mode in ((True, "process"), (True, "thread"), (True, "inline"),
                        (False, "process"), (False, "thread"), (False, "inline")):
        repo = tmp / f"repo-echo-{'small' if small else 'full'}-{mode}"
        bundle = echo_bundle(repo / "echo", elems, small)
        server = Serve(repo, 1, "--max-batch", "1", "--threads", "1", "--worker-mode", mode)
        before = (Serve(repo, 1, "--max-batch", "1", "--threads", "1", "--worker-mode", mode, pythonpath=baseline)
                  if baseline and mode != "inline" else None)
        echo = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, "small" if small else "full"],
                                stdout=subprocess.PIPE, text=True)
        port = int(echo.stdout.readline())
        reader = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, "small" if small else "full", "read"],
                                  stdout=subprocess.PIPE, text=True)
        rdport = int(reader.stdout.readline())
        relay = subprocess.Popen([sys.executable, "-c", _RELAY, "small" if small else "full"],
                                 stdout=subprocess.PIPE, text=True)
        rport, rback = map(int, relay.stdout.readline().split())
        relay_worker = subprocess.Popen([sys.executable, "-c", _RELAY_WORKER, f"tcp://127.0.0.1:{rback}",
                                         "small" if small else "full"])
        try:
            full = ctx.socket(zmq.DEALER)
            bare = ctx.socket(zmq.DEALER)
            floor = ctx.socket(zmq.DEALER)
            bare_read = ctx.socket(zmq.DEALER)
            old = ctx.socket(zmq.DEALER)
            for s in (full, bare, floor, bare_read, old):
                s.linger = 0
            full.connect(server.address)
            bare.connect(f"tcp://127.0.0.1:{port}")
            floor.connect(f"tcp://127.0.0.1:{rport}")
            bare_read.connect(f"tcp://127.0.0.1:{rdport}")
            if before is not None:
                old.connect(before.address)
            x = np.random.default_rng(0).standard_normal((1, elems)).astype(np.float32)
            enc = get_codec("raw").encode(x)

            def full_frames(i):
                return P.encode(P.infer(f"r{i}", bundle.id, 1, {"h": enc}, deadline_ms=10_000.0))

            head = full_frames(0)[0]

            def bare_frames(i):
                return [head, enc.payload]

            _roundtrips(full, full_frames, 50)  # warm-up: sessions, TCP windows, allocators
            _roundtrips(bare, bare_frames, 50)
            _roundtrips(floor, bare_frames, 50)
            _roundtrips(bare_read, bare_frames, 50)
            if before is not None:
                _roundtrips(old, full_frames, 50)
            t_full, t_bare, t_floor, t_read, t_old = [], [], [], [], []
            server_pids, echo_pids = process_tree(server.proc.pid), [echo.pid]
            old_pids = process_tree(before.proc.pid) if before is not None else []
            cpu_full = cpu_bare = cpu_old = 0.0
            for _ in range(rounds):
                c = cpu_seconds(server_pids)
                t_full += _roundtrips(full, full_frames, n)
                cpu_full += cpu_seconds(server_pids) - c
                c = cpu_seconds(echo_pids)
                t_bare += _roundtrips(bare, bare_frames, n)
                cpu_bare += cpu_seconds(echo_pids) - c
                t_floor += _roundtrips(floor, bare_frames, n)
                t_read += _roundtrips(bare_read, bare_frames, n)
                if before is not None:
                    c = cpu_seconds(old_pids)
                    t_old += _roundtrips(old, full_frames, n)
                    cpu_old += cpu_seconds(old_pids) - c
            bare.send_multipart([b"quit", b""])
            bare_read.send_multipart([b"quit", b""])
            mf, mb = statistics.median(t_full) * 1e6, statistics.median(t_bare) * 1e6
            mr, md = statistics.median(t_floor) * 1e6, statistics.median(t_read) * 1e6
            key = ("small_reply" if small else "same_size_reply") + f"/{mode}_worker"
            res[key] = {"request_bytes": x.nbytes, "reply_bytes": 4 if small else x.nbytes,
                        "full_path_median_us": round(mf, 1), "bare_zmq_median_us": round(mb, 1),
                        "ratio": round(mf / mb, 3), "samples": len(t_full),
                        "c_relay_floor_median_us": round(mr, 1), "c_relay_floor_ratio": round(mr / mb, 3),
                        "bare_zmq_reading_payload_median_us": round(md, 1),
                        "bare_zmq_reading_payload_ratio": round(md / mb, 3),
                        "server_cpu_us_per_request": round(cpu_full / len(t_full) * 1e6, 1),
                        "echo_cpu_us_per_request": round(cpu_bare / len(t_bare) * 1e6, 1),
                        "full_path_p90_us": round(float(np.percentile(t_full, 90)) * 1e6, 1),
                        "bare_zmq_p90_us": round(float(np.percentile(t_bare, 90)) * 1e6, 1)}
            if t_old:
                mo = statistics.median(t_old) * 1e6
                res[key].update(baseline_median_us=round(mo, 1), baseline_ratio=round(mo / mb, 3),
                                baseline_cpu_us_per_request=round(cpu_old / len(t_old) * 1e6, 1))
            for s in (full, bare, floor, bare_read, old):
                s.close()
        finally:
            server.close()
            if before is not None:
                before.close()
            echo.wait(10)
            reader.wait(10)
            relay.kill()
            relay_worker.kill()
            relay.wait(10)
            relay_worker.wait(10)
    return res


def throughput(address: str, bundle_id: str, ctx: zmq.Context, seconds: float, clients: int, window: int,
               batch: int, width: int) -> dict:
    """Closed loop: `clients` DEALERs, each keeping `window` requests of `batch` samples in flight."""
    stop = time.monotonic() + seconds
    counts = [0] * clients
    lats: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    x = np.random.default_rng(1).standard_normal((batch, width)).astype(np.float32)
    enc = get_codec("raw").encode(x)

    def client(c):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(address)
        sent = {}
        i = 0
        while True:
            if time.monotonic() < stop:
                while len(sent) < window:
                    rid = f"{c}-{i}"
                    i += 1
                    sent[rid] = time.perf_counter()
                    s.send_multipart(P.encode(P.infer(rid, bundle_id, 1, {"h": enc}, deadline_ms=30_000.0)), copy=False)
            elif not sent:
                break
            if not s.poll(10_000):
                break
            msg = P.decode(s.recv_multipart(copy=False))
            t0 = sent.pop(msg.id, None)
            if t0 is None:
                continue
            if msg.kind == "result":
                counts[c] += 1
                lats[c].append(time.perf_counter() - t0)
            else:
                errors[c] += 1
        s.close()

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    allat = [v for lst in lats for v in lst]
    return {"requests_per_s": round(sum(counts) / wall, 1), "samples_per_s": round(sum(counts) * batch / wall, 1),
            "median_latency_ms": round(statistics.median(allat) * 1e3, 3) if allat else None,
            "errors": sum(errors), "requests": sum(counts)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    ap.add_argument("--size-mb", type=float, default=1.0, help="request size for the overhead part")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "cloud_pool.json"))
    ap.add_argument("--parts", default="overhead,workers,batching")
    ap.add_argument("--baseline", metavar="DIR", default=None,
                    help="also run another version side by side in the overhead part: a directory holding its "
                         "cloud_server/ and edgesplit/ (e.g. git archive OLD cloud_server edgesplit | tar -x -C DIR)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    n, rounds, seconds = (50, 2, 2.0) if args.quick else (100, 6, 5.0)
    ctx = zmq.Context()
    out = {"machine": machine(), "command": "python benchmarks/cloud_pool.py" + (" --quick" if args.quick else "")}
    out["load_before"] = load_average()
    print(f"machine: {out['machine']}; {out['load_before']} (other work on the box inflates every number)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "overhead" in parts:
            size = int(args.size_mb * (1 << 20))
            print(f"\n1. per-request overhead, {size} byte requests, {n * rounds} round trips each, interleaved")
            res = overhead(tmp, ctx, size, n, rounds, args.baseline)
            out["overhead"] = res
            if args.baseline:
                out["baseline"] = args.baseline
            for k, v in res.items():
                print(f"   {k:30s} full path {v['full_path_median_us']:7.0f} us  "
                      f"bare pyzmq {v['bare_zmq_median_us']:6.0f} us"
                      f"  ratio {v['ratio']:.2f}   [C relay via another process: {v['c_relay_floor_median_us']:.0f} us,"
                      f" x{v['c_relay_floor_ratio']:.2f}; bare + reading the payload: "
                      f"{v['bare_zmq_reading_payload_median_us']:.0f} us, x{v['bare_zmq_reading_payload_ratio']:.2f}]\n"
                      f"   {'':30s} CPU per request: server {v['server_cpu_us_per_request']:.0f} us,"
                      f" echo server {v['echo_cpu_us_per_request']:.0f} us"
                      + (f"\n   {'':30s} baseline ({args.baseline}): {v['baseline_median_us']:.0f} us,"
                         f" ratio {v['baseline_ratio']:.2f}, CPU {v['baseline_cpu_us_per_request']:.0f} us"
                         if "baseline_median_us" in v else ""))
        width = 256
        repo = tmp / "repo-mlp"
        bundle = mlp_bundle(repo / "mlp", width=width, depth=8)
        if "workers" in parts:
            print(f"\n2. throughput vs workers ({bundle.name}, batch 64 per request, batching off, "
                  "1 thread per worker)")
            out["workers"] = {}
            for w in (1, 2):
                server = Serve(repo, w, "--max-batch", "1", "--threads", "1")
                try:
                    r = throughput(server.address, bundle.id, ctx, seconds, clients=4, window=4, batch=64, width=width)
                finally:
                    server.close()
                out["workers"][str(w)] = r
                print(f"   {w} worker(s): {r['requests_per_s']:8.1f} req/s  {r['samples_per_s']:9.1f} samples/s  "
                      f"median {r['median_latency_ms']} ms  errors {r['errors']}")
            one, two = out["workers"]["1"]["requests_per_s"], out["workers"]["2"]["requests_per_s"]
            out["workers"]["speedup_2_vs_1"] = round(two / one, 3)
            print(f"   2 vs 1 workers: x{two / one:.2f}")
        if "batching" in parts:
            print(f"\n3. dynamic batching ({bundle.name}, 1 sample per request, 32 in flight, 1 worker, 1 thread)")
            out["batching"] = {}
            for mb in (1, 16):
                server = Serve(repo, 1, "--max-batch", str(mb), "--max-queue-delay-ms", "2", "--threads", "1",
                               "--capacity", "32")
                try:
                    r = throughput(server.address, bundle.id, ctx, seconds, clients=4, window=8, batch=1, width=width)
                finally:
                    server.close()
                out["batching"][f"max_batch_{mb}"] = r
                print(f"   max_batch {mb:2d}: {r['requests_per_s']:8.1f} req/s  median {r['median_latency_ms']} ms  "
                      f"errors {r['errors']}")
            a, b = out["batching"]["max_batch_1"]["requests_per_s"], out["batching"]["max_batch_16"]["requests_per_s"]
            out["batching"]["speedup"] = round(b / a, 3)
            print(f"   batching speed-up: x{b / a:.2f}")
    out["load_after"] = load_average()
    print(f"\n{out['load_after']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
