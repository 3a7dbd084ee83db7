"""A robot's camera loop: 30 frames a second, several in flight, a deadline per frame.

Each frame is submitted to the edge agent as it is captured (agent.submit returns a future),
so while the cloud finishes frame t the device already runs the head of frame t+1: the loop
keeps --in-flight frames going instead of waiting for each answer. Every frame carries a
deadline: if the cloud cannot answer in time the agent finishes the frame on the device.
With --outage-at, the link to the cloud is cut for a while (a tunnel) and comes back.

    python examples/robot_camera_loop/camera_loop.py                      # local cloud on loopback
    python examples/robot_camera_loop/camera_loop.py --outage-at 1 --outage-for 1
    python examples/robot_camera_loop/camera_loop.py --server tcp://cloud:5555 --bundle my.bundle
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_agent import AgentConfig, EdgeAgent
from edge_agent.inputs import find_labels, preprocess_image, top_k
from edge_agent.local_cloud import LocalCloud, demo_bundle
from edgesplit.bundle import Bundle
from edgesplit.netsim import LinkEmulator

REPO = Path(__file__).resolve().parents[2]


def camera(photos: list[Path], fps: float, frames: int):
    """A stand-in camera: the photos in turn, with sensor noise, at `fps`."""
    images = [preprocess_image(p) for p in photos]
    rng = np.random.default_rng(0)
    period = 1.0 / fps
    start = time.perf_counter()
    for i in range(frames):
        wait = start + i * period - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        frame = images[i % len(images)] + rng.normal(0, 0.02, images[0].shape).astype(np.float32)
        yield i, time.perf_counter(), frame


def main() -> int:
    ap = argparse.ArgumentParser(description="robot camera loop over an edge agent")
    ap.add_argument("--server", help="cloud broker address (default: start one on loopback)")
    ap.add_argument("--bundle", help="bundle directory (default: split the shipped EfficientNet-Lite0)")
    ap.add_argument("--frames", type=int, default=90)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--in-flight", type=int, default=4, help="frames pending at once")
    ap.add_argument("--deadline-ms", type=float, default=150.0, help="per-frame deadline")
    ap.add_argument("--cut", default="2")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads on the device (default 1)")
    ap.add_argument("--outage-at", type=float, default=None, help="cut the link after this many seconds")
    ap.add_argument("--outage-for", type=float, default=1.0, help="... for this many seconds")
    args = ap.parse_args()

    with contextlib.ExitStack() as stack:
        if args.bundle:
            bundle = Bundle.load(args.bundle)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            bundle = demo_bundle(tmp / "repo" / "efficientnet_lite0")
        address = args.server
        if address is None:
            address = stack.enter_context(LocalCloud(bundle.path.parent, threads=1)).address
        link = stack.enter_context(LinkEmulator(to=address.split("//", 1)[1]))
        config = AgentConfig(deadline_ms=args.deadline_ms, max_in_flight=args.in_flight, connect_timeout_ms=10000,
                             intra_op_threads=args.threads)
        agent = stack.enter_context(EdgeAgent(bundle, [link.address], cut=int(args.cut) if args.cut != "auto" else "auto",
                                              codec="int8+zstd", config=config))
        labels = find_labels(None, bundle)
        photos = sorted((REPO / "edge_agent" / "demo_data" / "photos").glob("*.jpg"))
        print(f"camera at {args.fps:.0f} fps, {args.in_flight} frames in flight, deadline {args.deadline_ms:.0f} ms, "
              f"device runner {agent.runner_name}")

        pending: collections.deque = collections.deque()
        latencies, where = [], collections.Counter()
        late = 0
        t0 = time.perf_counter()
        outage = None

        def collect(block: bool) -> None:
            nonlocal late
            while pending and (block or pending[0][2].done()):
                i, captured, fut = pending.popleft()
                res = fut.result()
                ms = (time.perf_counter() - captured) * 1e3
                latencies.append(ms)
                where[res.where] += 1
                late += ms > args.deadline_ms
                label, p = top_k(res.outputs[bundle.outputs[0].name][0], labels, 1)[0]
                if i % 10 == 0 or res.where == "local":
                    print(f"frame {i:4d}: {label:20s} {p:4.2f}  {res.where:5s} {ms:6.1f} ms"
                          + (f" ({res.reason})" if res.reason else ""))
                block = False

        for i, captured, frame in camera(photos, args.fps, args.frames):
            now = time.perf_counter() - t0
            if args.outage_at is not None and outage is None and now >= args.outage_at:
                print(f"--- link cut at {now:.1f} s (a tunnel) ---")
                link.cut()
                outage = now
            if outage is not None and outage > 0 and now >= outage + args.outage_for:
                print(f"--- link back at {now:.1f} s ---")
                link.restore()
                outage = -1.0
            if len(pending) >= args.in_flight:
                collect(block=True)   # the oldest frame must finish before a new one starts
            pending.append((i, captured, agent.submit({bundle.inputs[0].name: frame})))
            collect(block=False)
        while pending:
            collect(block=True)
        elapsed = time.perf_counter() - t0
        lat = np.array(latencies)
        print(f"{len(lat)} frames in {elapsed:.1f} s ({len(lat) / elapsed:.1f} fps): latency p50 {np.median(lat):.1f} ms, "
              f"p90 {np.percentile(lat, 90):.1f} ms; cloud {where['cloud']}, local {where['local']}; "
              f"over the deadline {late}")
        if len(lat) != args.frames:
            print("error: frames were lost", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
