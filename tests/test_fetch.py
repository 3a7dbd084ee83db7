"""Bundles that travel: a worker with an empty repository fetches a bundle from its broker, by id,
in chunks, hash-checked, written atomically; tampered, truncated and hostile transfers are refused."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from builders import mlp_bundle, mlp_reference, slow_bundle
from test_cloud_support import Edge, ServeProc

from cloud_server import _wire as W
from cloud_server.config import ServerConfig
from cloud_server.fetch import SCRATCH, BundleFetcher, BundleSource, bundle_files
from cloud_server.repository import Repository
from edgesplit.bundle import Bundle, update_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def broker_repo(tmp_path):
    root = tmp_path / "broker"
    mlp_bundle(root / "mlp")
    slow_bundle(root / "slow", width=64, depth=3)
    return root


def _fetch(broker_root, worker_root, bundle_id, cfg=ServerConfig(fetch_chunk_bytes=1000), mangle=None):
    """Run one fetch in-process: the fetcher's messages go to a BundleSource, the answers (through
    `mangle`) back to the fetcher, until it finishes. Returns (jobs put back, error)."""
    source = BundleSource(Repository(broker_root, verify=False), cfg)
    worker_repo = Repository(worker_root)
    outbox, ended = [], []
    fetcher = BundleFetcher(worker_repo, cfg, "w", lambda b, jobs, err: ended.append((jobs, err)))
    assert fetcher.want(bundle_id, "job-1", outbox.append)
    assert fetcher.want(bundle_id, "job-2", outbox.append)        # one fetch for both
    assert len(outbox) == 1
    while outbox and not ended:
        frames = source.answer(W.parse(outbox.pop(0)[0]))
        if mangle is not None:
            frames = mangle(frames)
        if frames is not None:
            fetcher.on_message(W.parse(frames[0]), frames[1:])
    assert len(ended) == 1 and not fetcher.active
    assert not any((worker_root / SCRATCH).glob("*"))              # no scratch left behind
    return ended[0]


def test_fetch_in_chunks_checked_and_installed(broker_repo, tmp_path):
    bundle = Bundle.load(broker_repo / "slow")
    empty = tmp_path / "empty"
    empty.mkdir()
    total = sum(p.stat().st_size for _, p in bundle_files(bundle.path))
    assert total > 5000                                            # several 1000-byte chunks
    jobs, err = _fetch(broker_repo, empty, bundle.id)
    assert err is None and jobs == ["job-1", "job-2"]
    got = Bundle.load(empty / bundle.id, verify=True)
    assert got.id == bundle.id
    repo = Repository(empty)
    repo.scan()
    assert repo.ids() == [bundle.id]


def _flip(frames):
    if len(frames) == 2 and W.parse(frames[0])[2] == 3000:
        data = bytearray(frames[1])
        data[10] ^= 0xFF
        return [frames[0], bytes(data)]
    return frames


def _cut_short(frames):
    if len(frames) == 2 and W.parse(frames[0])[2] == 2000:
        return [frames[0], frames[1][:-7]]
    return frames


def _evil_index(rel):
    def mangle(frames):
        c = W.parse(frames[0])
        if c[2] == -1 and "files" in c[3]:
            files = c[3]["files"]
            files[-1][0] = rel
            return [W.ctl(W.BUNDLE, c[1], -1, {"files": files, "chunk": c[3]["chunk"]})]
        return frames
    return mangle


@pytest.mark.parametrize("mangle, why", [
    (_flip, "content does not match the bundle id"),
    (_cut_short, "truncated chunk"),
    (lambda frames: frames if W.parse(frames[0])[2] != 4000 else None, "out of order"),   # a lost chunk
    (lambda frames: frames if W.parse(frames[0])[2] < 4000 else None, "no data"),   # the rest lost: stalls
    (_evil_index("segments/../../escape.onnx"), "leaves the bundle"),
    (_evil_index("/etc/passwd"), "not manifest.json or under segments/"),
    (_evil_index("other/x.onnx"), "not manifest.json or under segments/"),
])
def test_a_tampered_truncated_or_hostile_transfer_is_refused(broker_repo, tmp_path, mangle, why):
    bundle = Bundle.load(broker_repo / "slow")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = ServerConfig(fetch_chunk_bytes=1000, fetch_timeout_s=0.2)
    if why == "no data":
        # the stalled transfer fails on the timeout; drive it by hand
        source = BundleSource(Repository(broker_repo, verify=False), cfg)
        outbox, ended = [], []
        fetcher = BundleFetcher(Repository(empty), cfg, "w", lambda b, jobs, err: ended.append(err))
        fetcher.want(bundle.id, "job", outbox.append)
        while outbox:
            frames = mangle(source.answer(W.parse(outbox.pop(0)[0])))
            if frames is not None:
                fetcher.on_message(W.parse(frames[0]), frames[1:])
        assert not ended
        time.sleep(0.3)
        fetcher.expire(time.monotonic())
        err = ended[0]
        assert not fetcher.want(bundle.id, "again", outbox.append)  # remembered for rescan_interval_s
    else:
        jobs, err = _fetch(broker_repo, empty, bundle.id, cfg, mangle)
        assert jobs == ["job-1", "job-2"]
    assert err is not None and why in err, err
    assert not (empty / bundle.id).exists()
    assert not (tmp_path / "escape.onnx").exists()
    repo = Repository(empty)
    repo.scan()
    assert repo.ids() == []


def test_the_broker_sends_only_its_own_bundles_and_the_worker_caps_the_size(broker_repo, tmp_path):
    source = BundleSource(Repository(broker_repo, verify=False), ServerConfig())
    reply = W.parse(source.answer(["fetch", "0" * 64, -1])[0])
    assert "not in the broker's repository" in reply[3]["error"]
    assert source.answer(["fetch", 5, -1]) is None                  # malformed: no answer
    bundle = Bundle.load(broker_repo / "slow")
    assert "outside" in W.parse(source.answer(["fetch", bundle.id, 10 ** 12])[0])[3]["error"]
    empty = tmp_path / "empty"
    empty.mkdir()
    jobs, err = _fetch(broker_repo, empty, bundle.id, ServerConfig(fetch_chunk_bytes=1000, fetch_max_bytes=1000))
    assert "fetch_max_bytes" in err
    # not a bundle id, or fetching turned off: not fetched (the request gets unknown_bundle)
    fetcher = BundleFetcher(Repository(empty), ServerConfig(fetch_max_bytes=0), "w", lambda *a: None)
    assert not fetcher.want(bundle.id, "job", lambda f: None)
    fetcher = BundleFetcher(Repository(empty), ServerConfig(), "w", lambda *a: None)
    assert not fetcher.want("../../etc", "job", lambda f: None)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_remote_worker_with_an_empty_repository_fetches_and_serves(broker_repo, tmp_path):
    mlp = Bundle.load(broker_repo / "mlp")
    empty = tmp_path / "worker-repo"
    empty.mkdir()
    back = f"tcp://127.0.0.1:{_port()}"
    with ServeProc(broker_repo, workers=0, heartbeat_ms=250, extra=["--worker-bind", back]) as server:
        worker = subprocess.Popen([sys.executable, "-m", "edgesplit", "worker", "--connect", back,
                                   "--repository", str(empty), "--name", "empty-1", "--heartbeat-ms", "250"],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err: list[str] = []
        threading.Thread(target=lambda: err.extend(worker.stderr), daemon=True).start()
        edge = Edge(server.address)
        try:
            end = time.monotonic() + 30
            while not server.json("/v1/models")["workers"] and time.monotonic() < end:
                time.sleep(0.05)
            assert server.json("/v1/models")["workers"][0]["available"] == []   # holds nothing
            x = np.ones((2, 16), np.float32)
            edge.send_infer("first", mlp.id, 0, {"x": x}, deadline_ms=30_000)
            msg = edge.recv(timeout_ms=30_000)
            assert msg is not None and msg.kind == "result", (msg and msg.meta, err)
            assert msg.meta["worker"] == "empty-1"
            np.testing.assert_allclose(edge.outputs(msg)["y"], mlp_reference(x, mlp.path), rtol=1e-4, atol=1e-4)
            assert Bundle.load(empty / mlp.id, verify=True).id == mlp.id            # it lies there now
            end = time.monotonic() + 10
            while mlp.id not in server.json("/v1/models")["workers"][0]["available"] and time.monotonic() < end:
                time.sleep(0.05)
            assert mlp.id in server.json("/v1/models")["workers"][0]["available"]
            edge.send_infer("second", mlp.id, 1, {"h": np.ones((1, 32), np.float32)}, deadline_ms=30_000)
            assert edge.recv(timeout_ms=30_000).kind == "result"
            # roll-out: version 2 (another id) is added to the broker's repository and served beside
            # version 1; an edge moves over by asking for the new id (the worker fetches it too)
            shutil.copytree(broker_repo / "mlp", broker_repo / "mlp-v2")
            v2 = update_manifest(broker_repo / "mlp-v2", release="2")
            assert v2.id != mlp.id
            # the broker learns of v2 at its next repository rescan: until then v2 is unknown_bundle
            # (an agent re-routes that), so ask again until it is served (a race seen on a quiet box)
            end, tries, v2_msg = time.monotonic() + 60, 0, None
            while time.monotonic() < end:
                tries += 1
                edge.send_infer(f"v2-{tries}", v2.id, 0, {"x": x}, deadline_ms=30_000)
                v2_msg = edge.recv(timeout_ms=30_000)
                if v2_msg is not None and not (v2_msg.kind == "error" and v2_msg.meta.get("code") == "unknown_bundle"):
                    break
                time.sleep(0.2)
            edge.send_infer("v1", mlp.id, 0, {"x": x}, deadline_ms=30_000)
            got = {"v2": v2_msg, "v1": edge.recv(timeout_ms=30_000)}
            assert {k: m.kind for k, m in got.items()} == {"v1": "result", "v2": "result"}, \
                {k: m.meta for k, m in got.items()}
            assert (empty / v2.id).is_dir() and (empty / mlp.id).is_dir()   # both versions, side by side
        finally:
            edge.close()
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
