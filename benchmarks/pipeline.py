"""Pipeline stages (issue 12): a tail over several worker processes, measured.

Three parts, each with real `python -m cloud_server` processes on loopback:

- memory: a ~134 MB model (8 x MatMul 2048x2048 + Tanh, partitioned at every layer with
  `edgesplit partition`) served with `--workers 5 --worker-memory 40MB`: the placement, each
  worker's weights and RSS against its budget (and one unbudgeted worker holding it all, for
  contrast), every answer against the unsplit model, then a stage worker SIGKILLed under load.
- throughput: a compute-bound tail (8 x MatMul 1024x1024, 32 rows a request) as one worker
  holding everything, 2, 3 and 4 stages, and 2 replicas (data parallelism), one ORT thread per
  worker, requests/s with 8 in flight, rounds interleaved.
- hop: what one more stage costs a request (p50 latency, one request at a time, 1 vs 2 vs 4
  stages) beside a bare pyzmq one-way leg of the same bytes between two processes: the price
  of routing each hop through the broker rather than pushing it worker to worker.

    python benchmarks/pipeline.py [--parts memory,throughput,hop] [--rounds 3] [--seconds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import zmq
from onnx import TensorProto, helper, numpy_helper

from common import Serve, free_port, load_average, machine
from edgesplit import protocol as P
from edgesplit.bundle import Bundle
from edgesplit.codecs import decode, get_codec

RAW = get_codec("raw")


# -- models -----------------------------------------------------------------------------------------
def build_stack(directory: Path, width: int, layers: int, name: str) -> tuple[Path, Path]:
    """An ONNX model of `layers` x tanh(x @ W_i) and its bundle, cut after every layer by the CLI."""
    rng = np.random.default_rng(1)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"t{i}"
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [out])]
        prev = out
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.onnx"
    onnx.save(model, str(path))
    repo = directory / "repo"
    repo.mkdir(exist_ok=True)
    cuts = [a for i in range(layers - 1) for a in ("--cut", f"t{i}")]
    subprocess.run([sys.executable, "-m", "edgesplit", "partition", str(path), *cuts, "-o", str(repo / name),
                    "--force"], check=True, stdout=subprocess.DEVNULL)
    return path, repo


def unsplit(model: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


# -- a server and its admin view --------------------------------------------------------------------
def start_pool(repo: Path, workers: int, *extra: str) -> Serve:
    """A server of `workers` single-threaded workers, with its admin endpoints."""
    return Serve(repo, workers, "--threads", "1", *extra, http=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Client:
    """A DEALER speaking the wire protocol, `window` requests in flight."""

    def __init__(self, address: str, bundle: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.bundle = bundle
        self._n = 0

    def send(self, x: np.ndarray, cut: int = 0, name: str = "x") -> str:
        self._n += 1
        rid = f"r{self._n}"
        P.send(self.sock, P.infer(rid, self.bundle, cut, {name: RAW.encode(x)}, deadline_ms=60_000))
        return rid

    def recv(self, timeout_ms: int = 60_000) -> P.Message | None:
        if not self.sock.poll(timeout_ms):
            return None
        return P.decode(self.sock.recv_multipart(copy=False))

    def close(self) -> None:
        self.sock.close(0)


def out_of(msg: P.Message) -> np.ndarray:
    if msg.kind != "result":
        raise RuntimeError(f"{msg.kind}: {msg.meta}")
    return decode(msg.tensors["y"])


# -- memory: a model bigger than a worker -----------------------------------------------------------
def part_memory(tmp: Path, report: dict) -> None:
    width, layers, budget = 2048, 8, "40MB"
    model, repo = build_stack(tmp / "big", width, layers, "big")
    bundle = Bundle.load(repo / "big")
    ref = unsplit(model)
    print(f"\n## memory: {bundle.weight_bytes() / 1e6:.1f} MB of weights in {layers} segments, "
          f"--workers 5 --worker-memory {budget}")
    pool = start_pool(repo, 5, "--worker-memory", budget)
    try:
        end = time.monotonic() + 120  # "ready" needs one worker per stage; let the replica load too
        while time.monotonic() < end and not all(set(s["ready"]) == set(s["workers"])
                                                 for s in pool.models()["pipelines"][0]["stages"]):
            time.sleep(0.1)
        m = pool.models()
        stages = m["pipelines"][0]["stages"]
        workers = {w["name"]: w for w in m["workers"]}
        rows = []
        for s in stages:
            for name in s["workers"]:
                w = workers[name]
                rows.append({"stage": s["stage"], "segments": s["segments"], "worker": name,
                             "weights_mb": round(w["memory"]["used"] / 1e6, 1),
                             "budget_mb": round(w["memory"]["budget"] / 1e6, 1), "rss_mb": round(rss_mb(w["pid"]), 1)})
        print("| stage | segments | worker | weights held | budget | RSS |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['stage']} | [{r['segments'][0]}, {r['segments'][1]}) | {r['worker']} | {r['weights_mb']} MB "
                  f"| {r['budget_mb']} MB | {r['rss_mb']} MB |")
        # every answer against the unsplit model, at cuts entering different stages
        rng = np.random.default_rng(3)
        client = Client(pool.address, bundle.id)
        worst, n = 0.0, 0
        from edgesplit.runtime import SegmentRunner

        with SegmentRunner(bundle, runner="ort-cpu", intra_op_threads=1) as head:
            for i in range(40):
                x = rng.standard_normal((1 + i % 4, width)).astype(np.float32)
                cut = (0, 1, 3, 6)[i % 4]
                feeds = head.run({"x": x}, 0, cut)
                (name, h), = feeds.items()
                client.send(h, cut, name)
                y = out_of(client.recv())
                worst = max(worst, float(np.abs(y - ref(x)).max()))
                n += 1
        client.close()
        print(f"{n} answers at cuts 0/1/3/6 vs the unsplit model: max |diff| {worst:.2e}")
        # a stage worker killed under load
        killed = kill_under_load(pool, bundle.id, width, ref, stages, workers)
        report["memory"] = {"weights_mb": round(bundle.weight_bytes() / 1e6, 1), "budget": budget, "placement": rows,
                            "answers": n, "max_abs_diff": worst, "kill": killed}
    finally:
        pool.close()
    whole = start_pool(repo, 1)  # the same bundle in one unbudgeted worker
    try:
        w = whole.models()["workers"][0]
        report.setdefault("memory", {})["one_worker_rss_mb"] = round(rss_mb(w["pid"]), 1)
        print(f"for contrast, one worker holding it whole: RSS {rss_mb(w['pid']):.1f} MB")
    finally:
        whole.close()


def kill_under_load(pool: Serve, bundle: str, width: int, ref, stages, workers) -> dict:
    victim = next(s for s in stages if len(s["workers"]) == 1)["workers"][0]  # a stage with no replica
    n_clients, per_client = 3, 60
    rng = np.random.default_rng(4)
    inputs = [[rng.standard_normal((1, width)).astype(np.float32) for _ in range(per_client)] for _ in range(n_clients)]
    answers: list[dict] = [dict() for _ in range(n_clients)]
    started = threading.Event()

    def run(c: int) -> None:
        cl = Client(pool.address, bundle)
        ids = {}
        todo = list(range(per_client))
        outstanding = 0
        end = time.monotonic() + 180
        while (todo or outstanding) and time.monotonic() < end:
            while todo and outstanding < 3:
                i = todo.pop(0)
                ids[cl.send(inputs[c][i])] = i
                outstanding += 1
            msg = cl.recv(2000)
            if msg is None:
                continue
            answers[c].setdefault(ids[msg.id], []).append(msg)
            outstanding -= 1
            if sum(len(a) for a in answers) > n_clients * per_client // 4:
                started.set()
        while (msg := cl.recv(500)) is not None:  # a duplicate would arrive now
            answers[c].setdefault(ids[msg.id], []).append(msg)
        cl.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    started.wait(120)
    os.kill(workers[victim]["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    for t in threads:
        t.join()
    once = sum(1 for c in range(n_clients) for i in range(per_client) if len(answers[c].get(i, [])) == 1)
    cloud = sum(1 for c in range(n_clients) for i in range(per_client)
                if answers[c].get(i) and answers[c][i][0].kind == "result")
    correct = sum(1 for c in range(n_clients) for i in range(per_client)
                  if answers[c].get(i) and answers[c][i][0].kind == "result"
                  and np.allclose(out_of(answers[c][i][0]), ref(inputs[c][i]), rtol=1e-5, atol=1e-6))
    total = n_clients * per_client
    print(f"SIGKILL of {victim} (an unreplicated stage) under load: {total} requests, {once} answered exactly once, "
          f"{cloud} by the cloud, {correct} correct; all done {time.monotonic() - t_kill:.1f} s after the kill")
    after = pool.models()["pipelines"][0]["stages"]
    print("placement after: " + "; ".join(f"[{s['segments'][0]}, {s['segments'][1]}) on {'+'.join(s['workers'])}"
                                           for s in after))
    return {"victim": victim, "requests": total, "exactly_once": once, "by_cloud": cloud, "correct": correct}


# -- throughput: stages vs one worker ---------------------------------------------------------------
def closed_loop(address: str, bundle: str, x: np.ndarray, seconds: float, window: int = 8) -> float:
    cl = Client(address, bundle)
    for _ in range(window):  # warm
        cl.send(x)
    for _ in range(window):
        out_of(cl.recv())
    done, outstanding = 0, 0
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        while outstanding < window:
            cl.send(x)
            outstanding += 1
        out_of(cl.recv())
        outstanding -= 1
        done += 1
    rate = done / (time.monotonic() - t0)
    while outstanding:
        cl.recv()
        outstanding -= 1
    cl.close()
    return rate


def latency(address: str, bundle: str, x: np.ndarray, n: int) -> list[float]:
    cl = Client(address, bundle)
    for _ in range(5):
        cl.send(x)
        out_of(cl.recv())
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        cl.send(x)
        out_of(cl.recv())
        ms.append((time.perf_counter() - t) * 1e3)
    cl.close()
    return ms


def part_throughput(tmp: Path, report: dict, rounds: int, seconds: float) -> None:
    width, layers, rows = 1024, 8, 32
    _, repo = build_stack(tmp / "mid", width, layers, "mid")
    bundle = Bundle.load(repo / "mid")
    configs = {"1 worker, whole tail": (1, ()), "2 stages": (2, ("--stages", "2")),
               "3 stages": (3, ("--stages", "3")), "4 stages": (4, ("--stages", "4")),
               "2 replicas (data parallel)": (2, ())}
    pools = {k: start_pool(repo, n, *extra) for k, (n, extra) in configs.items()}
    x = np.random.default_rng(5).standard_normal((rows, width)).astype(np.float32)
    rates: dict[str, list[float]] = {k: [] for k in configs}
    try:
        for _ in range(rounds):
            for k, pool in pools.items():
                rates[k].append(closed_loop(pool.address, bundle.id, x, seconds))
    finally:
        for p in pools.values():
            p.close()
    base = statistics.median(rates["1 worker, whole tail"])
    print(f"\n## throughput: {bundle.weight_bytes() / 1e6:.1f} MB tail, {rows} rows a request, 8 in flight, "
          f"one ORT thread a worker, {rounds} interleaved rounds of {seconds:.0f} s ({load_average()})")
    print("| pool | requests/s (median) | vs one worker |\n|---|---|---|")
    for k, r in rates.items():
        print(f"| {k} | {statistics.median(r):.1f} | {statistics.median(r) / base:.2f}x |")
    report["throughput"] = {k: {"rates": r, "median": statistics.median(r), "ratio": statistics.median(r) / base}
                            for k, r in rates.items()}


# -- hop: through the broker vs a direct leg --------------------------------------------------------
def _echo(address: str, ready, work: int) -> None:
    s = zmq.Context().socket(zmq.ROUTER)
    s.bind(address)
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    v = np.ones((1, 1024), np.float32)
    ready.set()
    while True:
        frames = s.recv_multipart(copy=False)
        if len(frames) == 2 and bytes(frames[1]) == b"stop":
            return
        t = time.perf_counter()
        for _ in range(work):  # a stage's compute between receiving and sending, as a worker does
            v = np.tanh(v @ w)
        spent = struct.pack("<d", time.perf_counter() - t)
        s.send_multipart([frames[0], spent, *frames[2:]], copy=False)


def bare_leg_ms(nbytes: int, n: int = 300, work: int = 8) -> float:
    """One direct leg of `nbytes` between two processes: a DEALER <-> ROUTER round trip where the
    far side computes about as long as a stage does before answering, minus that compute, halved
    (an idle-then-woken peer, as a pipeline's next stage is, not a hot ping-pong)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    ready = mp.Event()
    proc = mp.Process(target=_echo, args=(address, ready, work), daemon=True)
    proc.start()
    ready.wait(30)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(address)
    payload = os.urandom(nbytes)
    ms = []
    for i in range(n + 20):
        t = time.perf_counter()
        s.send_multipart([b"h", payload], copy=False)
        reply = s.recv_multipart()
        if i >= 20:
            ms.append((time.perf_counter() - t - struct.unpack("<d", reply[0])[0]) * 1e3)
    s.send_multipart([b"stop"])
    s.close(0)
    proc.join(10)
    return statistics.median(ms) / 2


def part_hop(tmp: Path, report: dict, rounds: int) -> None:
    width, layers = 1024, 8
    _, repo = build_stack(tmp / "hop", width, layers, "hop")
    bundle = Bundle.load(repo / "hop")
    out = {}
    for mode in ("process", "thread"):  # workers as processes (the default) or as threads of the server
        configs = {1: (1, ()), 2: (2, ("--stages", "2")), 4: (4, ("--stages", "4"))}
        pools = {k: start_pool(repo, n, *extra, "--worker-mode", mode) for k, (n, extra) in configs.items()}
        try:
            for rows in (1, 32):
                x = np.random.default_rng(6).standard_normal((rows, width)).astype(np.float32)
                lat: dict[int, list[float]] = {k: [] for k in configs}
                for _ in range(rounds):
                    for k, pool in pools.items():
                        lat[k] += latency(pool.address, bundle.id, x, 100)
                p50 = {k: statistics.median(v) for k, v in lat.items()}
                per_hop = (p50[4] - p50[1]) / 3
                leg = bare_leg_ms(x.nbytes)
                out[f"{mode}-{rows}"] = {"p50_ms": p50, "per_extra_stage_ms": per_hop, "bare_leg_ms": leg}
                print(f"\n## hop, {mode} workers: {x.nbytes / 1e3:.0f} kB between stages ({load_average()})\n"
                      f"p50 latency, one request at a time: 1 stage {p50[1]:.2f} ms, 2 stages {p50[2]:.2f} ms, "
                      f"4 stages {p50[4]:.2f} ms: {per_hop:.3f} ms per extra stage through the broker; "
                      f"a direct worker-to-worker leg of the same bytes (bare pyzmq to a process that computes "
                      f"~1 ms before answering, half the round trip less that compute): {leg:.3f} ms")
        finally:
            for p in pools.values():
                p.close()
    report["hop"] = out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="memory,throughput,hop")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    report: dict = {"machine": machine()}
    print(f"machine: {report['machine']}")
    with tempfile.TemporaryDirectory(prefix="edgesplit-pipeline-") as d:
        tmp = Path(d)
        if "memory" in parts:
            part_memory(tmp, report)
        if "throughput" in parts:
            part_throughput(tmp, report, args.rounds, args.seconds)
        if "hop" in parts:
            part_hop(tmp, report, args.rounds)
    report["load_after"] = load_average()
    print(f"\n{report['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
