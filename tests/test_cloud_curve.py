"""CURVE: `edgesplit keys generate` makes the certificates; only allowed clients are served."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import zmq.auth

from test_cloud_support import Edge, ServeProc, mlp_bundle, mlp_reference


def test_keys_generate_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgesplit", "keys", "generate", str(tmp_path / "k"),
                           "--name", "server", "--name", "robot"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pub, sec = zmq.auth.load_certificate(str(tmp_path / "k" / "robot.key_secret"))
    assert len(pub) == 40 and len(sec) == 40
    assert zmq.auth.load_certificate(str(tmp_path / "k" / "robot.key"))[1] is None
    assert (tmp_path / "k" / "robot.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run([sys.executable, "-m", "edgesplit", "keys", "generate", str(tmp_path / "k"),
                            "--name", "robot"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_unknown_client_refused_known_client_served(tmp_path):
    keys, allowed, repo = tmp_path / "keys", tmp_path / "allowed", tmp_path / "repo"
    subprocess.run([sys.executable, "-m", "edgesplit", "keys", "generate", str(keys), "--name", "server",
                    "--name", "robot", "--name", "stranger"], check=True, capture_output=True, timeout=60)
    allowed.mkdir()
    shutil.copy(keys / "robot.key", allowed / "robot.key")
    bundle = mlp_bundle(repo / "mlp")
    server_pub, _ = zmq.auth.load_certificate(str(keys / "server.key"))

    def curve(name):
        pub, sec = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
        return server_pub, pub, sec

    x = np.ones((1, 16), np.float32)
    with ServeProc(repo, workers=1, extra=["--curve-secret", str(keys / "server.key_secret"),
                                           "--allow-clients", str(allowed)]) as server:
        assert "CURVE on" in server.lines[0]
        stranger, plain = Edge(server.address, curve=curve("stranger")), Edge(server.address)
        robot = Edge(server.address, curve=curve("robot"))
        try:
            for i, edge in enumerate((stranger, plain, robot)):
                edge.send_infer(f"r{i}", bundle.id, 0, {"x": x})
            msg = robot.recv(timeout_ms=10_000)
            assert msg is not None and msg.kind == "result" and msg.id == "r2"
            np.testing.assert_allclose(robot.outputs(msg)["y"], mlp_reference(x, bundle.path), rtol=1e-4, atol=1e-4)
            assert stranger.recv(timeout_ms=1000) is None
            assert plain.recv(timeout_ms=200) is None
            assert server.metric("edgesplit_requests_total", 'outcome="ok"') == 1.0
        finally:
            for e in (stranger, plain, robot):
                e.close()


def test_plain_server_warns_when_binding_beyond_loopback(tmp_path):
    mlp_bundle(tmp_path / "repo" / "mlp")
    server = ServeProc(tmp_path / "repo", workers=0)
    server.cmd[server.cmd.index("tcp://127.0.0.1:0")] = "tcp://0.0.0.0:0"
    with server:
        assert any("without CURVE" in line for line in server.err)


def test_remote_workers_need_an_allowed_key(tmp_path):
    keys, allowed, workers_ok, repo = tmp_path / "keys", tmp_path / "allowed", tmp_path / "workers", tmp_path / "repo"
    subprocess.run([sys.executable, "-m", "edgesplit", "keys", "generate", str(keys), "--name", "server",
                    "--name", "robot", "--name", "gpu-box", "--name", "rogue"], check=True, capture_output=True,
                   timeout=60)
    allowed.mkdir()
    workers_ok.mkdir()
    shutil.copy(keys / "robot.key", allowed / "robot.key")
    shutil.copy(keys / "gpu-box.key", workers_ok / "gpu-box.key")
    bundle = mlp_bundle(repo / "mlp")
    server_pub, _ = zmq.auth.load_certificate(str(keys / "server.key"))
    pub, sec = zmq.auth.load_certificate(str(keys / "robot.key_secret"))
    with ServeProc(repo, workers=0, heartbeat_ms=250,
                   extra=["--curve-secret", str(keys / "server.key_secret"), "--allow-clients", str(allowed),
                          "--worker-bind", "tcp://127.0.0.1:0", "--allow-workers", str(workers_ok)]) as server:
        procs = {}
        for name in ("rogue", "robot", "gpu-box"):  # a device key must not admit a worker either
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "edgesplit", "worker", "--connect", server.back, "--repository", str(repo),
                 "--name", name, "--heartbeat-ms", "250", "--curve-server-key", str(keys / "server.key"),
                 "--curve-secret", str(keys / f"{name}.key_secret")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        robot = Edge(server.address, curve=(server_pub, pub, sec))
        try:
            x = np.ones((2, 16), np.float32)
            robot.send_infer("r", bundle.id, 0, {"x": x}, deadline_ms=60_000)
            msg = robot.recv(timeout_ms=60_000)
            assert msg is not None and msg.kind == "result" and msg.meta["worker"] == "gpu-box"
            np.testing.assert_allclose(robot.outputs(msg)["y"], mlp_reference(x, bundle.path), rtol=1e-4, atol=1e-4)
            assert [w["name"] for w in server.json("/v1/models")["workers"]] == ["gpu-box"]
        finally:
            robot.close()
            for p in procs.values():
                p.kill()
                p.wait()
