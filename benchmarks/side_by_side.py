"""The protocol and agent overheads of two revisions, measured side by side in one run.

Each revision is unpacked from git into a temporary directory and run in its own child
processes (PYTHONPATH points at that tree, so it imports its own edgesplit), rounds alternating
old / new so a change in the machine's load hits both alike. Both are timed on the path their
product takes:

- protocol: one 1 MiB raw-codec request from a DEALER to a ROUTER over loopback TCP, encoded,
  sent, received, its header decoded and checked, its tensor decoded — minus a bare 1 MiB frame
  on the same sockets. The current tree sends through `protocol.send` / `protocol.recv` (what
  the agent, broker and worker use); a tree from before they did is timed the way its product
  sent (`send_multipart(encode(msg))`, `decode(recv_multipart())`);
- agent: each revision's own `benchmarks/agent_overhead.py` (agent.infer p50 minus a bare split
  pass on EfficientNet-Lite0 against a real server).

    python benchmarks/side_by_side.py --old ce8fc3d [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, load_average, machine

PROTOCOL = r'''
import json, sys, time
import numpy as np, zmq
from edgesplit import protocol as P
from edgesplit.codecs import decode, get_codec

product_path = hasattr(P, "send_frames")  # the product sends through protocol.send/recv
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER); router.linger = 0; router.rcvtimeo = 5000
port = router.bind_to_random_port("tcp://127.0.0.1")
dealer = ctx.socket(zmq.DEALER); dealer.linger = 0; dealer.connect(f"tcp://127.0.0.1:{port}")
x = np.random.default_rng(0).standard_normal(2**18).astype(np.float32)
raw = get_codec("raw")
bare, full = [], []
for i in range(int(sys.argv[1]) + 30):
    t0 = time.perf_counter()
    dealer.send(memoryview(x), copy=False)
    memoryview(router.recv_multipart(copy=False)[1])
    t1 = time.perf_counter()
    msg = P.infer(f"r{i}", "b" * 64, 3, {"t": raw.encode(x)}, deadline_ms=100.0, reply_codec="raw")
    if product_path:
        P.send(dealer, msg)
        _, got = P.recv(router, envelope=1)
    else:
        dealer.send_multipart(P.encode(msg), copy=False)
        got = P.decode(router.recv_multipart(copy=False)[1:])
    y = decode(got.tensors["t"])
    t2 = time.perf_counter()
    assert y.shape == x.shape
    if i >= 30:
        bare.append(t1 - t0); full.append(t2 - t1)
print(json.dumps({"bare_us": float(np.median(bare)) * 1e6, "full_us": float(np.median(full)) * 1e6,
                  "path": "protocol.send/recv" if product_path else "send_multipart(encode) / decode(recv_multipart)"}))
'''


def unpack(rev: str, into: Path) -> Path:
    """The tree of `rev`, unpacked with git archive."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_in(tree: Path, args: list[str], timeout: float = 900) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed in {tree}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the older revision (a commit, tag or branch)")
    ap.add_argument("--new", default=None, help="the newer revision (default: the working tree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=400, help="protocol messages per round")
    ap.add_argument("--requests", type=int, default=300, help="agent requests per round")
    ap.add_argument("--codec", default="raw", help="the agent's codec (its own default where it has one)")
    ap.add_argument("--skip-agent", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out: dict = {"machine": machine(), "load_before": load_average(), "old": args.old, "new": args.new or "working tree",
                 "command": "python benchmarks/side_by_side.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as d:
        trees = {"old": unpack(args.old, Path(d) / "old"),
                 "new": unpack(args.new, Path(d) / "new") if args.new else REPO}
        res: dict = {k: {"protocol": [], "agent": []} for k in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                res[name]["protocol"].append(json.loads(run_in(tree, ["-c", PROTOCOL, str(args.repeats)])))
                if not args.skip_agent:
                    j = Path(d) / f"agent-{name}-{r}.json"
                    run_in(tree, ["benchmarks/agent_overhead.py", "--requests", str(args.requests),
                                  "--codec", args.codec, "--json", str(j)])
                    res[name]["agent"].append(json.loads(j.read_text()))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    summary = {}
    for name, v in res.items():
        p = v["protocol"]
        s = {"protocol_path": p[0]["path"],
             "protocol_overhead_us": round(statistics.median(x["full_us"] - x["bare_us"] for x in p), 1),
             "protocol_overhead_us_rounds": [round(x["full_us"] - x["bare_us"], 1) for x in p]}
        if v["agent"]:
            keys = [k for k in v["agent"][0] if isinstance(v["agent"][0][k], (int, float)) and "overhead" in k]
            for k in keys:
                s[k] = round(statistics.median(a[k] for a in v["agent"]), 3)
                s[k + "_rounds"] = [a[k] for a in v["agent"]]
        summary[name] = s
    out.update(summary=summary, raw=res, load_after=load_average())
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
