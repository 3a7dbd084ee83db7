"""An asyncio application that classifies images with `await agent.infer_async(...)`.

Several client tasks share one EdgeAgent. While their requests are in flight, a monitor task
keeps printing the link statistics: the event loop is never blocked by inference.

    python examples/asyncio_app/app.py [--clients 4] [--requests 8] [--server tcp://HOST:PORT --bundle DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from edge_agent import AgentConfig, EdgeAgent
from edge_agent.inputs import find_labels, preprocess_image, top_k
from edge_agent.local_cloud import LocalCloud, demo_bundle
from edgesplit.bundle import Bundle

REPO = Path(__file__).resolve().parents[2]


async def client(name: str, agent: EdgeAgent, images: dict, labels, n: int, results: list) -> None:
    names = list(images)
    for i in range(n):
        photo = names[(int(name[-1]) * 3 + i) % len(names)]
        t = time.perf_counter()
        res = await agent.infer_async(images[photo])
        label, p = top_k(next(iter(res.outputs.values()))[0], labels, 1)[0]
        results.append(res)
        print(f"{name}: {photo:18s} -> {label:20s} {p:4.2f} ({res.where}, {1e3 * (time.perf_counter() - t):.1f} ms)")


async def monitor(agent: EdgeAgent, stop: asyncio.Event) -> int:
    ticks = 0
    while not stop.is_set():
        stats = agent.link_stats()
        s = stats.servers[0] if stats.servers else None
        print(f"  [monitor] server {s.state if s else '-'}, in flight {s.in_flight if s else 0}, "
              f"answers {dict(sorted(stats.counters.items()))}")
        ticks += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    return ticks


async def run(agent: EdgeAgent, images: dict, labels, clients: int, requests: int) -> list:
    results: list = []
    stop = asyncio.Event()
    mon = asyncio.create_task(monitor(agent, stop))
    await asyncio.gather(*(client(f"client{c}", agent, images, labels, requests, results) for c in range(clients)))
    stop.set()
    ticks = await mon
    print(f"{len(results)} answers ({sum(r.where == 'cloud' for r in results)} from the cloud); "
          f"the monitor ticked {ticks} times meanwhile")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description="asyncio app over an edge agent")
    ap.add_argument("--server")
    ap.add_argument("--bundle")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.bundle:
            bundle = Bundle.load(args.bundle)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            bundle = demo_bundle(tmp / "repo" / "efficientnet_lite0")
        address = args.server or stack.enter_context(LocalCloud(bundle.path.parent, threads=1)).address
        config = AgentConfig(max_in_flight=4, connect_timeout_ms=10000, intra_op_threads=1)
        agent = stack.enter_context(EdgeAgent(bundle, [address], cut=2, codec="int8+zstd", config=config))
        labels = find_labels(None, bundle)
        images = {p.name: {bundle.inputs[0].name: preprocess_image(p)}
                  for p in sorted((REPO / "edge_agent" / "demo_data" / "photos").glob("*.jpg"))}
        results = asyncio.run(run(agent, images, labels, args.clients, args.requests))
        if len(results) != args.clients * args.requests:
            print("error: answers were lost", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
