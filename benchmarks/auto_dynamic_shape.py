"""cut="auto" on a dynamic-shape detector: does it pick as well as the best fixed cut, at the real input size?

The model is models/zoo/detector.onnx (an FPN detector with symbolic N, H, W, like PP-OCR's
text detector), partitioned at four of its candidate cuts. The agent's start-up profile sets
every symbolic dim to 1 (a 1x3x1x1 image); the requests are 1x3x320x320. The device is emulated
`--slowdown` times slower than this CPU (AgentConfig.edge_slowdown), the cloud is a real
`python -m cloud_server` child on loopback behind a link emulator (`--rate`, `--delay`).

Every configuration is a live agent at the same time: each fixed cut 0..n-1, all-edge (an agent
with no server), and `--auto-runs` agents with cut="auto" created one after the other (fresh
start-up profile each), and the requests go round-robin, one per agent per round, so the load
of a shared box falls on all of them alike. After `--warmup` rounds (for auto: the shape's
profile and the link estimates), the medians of `--rounds` rounds are compared.

    python benchmarks/auto_dynamic_shape.py [--rounds 40] [--slowdown 25] [--rate 50mbit] [--delay 5ms]
        [--deadline-ms MS] [--out benchmarks/results/auto_dynamic_shape.json]

Passes when every auto run's median is within 10 % of the best fixed configuration's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common import REPO, machine

MODEL = REPO / "models" / "zoo" / "detector.onnx"
SHAPE = (1, 3, 320, 320)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--slowdown", type=float, default=25.0, help="device this many times slower than this CPU")
    ap.add_argument("--rate", default="50mbit")
    ap.add_argument("--delay", default="5ms", help="one way")
    ap.add_argument("--codec", default="int8+zstd")
    ap.add_argument("--deadline-ms", type=float, default=None, help="per-request deadline (default AgentConfig's)")
    ap.add_argument("--auto-runs", type=int, default=2)
    ap.add_argument("--cuts", default="1,3,6,9", help="candidate cut indices (edgesplit inspect) to partition at")
    ap.add_argument("--baseline", action="store_true",
                    help="add an auto agent that keeps only the start-up profile (shape_profiles=0), as before")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from edge_agent import AgentConfig, EdgeAgent
    from edge_agent.local_cloud import LocalCloud
    from edgesplit.graph import candidate_cuts, partition
    from edgesplit.netsim import LinkEmulator, parse_duration, parse_rate

    print(f"machine: {machine()}", flush=True)
    wanted = {int(c) for c in args.cuts.split(",")}
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="edgesplit-bench-") as tmp:
        repo = Path(tmp) / "repo"
        cands = [c for c in candidate_cuts(MODEL, shapes={"image": SHAPE}) if c.index in wanted]
        bundle = partition(MODEL, [list(c.tensors) for c in cands], repo / "detector",
                           shapes={"image": SHAPE})
        n = bundle.num_segments
        print(f"bundle: {n} segments, cuts at candidates {sorted(wanted)}; request {list(SHAPE)}", flush=True)
        cloud = LocalCloud(repo, threads=1).start()
        link = LinkEmulator(to=cloud.address.split("//", 1)[1], rate_bps=parse_rate(args.rate),
                            delay_s=parse_duration(args.delay)).start()
        extra = {"deadline_ms": args.deadline_ms} if args.deadline_ms else {}
        cfg = AgentConfig(intra_op_threads=1, edge_slowdown=args.slowdown, connect_timeout_ms=10000, **extra)
        agents: dict[str, EdgeAgent] = {}
        try:
            for k in range(n):
                agents[f"cut {k}"] = EdgeAgent(bundle, [link.address], codec=args.codec, cut=k, config=cfg)
            agents["all-edge"] = EdgeAgent(bundle, [], codec=args.codec, cut=0,
                                           config=cfg.replace(connect_timeout_ms=0))
            for r in range(args.auto_runs):
                agents[f"auto run {r + 1}"] = EdgeAgent(bundle, [link.address], codec=args.codec, cut="auto",
                                                        config=cfg)
            if args.baseline:
                agents["auto, 1x1 prof"] = EdgeAgent(bundle, [link.address], codec=args.codec, cut="auto",
                                                     config=cfg.replace(shape_profiles=0))
            times: dict[str, list[float]] = {name: [] for name in agents}
            cuts: dict[str, Counter] = {name: Counter() for name in agents}
            where: dict[str, Counter] = {name: Counter() for name in agents}
            t0 = time.monotonic()
            for rnd in range(args.warmup + args.rounds):
                for name, agent in agents.items():
                    res = agent.infer({"image": x})
                    if rnd >= args.warmup:
                        times[name].append(res.timings["total"])
                        cuts[name][res.cut if res.where == "cloud" else f"{res.cut} local ({res.reason})"] += 1
                        where[name][res.where] += 1
            elapsed = time.monotonic() - t0
            profiles = {name: [round(t, 2) for t in a.edge_ms] for name, a in agents.items() if name.startswith("auto")}
        finally:
            for a in agents.values():
                a.close()
            link.close()
            cloud.stop()

    med = {name: statistics.median(ts) for name, ts in times.items()}
    fixed = {name: m for name, m in med.items() if not name.startswith("auto")}
    if args.baseline:
        name = "auto, 1x1 prof"
        print(f"(baseline) {name}: {med[name] / fixed[min(fixed, key=fixed.get)]:.3f} x the best fixed")
    best = min(fixed, key=fixed.get)
    print(f"\n{args.rounds} rounds after {args.warmup} warm-up rounds, {elapsed:.0f} s; device x{args.slowdown:g}, "
          f"link {args.rate} {args.delay} one way, codec {args.codec}, deadline {cfg.deadline_ms:.0f} ms")
    print(f"{'configuration':14s} {'median ms':>10s}  {'p90 ms':>8s}  answers (cut: count)")
    for name in agents:
        p90 = float(np.percentile(times[name], 90))
        print(f"{name:14s} {med[name]:10.1f}  {p90:8.1f}  {dict(cuts[name])}")
    ok = True
    for name in (n_ for n_ in agents if n_.startswith("auto run")):
        ratio = med[name] / fixed[best]
        ok &= ratio <= 1.10
        print(f"{name}: {ratio:.3f} x the best fixed configuration ({best}, {fixed[best]:.1f} ms)"
              f"  {'OK' if ratio <= 1.10 else 'MISS'}; device profile at {list(SHAPE)}: {profiles[name]} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "median_ms": med, "best_fixed": best, "cuts": {k: {str(c): v for c, v in cnt.items()} for k, cnt in cuts.items()},
            "auto_profiles_ms": profiles, "ok": ok}, indent=1))
        print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
