"""More than one machine: a worker serving two brokers, one broker SIGKILLed and restarted under load,
then the other stopped gracefully (SIGTERM) under load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest

from builders import chain_bundle, reference
from test_cloud_support import ServeProc, eventually

from cloud_server.multi import split_capacity
from edge_agent import AgentConfig, EdgeAgent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _capacity(broker) -> int | None:
    """The first worker's capacity grant as this broker sees it, None while it has none (a broker
    that just started, or a worker between reconnects: read the list once, it may change)."""
    try:
        workers = broker.workers()
    except OSError:  # its admin port is not answering yet (a broker that is starting again)
        return None
    return workers[0]["capacity"] if workers else None


_eventually = partial(eventually, timeout=30.0)


def test_capacity_split_never_promises_a_slot_twice():
    assert split_capacity(8, [0, 0], [True, True]) == [4, 4]
    assert split_capacity(8, [0, 0], [True, False]) == [8, 0]       # alone: all of it
    assert split_capacity(7, [0, 0, 0], [True, True, True]) == [3, 2, 2]
    # B just came back while A still holds 7 from when it was alone: B gets only what is free
    assert split_capacity(8, [7, 0], [True, True]) == [4, 1]
    assert split_capacity(8, [3, 0], [True, True]) == [4, 4]
    for held in ([0, 0], [2, 5], [4, 4], [8, 0], [0, 8]):
        g = split_capacity(8, held, [True, True])
        assert sum(g) <= 8 or min(g) == 1
    assert split_capacity(1, [0, 0], [True, True]) == [1, 1]        # at least one slot each


class _Broker:
    """A `python -m cloud_server --workers 0` on fixed ports (so that it can be restarted on them)."""

    def __init__(self, repo):
        self.repo = repo
        self.front = f"tcp://127.0.0.1:{free_port()}"
        self.back = f"tcp://127.0.0.1:{free_port()}"
        self.proc: ServeProc | None = None

    def start(self) -> "_Broker":
        self.proc = ServeProc(self.repo, workers=0, heartbeat_ms=100,
                              extra=["--bind", self.front, "--worker-bind", self.back]).start()
        return self

    def workers(self) -> list[dict]:
        return self.proc.json("/v1/models")["workers"]

    def kill(self) -> None:
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.mark.slow
def test_two_brokers_one_worker_broker_killed_and_restarted(tmp_path):
    bundle, full = chain_bundle(tmp_path / "repo")
    repo = tmp_path / "repo"
    a, b = _Broker(repo).start(), _Broker(repo).start()
    worker = subprocess.Popen([sys.executable, "-m", "edgesplit", "worker", "--connect", a.back, "--connect", b.back,
                               "--repository", str(repo), "--name", "both", "--heartbeat-ms", "100",
                               "--capacity", "8"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(worker.stdout), daemon=True).start()
    n, n_killed = 800, 600
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((n, 1, 16)).astype(np.float32)
    refs = reference(full, xs.reshape(n, 16))
    answers = [0] * n
    lock = threading.Lock()
    try:
        # the one worker process is a worker of both brokers, each told half of its 8 slots
        assert _eventually(lambda: a.workers() and b.workers()), out
        assert a.workers()[0]["name"] == b.workers()[0]["name"] == "both"
        assert _eventually(lambda: _capacity(a) == _capacity(b) == 4), \
            (a.workers(), b.workers())
        cfg = AgentConfig(heartbeat_interval_ms=100, probe_timeout_ms=300, reconnect_initial_ms=50,
                          reconnect_max_ms=500, deadline_ms=5000, max_in_flight=8, connect_timeout_ms=30000,
                          profile_runs=1)
        futures = []
        with EdgeAgent(bundle, [a.front, b.front], cut=1, codec="fp16", config=cfg) as agent:
            def submit(i):
                f = agent.submit({"x": xs[i]})

                def counted(_):
                    with lock:
                        answers[i] += 1
                f.add_done_callback(counted)
                futures.append(f)

            for i in range(200):
                submit(i)
                time.sleep(0.003)
            kill_at = len(futures)
            # SIGKILL, under load, the broker the agent has been using most ("A" from here on)
            used = [f.result(timeout=30).server for f in futures[:150]]
            if used.count(b.front) > used.count(a.front):
                a, b = b, a
            a.kill()
            for i in range(200, 400):
                submit(i)
                time.sleep(0.003)
            # the worker noticed: all 8 slots go to B
            assert _eventually(lambda: _capacity(b) == 8), b.workers()
            restart_at = len(futures)
            a.start()                                 # A is back on the same ports
            assert _eventually(lambda: _capacity(a) == 4), out
            for i in range(400, n_killed):
                submit(i)
                time.sleep(0.005)
            results = [f.result(timeout=60) for f in futures]
            back_on_a = _eventually(lambda: any(r.server == a.front for r in
                                                [agent.infer({"x": xs[0]}) for _ in range(20)]), timeout=30)
            # B stopped gracefully under load: it drains, says goodbye to the worker, which serves A alone
            stop_at = len(futures)
            stopper = threading.Thread(target=b.stop)
            for i in range(n_killed, n):
                submit(i)
                if i == n_killed + 50:
                    stopper.start()
                time.sleep(0.005)
            stopper.join(60)
            results = [f.result(timeout=60) for f in futures]
            assert _eventually(lambda: _capacity(a) == 8), a.workers()
        assert _eventually(lambda: sum(answers) == n, timeout=10)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        a.stop()
        b.stop()

    where = [r.where for r in results]
    servers = [r.server for r in results]
    print(f"kill at {kill_at}, restart at {restart_at}; cloud {where.count('cloud')} local {where.count('local')}; "
          f"after the kill via A {servers[kill_at:].count(a.front)}, via B {servers[kill_at:].count(b.front)}")
    assert answers == [1] * n                                     # exactly once
    for i, r in enumerate(results):                               # correct
        np.testing.assert_allclose(r.outputs["y"], refs[i:i + 1], rtol=2e-2, atol=2e-2)
    assert all(w == "cloud" for w in where[kill_at:]), [(i, r.reason) for i, r in enumerate(results)
                                                         if r.where != "cloud"]
    assert all(s == b.front for s in servers[kill_at:restart_at])  # only B while A was dead
    assert a.front in servers[:kill_at]                           # A was in use when it died
    assert back_on_a                                              # A used again after its restart
    assert all(s == a.front for s in servers[stop_at + 100:])      # B gone: A alone answers
