"""What the edge agent adds on top of the work itself: agent.infer p50 minus a bare split pass.

The bare pass is the least a split inference can do: run the head with ONNX Runtime, send the
cut tensor's bytes over a ZeroMQ DEALER, let the server run the tail, receive the outputs. The
agent pass does the same through EdgeAgent.infer (input checks, cut choice, request ids, the I/O
thread hand-off, deadline timers, reply validation, timings). Both talk to the same tail server
(a separate process: a ROUTER that runs segments [cut, n) with ONNX Runtime), alternating request
by request so drift hits both alike.

    python benchmarks/agent_overhead.py [--model edge_agent/demo_data/efficientnet_lite0.onnx] [--requests 300]
        [--codec raw] [--json benchmarks/results/agent_overhead.json]

Goal (issue 5): overhead p50 <= 1 ms on loopback.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine

REPO = Path(__file__).resolve().parents[1]


def serve(bundle_dir: str) -> None:
    """The tail server: ROUTER on a random port; prints the address, then answers forever."""
    import zmq

    from edgesplit import codecs, protocol
    from edgesplit.bundle import Bundle
    from edgesplit.runtime import SegmentChain

    bundle = Bundle.load(bundle_dir)
    n = bundle.num_segments
    chains = {k: SegmentChain(bundle, k, n, runner="ort-cpu").activate() for k in range(n)}
    raw = codecs.get_codec("raw")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    print(sock.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
    while True:
        ident, *frames = sock.recv_multipart(copy=False)
        msg = protocol.decode(frames)
        if msg.kind == "ping":
            protocol.send(sock, protocol.pong(msg.id, load={"workers": 1, "queued": 0, "inflight": 0,
                                                          "est_wait_ms": 0.0}), [ident])
        elif msg.kind == "hello":
            protocol.send(sock, protocol.welcome(msg.id, held=True, profile={"segment_ms": None}), [ident])
        elif msg.kind == "infer":
            t0 = time.perf_counter()
            tensors = {k: codecs.decode(e) for k, e in msg.tensors.items()}
            t1 = time.perf_counter()
            out = chains[msg.cut].run(tensors)
            t2 = time.perf_counter()
            enc = {k: raw.encode(v) for k, v in out.items()}
            t3 = time.perf_counter()
            protocol.send(sock, protocol.result(msg.id, enc, timings={
                "queue_ms": 0.0, "decode_ms": (t1 - t0) * 1e3, "compute_ms": (t2 - t1) * 1e3,
                "encode_ms": (t3 - t2) * 1e3}), [ident])


def make_bundle(model: Path, out: Path, cut_index: int):
    from edgesplit.graph import candidate_cuts, partition

    cands = candidate_cuts(model)
    pick = [c for c in cands if c.index == cut_index] or [cands[len(cands) // 2]]
    return partition(model, [list(pick[0].tensors)], out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "edge_agent" / "demo_data" / "efficientnet_lite0.onnx"))
    ap.add_argument("--candidate-cut", type=int, default=12,
                    help="candidate cut index of the model to split at (default 12: 38 kB for EfficientNet-Lite0)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--codec", default="raw")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads on the edge (default 1)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0

    import zmq

    from edge_agent import AgentConfig, EdgeAgent
    from edgesplit import codecs, protocol
    from edgesplit.runtime import SegmentRunner

    tmp = Path(tempfile.mkdtemp(prefix="agent-overhead-"))
    bundle = make_bundle(Path(args.model), tmp / "bundle", args.candidate_cut)
    k = 1
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(bundle.path)], stdout=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().strip()
        spec = bundle.inputs[0]
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)
        feeds = {spec.name: x}

        # the bare pass: its own ORT sessions, its own DEALER, nothing else
        head = SegmentRunner(bundle, "ort-cpu", args.threads)
        codec = codecs.get_codec(args.codec)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(address)

        def bare() -> dict:
            t0 = time.perf_counter()
            cut = head.run(feeds, 0, k)
            t1 = time.perf_counter()
            enc = {name: codec.encode(a) for name, a in cut.items()}
            t2 = time.perf_counter()
            dealer.send_multipart(protocol.encode(protocol.infer("b", bundle.id, k, enc)), copy=False)
            if not dealer.poll(10000):
                raise RuntimeError("the tail server did not answer")
            frames = dealer.recv_multipart(copy=False)
            t3 = time.perf_counter()
            msg = protocol.decode(frames)
            outs = {name: codecs.decode(e) for name, e in msg.tensors.items()}
            t4 = time.perf_counter()
            st = msg.meta["timings"]
            server_ms = st["decode_ms"] + st["compute_ms"] + st["encode_ms"]
            return {"total": (t4 - t0) * 1e3, "head": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3,
                    "tail": st["compute_ms"], "wire": (t3 - t2) * 1e3 - server_ms,
                    "bytes_up": sum(e.nbytes for e in enc.values()),
                    "bytes_down": sum(len(f.buffer) for f in frames[1:]), "n_out": len(outs)}

        cfg = AgentConfig(profile_runs=1, intra_op_threads=args.threads, deadline_ms=10000)
        with EdgeAgent(bundle, [address], runner="ort-cpu", codec=args.codec, cut=k, config=cfg) as agent:
            for _ in range(20):  # warm-up both
                agent.infer(feeds)
                bare()
            a_rows, b_rows = [], []
            for i in range(args.requests):
                if i % 2:
                    b_rows.append(bare())
                    r = agent.infer(feeds)
                else:
                    r = agent.infer(feeds)
                    b_rows.append(bare())
                assert r.where == "cloud", r
                a_rows.append(r.timings)
        dealer.close()
        ctx.term()
        head.close()
    finally:
        server.kill()
        server.wait()

    med = lambda rows, key: float(np.median([r[key] for r in rows]))  # noqa: E731
    agent_p50 = med(a_rows, "total")
    bare_p50 = med(b_rows, "total")
    parts = {"head": med(b_rows, "head"), "encode": med(b_rows, "encode"), "wire": med(b_rows, "wire"),
             "tail": med(b_rows, "tail")}
    work = parts["head"] + parts["tail"] + parts["wire"]
    # per adjacent pair: the agent's total minus the bare pass's head + tail + transfer
    paired = float(np.median([a["total"] - (b["head"] + b["tail"] + b["wire"]) for a, b in zip(a_rows, b_rows)]))
    paired_bare = float(np.median([a["total"] - b["total"] for a, b in zip(a_rows, b_rows)]))
    out = {
        "machine": machine(), "model": Path(args.model).name, "cut": k,
        "cut_tensors": list(bundle.cut(k).tensors), "codec": args.codec, "requests": args.requests,
        "bytes_up": b_rows[0]["bytes_up"], "bytes_down": b_rows[0]["bytes_down"],
        "agent_p50_ms": agent_p50, "bare_p50_ms": bare_p50, "overhead_vs_bare_p50_ms": agent_p50 - bare_p50,
        "components_p50_ms": parts, "head_tail_wire_ms": work,
        "overhead_vs_bare_paired_p50_ms": paired_bare,
        "agent_minus_head_tail_transfer_paired_p50_ms": paired,
        "agent_p90_ms": float(np.percentile([r["total"] for r in a_rows], 90)),
        "bare_p90_ms": float(np.percentile([r["total"] for r in b_rows], 90)),
    }
    print(f"machine: {out['machine']}")
    print(f"model {out['model']}, cut {k} ({', '.join(out['cut_tensors'])}), codec {args.codec}, "
          f"{out['bytes_up']} B up / {out['bytes_down']} B down, {args.requests} requests each, alternating")
    print(f"  bare split pass p50   {bare_p50:7.3f} ms   (head {parts['head']:.3f} + encode {parts['encode']:.3f} "
          f"+ wire {parts['wire']:.3f} + tail {parts['tail']:.3f})")
    print(f"  agent.infer p50       {agent_p50:7.3f} ms")
    print(f"  overhead vs bare pass {agent_p50 - bare_p50:7.3f} ms  (goal <= 1 ms)")
    print(f"  paired: agent - bare  {paired_bare:7.3f} ms   "
          f"agent - (head + tail + transfer) {paired:7.3f} ms (the latter includes encode and decode)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
