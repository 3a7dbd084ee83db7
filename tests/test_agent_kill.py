"""The cloud server SIGKILLed in the middle of a stream: every request gets exactly one right answer."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from edge_agent import AgentConfig, EdgeAgent
from test_agent_support import chain_bundle, reference, start_server

# EDGESPLIT_TEST_MINI_SERVER=1 runs the stream against tests/test_agent_support.py's server.
MINI = os.environ.get("EDGESPLIT_TEST_MINI_SERVER") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_server_killed_mid_stream(tmp_path):
    bundle, full = chain_bundle(tmp_path / "repo")
    repo = bundle.path if MINI else tmp_path / "repo"
    address = f"tcp://127.0.0.1:{free_port()}"
    n = 500
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((n, 1, 16)).astype(np.float32)
    refs = reference(full, xs.reshape(n, 16))

    answers = [0] * n
    lock = threading.Lock()

    def counted(i):
        def cb(fut):
            with lock:
                answers[i] += 1
        return cb

    cfg = AgentConfig(heartbeat_interval_ms=100, probe_timeout_ms=200, reconnect_initial_ms=50,
                      reconnect_max_ms=500, deadline_ms=3000, max_in_flight=8, connect_timeout_ms=20000,
                      profile_runs=1)
    proc, _ = start_server(repo, address, use_mini=MINI)
    futures = []
    try:
        with EdgeAgent(bundle, [address], cut=1, codec="fp16", config=cfg) as agent:
            def submit(i):
                f = agent.submit({"x": xs[i]})
                f.add_done_callback(counted(i))
                futures.append(f)

            for i in range(150):          # cloud, several in flight
                submit(i)
                time.sleep(0.002)
            kill_at = len(futures)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            for i in range(150, 300):     # the server is dead
                submit(i)
                time.sleep(0.002)
            down_until = len(futures)
            proc, _ = start_server(repo, address, use_mini=MINI)
            t_ready = time.monotonic()
            first_cloud = None
            for i in range(300, n):       # it is back
                submit(i)
                if first_cloud is None:
                    done = [f.result(timeout=10) for f in futures[-1:]]
                    if done[0].where == "cloud":
                        first_cloud = time.monotonic() - t_ready
                time.sleep(0.01)
            results = [f.result(timeout=30) for f in futures]
            stats = agent.link_stats()
    finally:
        proc.kill()
        proc.wait()

    where = [r.where for r in results]
    print(f"kill after {kill_at} submits, restart after {down_until}; cloud {where.count('cloud')}, "
          f"local {where.count('local')}; first cloud answer {first_cloud:.2f} s after the restart was ready; "
          f"counters {stats.counters}")
    assert answers == [1] * n                                       # exactly one answer each
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.outputs["y"], refs[i:i + 1], rtol=2e-2, atol=2e-2)
    assert all(r.where == "local" for r in results[kill_at:down_until])
    assert any(r.where == "cloud" for r in results[:kill_at])
    assert first_cloud is not None and first_cloud <= 3.0, first_cloud
    assert results[-1].where == "cloud"
    assert stats.counters["cloud"] + stats.counters["local"] == n
    assert stats.counters["link_down"] >= 1
