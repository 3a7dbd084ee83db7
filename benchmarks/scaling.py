"""The broker's ceiling in requests/s (tiny tails, many clients) and bytes/s (large cuts), and what one
CPU worker sustains on a batchable tail: the measured figures docs/scaling.md sizes a fleet with.

    nice python benchmarks/scaling.py [--seconds 6] [--json benchmarks/results/scaling.json]
                                      [--model edge_agent/demo_data/efficientnet_lite0.onnx --cut TENSOR]

Real `python -m cloud_server` processes on loopback; the clients are threads of this process.
On a small shared box the clients, the broker and the workers share the cores, so besides the
requests/s achieved it reports the CPU seconds the broker process itself spent per request and
per MiB (from /proc): a broker's ceiling on one core of its own is 1 / that.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import zmq

from cloud_pool import throughput
from common import REPO, Serve, cpu_seconds, echo_bundle, load_average, machine, mlp_bundle, process_tree


def _run(repo: Path, bundle, ctx, seconds: float, workers: int, extra: list[str], clients: int, window: int,
         batch: int, width: int) -> dict:
    server = Serve(repo, workers, *extra)
    try:
        time.sleep(0.5)  # let the workers finish loading
        pids = process_tree(server.proc.pid)
        broker0, all0 = cpu_seconds([server.proc.pid]), cpu_seconds(pids)
        r = throughput(server.address, bundle.id, ctx, seconds, clients=clients, window=window, batch=batch,
                       width=width)
        broker_cpu, all_cpu = cpu_seconds([server.proc.pid]) - broker0, cpu_seconds(pids) - all0
    finally:
        server.close()
    n = max(1, r["requests"])
    r["broker_cpu_s"] = round(broker_cpu, 3)
    r["server_cpu_s"] = round(all_cpu, 3)
    r["broker_cpu_us_per_request"] = round(broker_cpu / n * 1e6, 1)
    r["broker_ceiling_requests_per_core_s"] = round(n / broker_cpu, 0) if broker_cpu > 0 else None
    return r


def tail_cost(model: str, cut: str, tmp: Path, batch: int, runs: int = 20) -> dict:
    """Partition `model` at `cut`, then time its tail on this CPU (one thread) at `batch` samples."""
    import subprocess
    import statistics

    import numpy as np

    from edgesplit.bundle import Bundle
    from edgesplit.runtime import SegmentRunner

    out = tmp / "model.bundle"
    subprocess.run([sys.executable, "-m", "edgesplit", "partition", model, "--cut", cut, "-o", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    bundle = Bundle.load(out)
    specs = bundle.cut(1).specs
    b = batch if all(isinstance(s.shape[0], str) for s in specs) else 1
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.standard_normal([b if isinstance(d, str) else d for d in s.shape]).astype(s.dtype)
             for s in specs}
    seg = SegmentRunner(bundle, runner="ort-cpu", intra_op_threads=1).activate()
    try:
        for _ in range(3):
            seg.run(feeds, 1, bundle.num_segments)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            seg.run(feeds, 1, bundle.num_segments)
            times.append(time.perf_counter() - t)
    finally:
        seg.close()
    ms = statistics.median(times) * 1e3
    return {"model": model, "cut": cut, "batch": b, "cut_bytes_per_sample_fp32": bundle.cut(1).bytes_per_sample,
            "tail_ms_per_batch": round(ms, 3), "tail_ms_per_sample": round(ms / b, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each closed-loop run")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "scaling.json"))
    ap.add_argument("--model", default=None, help="also time this model's tail on the CPU (with --cut)")
    ap.add_argument("--cut", default=None, help="the cut tensor of --model")
    ap.add_argument("--batch", type=int, default=8, help="batch for the --model tail timing")
    args = ap.parse_args()
    ctx = zmq.Context()
    out = {"machine": machine(), "command": f"nice python benchmarks/scaling.py --seconds {args.seconds:g}",
           "load_before": load_average()}
    print(f"machine: {out['machine']}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # 1. requests/s: a 64-byte cut and a 4-byte answer, near-zero compute, 32 clients x 4 in flight
        tiny = echo_bundle(tmp / "tiny" / "echo", elems=16, small_reply=True)
        r = _run(tmp / "tiny", tiny, ctx, args.seconds, 2, ["--capacity", "64", "--max-batch", "1", "--threads", "1"],
                 clients=32, window=4, batch=1, width=16)
        out["requests"] = r
        print(f"1. tiny tails, 32 clients x 4 in flight, 2 workers: {r['requests_per_s']:.0f} req/s, median "
              f"{r['median_latency_ms']} ms, errors {r['errors']}; broker CPU {r['broker_cpu_us_per_request']} us "
              f"per request -> ceiling {r['broker_ceiling_requests_per_core_s']} req/s per broker core")
        # 2. bytes/s: 1 MiB cuts (4-byte answers), 8 clients x 2 in flight
        elems = 1 << 18
        big = echo_bundle(tmp / "big" / "echo", elems=elems, small_reply=True)
        r = _run(tmp / "big", big, ctx, args.seconds, 2, ["--capacity", "16", "--max-batch", "1", "--threads", "1"],
                 clients=8, window=2, batch=1, width=elems)
        mib = r["requests"] * elems * 4 / (1 << 20)
        r["mib_per_s"] = round(r["requests_per_s"] * elems * 4 / (1 << 20), 1)
        r["broker_cpu_ms_per_mib"] = round(r["broker_cpu_s"] / max(mib, 1e-9) * 1e3, 3)
        r["broker_ceiling_mib_per_core_s"] = round(mib / r["broker_cpu_s"], 0) if r["broker_cpu_s"] > 0 else None
        out["bytes"] = r
        print(f"2. 1 MiB cuts, 8 clients x 2 in flight, 2 workers: {r['requests_per_s']:.0f} req/s = {r['mib_per_s']} "
              f"MiB/s in, median {r['median_latency_ms']} ms, errors {r['errors']}; broker CPU "
              f"{r['broker_cpu_ms_per_mib']} ms per MiB -> ceiling {r['broker_ceiling_mib_per_core_s']} MiB/s per core")
        # 3. one CPU worker on a batchable tail (mlp 256 x 8), 1 sample per request, dynamic batching
        mlp = mlp_bundle(tmp / "mlp" / "mlp", width=256, depth=8)
        r = _run(tmp / "mlp", mlp, ctx, args.seconds, 1, ["--capacity", "32", "--max-batch", "16", "--threads", "1",
                                                            "--max-queue-delay-ms", "2"],
                 clients=4, window=8, batch=1, width=256)
        out["worker"] = r
        print(f"3. one CPU worker, {mlp.name}, 1 sample per request, max_batch 16: {r['requests_per_s']:.0f} "
              f"samples/s, median {r['median_latency_ms']} ms, errors {r['errors']}")
        if args.model:
            r = tail_cost(args.model, args.cut, tmp, args.batch)
            out["model_tail"] = r
            out["command"] += f" --model {args.model} --cut {args.cut} --batch {args.batch}"
            print(f"4. {args.model} cut at {args.cut} ({r['cut_bytes_per_sample_fp32']} bytes/sample fp32): tail "
                  f"{r['tail_ms_per_batch']} ms per batch of {r['batch']} = {r['tail_ms_per_sample']} ms per sample "
                  f"on one CPU thread")
    out["load_after"] = load_average()
    print(out["load_after"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
