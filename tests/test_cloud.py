"""The cloud pool with real processes on loopback: correctness under load, a worker killed mid-load,
dynamic batching, backpressure, deadlines, graceful SIGTERM, admin endpoints, a worker from "another host"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from edgesplit import protocol as P
from test_cloud_support import (Edge, ServeProc, answered_once, drive_client, eventually, mlp_bundle, mlp_reference,
                                slow_bundle, slow_reference)

from cloud_server.config import ServerConfig
from cloud_server.server import MAX_DEFAULT_CPU_WORKERS, Server, parse_devices
from edgesplit.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # any existing directory
HB_MS = 100  # heartbeat of the servers under test: a lost worker is seen within 0.3 s


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    mlp_bundle(root / "mlp")
    slow_bundle(root / "slow", width=128, depth=12)
    return root


def _bundles(repo):
    from edgesplit.bundle import Bundle

    return Bundle.load(repo / "mlp"), Bundle.load(repo / "slow")


def test_many_clients_one_worker_killed_every_request_answered_once(repo):
    mlp, slow = _bundles(repo)
    rng = np.random.default_rng(1)
    n_clients, per_client = 8, 40
    inputs = [{f"c{c}-{i}": rng.standard_normal((1 + i % 3, 128)).astype(np.float32) for i in range(per_client)}
              for c in range(n_clients)]
    results: dict[str, list] = {}
    with ServeProc(repo, workers=2, heartbeat_ms=HB_MS) as server:
        pids = server.worker_pids()
        assert len(pids) == 2
        threads = [threading.Thread(target=drive_client, args=(server.address, slow.id, 1, "h", inputs[c], results))
                   for c in range(n_clients)]
        for t in threads:
            t.start()
        while len(results) < n_clients * per_client // 4:
            time.sleep(0.005)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        for t in threads:
            t.join()
        # every request answered exactly once, with the right numbers
        for msg in answered_once(inputs, results, lambda x: slow_reference(x, slow.path), rtol=1e-4, atol=1e-5):
            assert set(msg.meta["timings"]) == {"queue_ms", "decode_ms", "compute_ms", "encode_ms"}
        # the broker noticed: the worker was dropped, its silence within the detector's ceiling
        # (how fast on a quiet machine is benchmarks/chaos.py's figure, not a wall-clock test)
        while victim in server.worker_pids():
            assert time.monotonic() - killed_at < 30
            time.sleep(0.02)
        lost = {w["pid"]: w for w in server.json("/v1/models")["lost_workers"]}
        assert victim in lost
        assert lost[victim]["silent_ms"] <= ServerConfig().liveness_max_silence_s * 1e3 + HB_MS
        # /metrics no longer lists the dead worker; the redispatches are counted
        text = server.get("/metrics")[1]
        assert f'worker="{lost[victim]["name"]}"' not in text
        assert server.metric("edgesplit_workers_lost_total") >= 1.0
        assert lost[victim]["inflight"] >= 1  # the kill caught requests in flight ...
        assert server.metric("edgesplit_redispatched_total") >= lost[victim]["inflight"]  # ... sent elsewhere
        assert server.metric("edgesplit_requests_total", 'outcome="ok"') == n_clients * per_client
        # the supervisor starts a replacement, under a new name
        while len(server.worker_pids()) < 2:
            assert time.monotonic() - killed_at < 60
            time.sleep(0.05)
        assert victim not in server.worker_pids()
        assert server.stop() == 0


def test_results_batching_deadline_busy_and_admin(repo, tmp_path):
    mlp, slow = _bundles(repo)
    with ServeProc(repo, workers=1, heartbeat_ms=HB_MS,
                   extra=["--max-batch", "8", "--max-queue-delay-ms", "20", "--capacity", "8",
                          "--max-pending", "4",
                          "--max-request-batch", "500000"]) as server:  # "long" sends up to 480000 rows
        edge = Edge(server.address)
        # correct answers for both cuts, any batch size
        rng = np.random.default_rng(2)
        x = rng.standard_normal((3, 16)).astype(np.float32)
        edge.send_infer("full", mlp.id, 0, {"x": x})
        msg = edge.recv()
        assert msg.kind == "result" and msg.id == "full"
        assert msg.meta["batch_wait_ms"] == 0  # a lone client never waits for batch-mates
        np.testing.assert_allclose(edge.outputs(msg)["y"], mlp_reference(x, mlp.path), rtol=1e-4, atol=1e-4)

        # dynamic batching: requests that arrive together run together and are split back right
        xs = {f"b{i}": rng.standard_normal((1 + i % 2, 128)).astype(np.float32) for i in range(6)}
        blocker = rng.standard_normal((3000, 128)).astype(np.float32)  # the others queue behind it
        edge.send_infer("blocker", slow.id, 1, {"h": blocker})
        for rid, xi in xs.items():
            edge.send_infer(rid, slow.id, 1, {"h": xi})
        got = {m.id: m for m in (edge.recv() for _ in range(len(xs) + 1))}
        assert got.pop("blocker").kind == "result"
        assert set(got) == set(xs)
        for rid, xi in xs.items():
            assert got[rid].kind == "result"
            np.testing.assert_allclose(edge.outputs(got[rid])["y"], slow_reference(xi, slow.path),
                                       rtol=1e-4, atol=1e-5)
        assert max(m.meta["batch"] for m in got.values()) > 1

        # backpressure: capacity 8 + 4 pending, then an immediate "busy" with a retry hint
        # (behind a long request, so a fast box cannot drain the queue as fast as it fills)
        big = rng.standard_normal((8, 128)).astype(np.float32)
        edge.send_infer("hold", slow.id, 1, {"h": rng.standard_normal((20000, 128)).astype(np.float32)})
        for i in range(40):
            edge.send_infer(f"p{i}", slow.id, 1, {"h": big})
        replies = [edge.recv() for _ in range(41)]
        assert all(r is not None for r in replies)
        assert sorted(r.id for r in replies) == sorted([f"p{i}" for i in range(40)] + ["hold"])
        replies = [r for r in replies if r.id != "hold"]
        busy = [r for r in replies if r.kind == "error" and r.meta["code"] == "busy"]
        assert busy and all(r.meta["retry_after_ms"] > 0 for r in busy)
        assert any(r.kind == "result" for r in replies)

        # deadlines: a request whose budget is spent is answered "deadline", not computed
        edge.send_infer("late", slow.id, 1, {"h": big}, deadline_ms=0)
        huge = rng.standard_normal((20000, 128)).astype(np.float32)  # ~100 ms or more: the others wait
        edge.send_infer("huge", slow.id, 1, {"h": huge})
        for i in range(3):
            edge.send_infer(f"q{i}", slow.id, 1, {"h": big}, deadline_ms=2)
        replies = [edge.recv() for _ in range(5)]
        codes = {r.id: (r.meta.get("code") if r.kind == "error" else "ok") for r in replies}
        assert codes == {"late": "deadline", "huge": "ok", "q0": "deadline", "q1": "deadline", "q2": "deadline"}

        # a batch longer than 3 heartbeats: the worker stays up (its heartbeat thread speaks) and
        # does not reconnect afterwards (its identity, seen as "joined", is unchanged)
        joined = server.json("/v1/models")["workers"][0]["joined"]
        rows = 120_000
        for attempt in range(3):  # a fast or idle box computes it sooner: make it longer
            long = rng.standard_normal((rows, 128)).astype(np.float32)
            edge.send_infer(f"long{attempt}", slow.id, 1, {"h": long})
            msg = edge.recv(timeout_ms=60_000)
            assert msg.kind == "result", msg.meta
            if msg.meta["timings"]["compute_ms"] > 3 * HB_MS:
                break
            rows *= 2
        assert msg.meta["timings"]["compute_ms"] > 3 * HB_MS, msg.meta
        del long
        time.sleep(4 * HB_MS / 1e3)
        assert server.json("/v1/models")["workers"][0]["joined"] == joined
        assert server.json("/v1/models")["lost_workers"] == []

        # unknown bundle, bad cut, wrong tensor, duplicate ids: errors, never crashes
        edge.send_infer("u", "f" * 64, 1, {"h": big})
        edge.send_infer("bc", slow.id, 2, {"y": big})
        edge.send_infer("wt", slow.id, 1, {"h": big.astype(np.float64)})
        edge.send_infer("ws", slow.id, 1, {"h": big[:, :5]})
        got = {m.id: m for m in (edge.recv() for _ in range(4))}
        assert {k: m.meta["code"] for k, m in got.items()} == {
            "u": "unknown_bundle", "bc": "bad_cut", "wt": "bad_request", "ws": "bad_request"}

        # ping / hello answered by the broker itself
        P.send(edge.sock, P.ping("p1"))
        pong = edge.recv()
        assert pong.kind == "pong" and pong.meta["load"]["workers"] == 1
        P.send(edge.sock, P.hello("h1", bundle=slow.id))
        welcome = edge.recv()
        assert welcome.kind == "welcome" and welcome.meta["held"] is True
        assert len(welcome.meta["profile"]["segment_ms"]) == slow.num_segments
        P.send(edge.sock, P.hello("h2", bundle="0" * 64))
        assert edge.recv().meta["held"] is False

        # admin endpoints
        assert server.get("/healthz")[0] == 200
        assert server.get("/readyz")[0] == 200
        models = server.json("/v1/models")
        by_name = {b["name"]: b for b in models["bundles"]}
        assert set(by_name) == {"mlp", "slow"}
        assert [c["index"] for c in by_name["mlp"]["cuts"]] == [0, 1, 2]
        assert by_name["slow"]["loaded_on"] == [models["workers"][0]["name"]]
        assert server.metric("edgesplit_live_workers") == 1.0
        assert server.metric("edgesplit_requests_total", 'outcome="busy"') == len(busy)
        assert server.metric("edgesplit_requests_total", 'outcome="deadline"') >= 2
        assert server.metric("edgesplit_batch_size_count") >= 1
        assert server.metric("edgesplit_bytes_in_total") > 40 * big.nbytes
        for stage in ("queue", "decode", "compute", "encode"):
            assert server.metric("edgesplit_stage_seconds_count", f'stage="{stage}"') > 0
        edge.close()


def test_sigterm_finishes_requests_in_flight_and_exits_0(repo):
    mlp, slow = _bundles(repo)
    rng = np.random.default_rng(3)
    with ServeProc(repo, workers=1, heartbeat_ms=HB_MS, extra=["--max-batch", "1"]) as server:
        edge = Edge(server.address)
        xs = {f"s{i}": rng.standard_normal((256, 128)).astype(np.float32) for i in range(16)}
        for rid, x in xs.items():
            edge.send_infer(rid, slow.id, 1, {"h": x})
        replies = {}
        first = edge.recv()  # the server is computing: now ask it to stop
        replies[first.id] = [first]
        server.proc.send_signal(signal.SIGTERM)
        edge.send_infer("after", slow.id, 1, {"h": xs["s0"]})
        after_signal = 0
        while not set(xs).union(["after"]) <= set(replies):
            msg = edge.recv(timeout_ms=5000)
            if msg is None:
                break
            replies.setdefault(msg.id, []).append(msg)
            after_signal += msg.kind == "result"
        rc = server.proc.wait(30)
        assert rc == 0, server.err[-20:]
        for rid, x in xs.items():
            if rid in replies and replies[rid][0].kind == "error":
                assert replies[rid][0].meta["code"] == "shutdown"  # arrived after the signal
                continue
            assert len(replies.get(rid, [])) == 1, rid
            np.testing.assert_allclose(edge.outputs(replies[rid][0])["y"], slow_reference(x, slow.path),
                                       rtol=1e-4, atol=1e-5)
        assert after_signal >= 1  # requests in flight at the signal were finished, not dropped
        assert all(len(r) == 1 for r in replies.values())
        if "after" in replies and replies["after"][0].kind == "error":  # else it beat the signal handler
            assert replies["after"][0].meta["code"] == "shutdown"
        edge.close()


def test_worker_from_another_host_joins_and_readiness_follows(repo, tmp_path):
    mlp, slow = _bundles(repo)
    with ServeProc(repo, workers=0, heartbeat_ms=250) as server:
        assert server.get("/healthz")[0] == 200
        assert server.get("/readyz")[0] == 503  # no worker holds anything yet
        edge = Edge(server.address)
        x = np.ones((1, 16), np.float32)
        edge.send_infer("waits", mlp.id, 0, {"x": x}, deadline_ms=30_000)  # waits for a worker
        worker = subprocess.Popen([sys.executable, "-m", "edgesplit", "worker", "--connect", server.back,
                                   "--repository", str(repo), "--name", "remote-1", "--heartbeat-ms", "250"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            msg = edge.recv(timeout_ms=30_000)
            assert msg is not None and msg.kind == "result", msg and msg.meta
            assert msg.meta["worker"] == "remote-1"
            np.testing.assert_allclose(edge.outputs(msg)["y"], mlp_reference(x, mlp.path), rtol=1e-4, atol=1e-4)
            assert eventually(lambda: server.get("/readyz")[0] == 200)
            # a worker stopped with SIGTERM drains and says goodbye: gone at once, not "lost"
            t_signal = time.time()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
            while server.json("/v1/models")["workers"]:
                time.sleep(0.02)
            assert not [w for w in server.json("/v1/models")["lost_workers"] if w["at"] >= t_signal]
            assert eventually(lambda: server.get("/readyz")[0] == 503)
        finally:
            if worker.poll() is None:
                worker.kill()
            edge.close()


def test_thread_workers_serve_and_stop_gracefully(repo):
    mlp, slow = _bundles(repo)
    rng = np.random.default_rng(4)
    with ServeProc(repo, workers=2, heartbeat_ms=HB_MS, extra=["--worker-mode", "thread"]) as server:
        assert {w["name"] for w in server.json("/v1/models")["workers"]} == {"thread-0-cpu", "thread-1-cpu"}
        edge = Edge(server.address)
        xs = {f"t{i}": rng.standard_normal((1 + i % 4, 128)).astype(np.float32) for i in range(24)}
        for rid, x in xs.items():
            edge.send_infer(rid, slow.id, 1, {"h": x})
        got = {}
        while len(got) < len(xs):
            msg = edge.recv()
            assert msg is not None and msg.kind == "result" and msg.id not in got
            got[msg.id] = msg
        for rid, x in xs.items():
            np.testing.assert_allclose(edge.outputs(got[rid])["y"], slow_reference(x, slow.path), rtol=1e-4, atol=1e-5)
        assert edge.recv(timeout_ms=200) is None  # nothing twice
        edge.close()
        assert server.stop() == 0


def test_inline_worker_batches_answers_once_and_stops_gracefully(repo):
    mlp, slow = _bundles(repo)
    rng = np.random.default_rng(5)
    with ServeProc(repo, workers=1, heartbeat_ms=HB_MS,
                   extra=["--worker-mode", "inline", "--max-batch", "8"]) as server:
        models = server.json("/v1/models")
        assert [w["name"] for w in models["workers"]] == ["inline-0-cpu"]
        assert models["workers"][0]["pid"] == server.proc.pid  # the broker's own process
        assert eventually(lambda: server.get("/readyz")[0] == 200)
        edge = Edge(server.address)
        # everything sent at once: what the broker reads in one wake-up runs as batches
        xs = {f"i{i}": rng.standard_normal((1, 16)).astype(np.float32) for i in range(40)}
        for rid, x in xs.items():
            edge.send_infer(rid, mlp.id, 0, {"x": x})
        edge.send_infer("bad", mlp.id, 0, {"x": rng.standard_normal((1, 15)).astype(np.float32)})
        edge.send_infer("late", mlp.id, 0, {"x": xs["i0"]}, deadline_ms=-1)
        got = {}
        while len(got) < len(xs) + 2:
            msg = edge.recv()
            assert msg is not None and msg.id not in got
            got[msg.id] = msg
        assert got["bad"].kind == "error" and got["bad"].meta["code"] == "bad_request"
        assert got["late"].kind == "error" and got["late"].meta["code"] == "deadline"
        for rid, x in xs.items():
            assert got[rid].kind == "result" and got[rid].meta["worker"] == "inline-0-cpu", got[rid].meta
            np.testing.assert_allclose(edge.outputs(got[rid])["y"], mlp_reference(x, mlp.path), rtol=1e-4, atol=1e-5)
        assert max(got[rid].meta["batch"] for rid in xs) > 1
        assert edge.recv(timeout_ms=300) is None  # nothing twice
        # the inline worker heartbeats like any other: still there after many heartbeat intervals
        time.sleep(6 * HB_MS / 1e3)
        assert [w["name"] for w in server.json("/v1/models")["workers"]] == ["inline-0-cpu"]
        assert server.metric("edgesplit_requests_total", 'outcome="ok"') == len(xs)
        assert server.metric("edgesplit_workers_lost_total") == 0
        edge.close()
        t = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - t < 10


def test_config_is_validated():
    assert ServerConfig().heartbeat_expiry_s == pytest.approx(1.5)
    for bad in ({"heartbeat_interval_s": 0}, {"max_batch": 0}, {"max_batch": 2.5}, {"max_pending": -1},
                {"heartbeat_liveness": True}, {"intra_op_threads": 0}, {"reconnect_max_s": 0.01},
                {"max_queue_delay_ms": float("nan")}):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)
    cfg = ServerConfig(max_batch=4)
    assert ServerConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError):
        ServerConfig.from_json({"nope": 1})
    with pytest.raises(ConfigError):
        Server(REPO_ROOT, http=None, devices=["cpu", "cpu"], worker_mode="inline")
    with pytest.raises(ConfigError):
        Server(REPO_ROOT, http=None, worker_mode="inline", worker_bind="tcp://127.0.0.1:0")
    assert parse_devices("cpu", 3) == ["cpu"] * 3
    # by default one worker per core (each with one ONNX Runtime thread), capped
    assert parse_devices("cpu", None, cores=2) == ["cpu"] * 2
    assert parse_devices("cpu", None, cores=64) == ["cpu"] * MAX_DEFAULT_CPU_WORKERS
    assert parse_devices("cuda:0,cuda:1", None) == ["cuda:0", "cuda:1"]
    with pytest.raises(ConfigError):
        parse_devices("gpu0", None)


def test_cli_errors_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cloud_server", "--repository", str(tmp_path / "nope"),
                           "--http", "off"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "not a directory" in done.stderr and "Traceback" not in done.stderr


def test_library_api_and_byte_bound(repo):
    """Broker and TailWorker as a library (a worker thread over inproc); held bytes are bounded."""
    from cloud_server import Broker, TailWorker

    mlp, slow = _bundles(repo)
    cfg = ServerConfig(heartbeat_interval_s=0.1, max_held_bytes=12 << 20, profile_on_load=False,
                       max_request_batch=20_000)  # the blocker is one request of 20000 samples
    with Broker(cfg, "tcp://127.0.0.1:0", repository=repo, context=zmq.Context()) as broker:
        worker = TailWorker(broker.add_inproc_endpoint(), repo, cfg, name="lib-worker", context=broker.ctx)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        assert broker.wait_for_workers(1, 30)
        edge = Edge(broker.front_address)
        rng = np.random.default_rng(5)
        edge.send_infer("blocker", slow.id, 1, {"h": rng.standard_normal((20_000, 128)).astype(np.float32)})
        edge.send_infer("big", slow.id, 1, {"h": rng.standard_normal((8_000, 128)).astype(np.float32)})
        got = {m.id: m for m in (edge.recv(timeout_ms=60_000) for _ in range(2))}
        assert got["blocker"].kind == "result"
        assert got["big"].kind == "error" and got["big"].meta["code"] == "busy"
        assert got["big"].meta["retry_after_ms"] > 0
        x = rng.standard_normal((2, 128)).astype(np.float32)
        edge.send_infer("small", slow.id, 1, {"h": x})
        msg = edge.recv()
        np.testing.assert_allclose(edge.outputs(msg)["y"], slow_reference(x, slow.path), rtol=1e-4, atol=1e-5)
        assert eventually(lambda: broker.snapshot()["load"]["inflight"] == 0)
        edge.close()
        broker.shutdown()
        assert broker.join(30)
        thread.join(10)
        assert not thread.is_alive()


def test_worker_reconnects_to_a_restarted_broker(repo):
    """Paranoid Pirate, worker side: the broker goes away and comes back; the worker finds it again."""
    from cloud_server import Broker

    mlp, slow = _bundles(repo)
    cfg = ServerConfig(heartbeat_interval_s=0.1, reconnect_initial_s=0.05, reconnect_max_s=0.2)
    port = _free_port()
    back = f"tcp://127.0.0.1:{port}"
    worker = subprocess.Popen([sys.executable, "-m", "edgesplit", "worker", "--connect", back, "--repository",
                               str(repo), "--name", "pirate", "--heartbeat-ms", "100", "--config-json",
                               '{"reconnect_initial_s": 0.05, "reconnect_max_s": 0.2}'],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for attempt in range(2):  # the first broker, then its replacement on the same address
            ctx = zmq.Context()
            with Broker(cfg, "tcp://127.0.0.1:0", back=back, repository=repo, context=ctx) as broker:
                assert broker.wait_for_workers(1, 60), attempt
                edge = Edge(broker.front_address, ctx=ctx)
                x = np.full((1, 16), attempt + 1.0, np.float32)
                edge.send_infer(f"a{attempt}", mlp.id, 0, {"x": x}, deadline_ms=30_000)
                msg = edge.recv(timeout_ms=30_000)
                assert msg is not None and msg.kind == "result" and msg.meta["worker"] == "pirate"
                np.testing.assert_allclose(edge.outputs(msg)["y"], mlp_reference(x, mlp.path), rtol=1e-4, atol=1e-4)
                edge.close()
                if attempt == 0:
                    broker.abort()  # vanish without telling the worker anything (as in a crash)
            ctx.term()
        assert worker.poll() is None  # it kept trying, it did not give up
    finally:
        worker.terminate()
        assert worker.wait(30) == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
def test_gpu_worker_uses_a_gpu_runner(repo):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    mlp, slow = _bundles(repo)
    with ServeProc(repo, workers=None, extra=["--device", "cuda:0"]) as server:
        workers = server.json("/v1/models")["workers"]
        assert [w["device"] for w in workers] == ["cuda:0"]
        assert workers[0]["runner"] in ("trt", "ort-trt", "ort-cuda")
        edge = Edge(server.address)
        x = np.random.default_rng(6).standard_normal((4, 128)).astype(np.float32)
        edge.send_infer("g", slow.id, 1, {"h": x})
        msg = edge.recv(timeout_ms=60_000)
        assert msg.kind == "result"
        np.testing.assert_allclose(edge.outputs(msg)["y"], slow_reference(x, slow.path), rtol=1e-3, atol=1e-3)
        profile = next(b for b in server.json("/v1/models")["bundles"] if b["id"] == slow.id)["profile"]
        assert profile["device"] == "cuda:0"
        edge.close()


def test_default_admin_port_taken_falls_back_explicit_one_fails(repo):
    import socket

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8080))
        holder.listen()
    except OSError:
        pass  # someone else holds 8080: the same situation
    try:
        server = ServeProc(repo, workers=0)
        server.cmd.remove("--http")
        server.cmd.remove("127.0.0.1:0")
        with server:
            assert server.http and not server.http.endswith(":8080")
            assert server.get("/healthz")[0] == 200
            # stderr is read by a thread of the helper: wait for the line rather than race it
            assert eventually(lambda: any("free port" in line for line in server.err), 30), server.err
        done = subprocess.run([sys.executable, "-m", "cloud_server", "--repository", str(repo), "--bind",
                               "tcp://127.0.0.1:0", "--workers", "0", "--http", "127.0.0.1:8080"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "8080" in done.stderr and "Traceback" not in done.stderr
    finally:
        holder.close()


def test_ready_file_names_the_addresses_and_goes_with_the_server(tmp_path):
    import json

    mlp_bundle(tmp_path / "repo" / "mlp")
    ready = tmp_path / "ready.json"
    with ServeProc(tmp_path / "repo", workers=1, extra=["--ready-file", str(ready)]) as server:
        info = json.loads(ready.read_text())
        assert info == {"front": server.address, "workers": server.back, "http": server.http,
                        "pid": server.proc.pid}
    assert not ready.exists()


def test_tail_worker_step_api_without_a_socket(tmp_path):
    """A TailWorker driven from outside: attach, accept, step, heartbeat (what the inline mode uses)."""
    from cloud_server import TailWorker
    from cloud_server import _wire as W
    from edgesplit.codecs import decode, get_codec

    bundle = mlp_bundle(tmp_path / "repo" / "mlp")
    worker = TailWorker("inline://", tmp_path / "repo", ServerConfig(intra_op_threads=1, profile_on_load=False),
                        name="stepped")
    said: list[list] = []
    worker.attach(said.append)
    ready = W.parse(said[0][0])
    assert ready[0] == W.READY and ready[1]["name"] == "stepped" and ready[1]["loaded"] == []
    while worker.step():  # the preload
        pass
    assert not worker.pending and worker.status()["loaded"] == [bundle.id]
    x = np.ones((2, 16), np.float32)
    req = P.encode(P.infer("r1", bundle.id, 0, {"x": get_codec("raw").encode(x)}, deadline_ms=10_000.0))
    now = time.monotonic()
    worker.accept([W.ctl(W.REQUEST, b"k1", now + 10.0, now, now), *req])
    assert worker.pending and worker.step() and not worker.step()
    ctl, *frames = said[-1]
    assert W.parse(ctl)[:2] == [W.REPLY, b"k1"]
    np.testing.assert_allclose(decode(P.decode(frames).tensors["y"]), mlp_reference(x, bundle.path),
                               rtol=1e-4, atol=1e-4)
    assert worker.heartbeat(time.monotonic(), every_s=0.0)
    assert W.parse(said[-1][0])[0] == W.HEARTBEAT
    worker.stop()
    assert not worker.heartbeat(time.monotonic()) and W.parse(said[-1][0]) == [W.BYE]
    worker.close()
