"""How fast the edge agent notices a lost link, and how fast it is back on the cloud.

Against a real cloud server (`python -m cloud_server`, a child process) on loopback, through a
link emulator (edgesplit.netsim.LinkEmulator), with a stream of requests running:

* blackhole: the emulator stops forwarding (no FIN, no RST: what a radio shadow looks like).
  Detection = time from the cut until the agent declares the server down (heartbeats);
  then the link is restored, and reconnection = time until the agent can send again.
* kill: the server process is SIGKILLed (the kernel closes its sockets). Detection = time
  until the agent declares it down; then a new server starts on the same port (its start-up
  time is shown), and "back" = time from its ready line until the first answer from the cloud
  (the agent reconnects to the broker while the workers load, so this is short).

Every request of the stream must be answered exactly once; the script checks it.

    python benchmarks/agent_failover.py [--trials 5] [--heartbeat-ms 200] [--json benchmarks/results/agent_failover.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stream:
    """Submits requests back to back (up to the agent's max_in_flight) until stopped."""

    def __init__(self, agent, feeds):
        self.agent, self.feeds = agent, feeds
        self.results, self.futures = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            f = self.agent.submit(self.feeds)
            f.add_done_callback(lambda fut: self.results.append((time.monotonic(), fut.result().where)))
            self.futures.append(f)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for f in self.futures:
            f.result(timeout=60)


def wait_until(cond, timeout_s: float = 30.0, step_s: float = 0.001) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError("condition not reached")
        time.sleep(step_s)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--heartbeat-ms", type=float, default=200.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from agent_overhead import machine
    from edge_agent import AgentConfig, EdgeAgent
    from edge_agent.local_cloud import LocalCloud, demo_bundle
    from edgesplit.netsim import LinkEmulator

    tmp = Path(tempfile.mkdtemp(prefix="agent-failover-"))
    bundle = demo_bundle(tmp / "repo" / "efficientnet_lite0")
    feeds = {bundle.inputs[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"
    cfg = AgentConfig(heartbeat_interval_ms=args.heartbeat_ms, deadline_ms=5000, connect_timeout_ms=30000,
                      max_in_flight=4, intra_op_threads=1)
    ivl = args.heartbeat_ms
    out = {"machine": machine(), "heartbeat_ms": ivl, "blackhole_detect_ms": [], "reconnect_ms": [],
           "kill_detect_ms": [], "server_start_ms": [], "restart_to_cloud_ms": []}
    cloud = LocalCloud(bundle.path.parent, bind=bind).start()
    try:
        with LinkEmulator(to=f"127.0.0.1:{port}") as link, \
                EdgeAgent(bundle, [link.address], cut=2, config=cfg) as agent:
            state = lambda: agent.link_stats().servers[0].state  # noqa: E731
            with Stream(agent, feeds) as stream:
                for _ in range(args.trials):
                    wait_until(lambda: state() == "up")
                    time.sleep(0.5)
                    link.cut()
                    out["blackhole_detect_ms"].append(1e3 * wait_until(lambda: state() != "up"))
                    time.sleep(0.3)
                    link.restore()
                    out["reconnect_ms"].append(1e3 * wait_until(lambda: state() == "up"))
                for _ in range(args.trials):
                    wait_until(lambda: state() == "up")
                    time.sleep(0.5)
                    cloud.kill()
                    out["kill_detect_ms"].append(1e3 * wait_until(lambda: state() != "up"))
                    t_start = time.monotonic()
                    cloud = LocalCloud(bundle.path.parent, bind=bind).start()
                    t_ready = time.monotonic()
                    out["server_start_ms"].append(1e3 * (t_ready - t_start))
                    n0 = len(stream.results)
                    wait_until(lambda: any(w == "cloud" and t > t_ready for t, w in stream.results[n0:]), 30)
                    out["restart_to_cloud_ms"].append(1e3 * (time.monotonic() - t_ready))
            answered = len(stream.results)
            out["requests"] = len(stream.futures)
            out["answered"] = answered
            out["local"] = sum(w == "local" for _, w in stream.results)
            out["counters"] = agent.link_stats().counters
    finally:
        cloud.stop()

    def summary(key):
        v = np.array(out[key])
        return f"median {np.median(v):7.1f} ms, max {v.max():7.1f} ms  ({len(v)} trials)"

    print(f"machine: {out['machine']}")
    print(f"heartbeat {ivl:.0f} ms (loss must be seen within {2 * ivl:.0f} ms)")
    print(f"  blackhole detected        {summary('blackhole_detect_ms')}")
    print(f"  reconnected after restore {summary('reconnect_ms')}")
    print(f"  SIGKILL detected          {summary('kill_detect_ms')}")
    print(f"  new server start -> ready {summary('server_start_ms')}")
    print(f"  ready -> cloud answers    {summary('restart_to_cloud_ms')}")
    print(f"  {out['requests']} requests, {out['answered']} answers ({out['local']} local)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["answered"] == out["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
