"""Pipeline stages: a tail whose weights exceed one worker's memory budget, served across several
worker processes (placement, hop-by-hop routing through the broker, a stage worker killed under load)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from builders import reference, stack_bundle
from test_cloud_support import Edge, ServeProc, answered_once, drive_client, eventually

from cloud_server.placement import fewest_stages, plan_stages
from edgesplit.bundle import Bundle
from edgesplit.runtime import SegmentRunner

HB_MS = 100
WIDTH, LAYERS = 64, 8  # 8 segments of ~16.5 kB of weights; 40 kB holds two of them
BUDGET = "40kB"


# -- placement ------------------------------------------------------------------------------------
def test_plan_stages_balances_the_slowest_stage_within_the_budget():
    sizes = [10] * 8
    assert plan_stages(sizes, [1.0] * 8, 0, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # one slow segment gets a stage of its own; the bottleneck is that segment
    ranges = plan_stages(sizes, [1, 1, 1, 8, 1, 1, 1, 1], 0, 3)
    assert (3, 4) in ranges and ranges[0][0] == 0 and ranges[-1][1] == 8
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    # the budget bounds every stage, even when that unbalances the times
    ranges = plan_stages([30, 30, 5, 5], [1, 1, 10, 10], 40, 2)
    assert ranges is None or all(sum([30, 30, 5, 5][a:b]) <= 40 for a, b in ranges)
    # three stages: the two slow segments apart (bottleneck 11), not together (20)
    assert plan_stages([30, 30, 5, 5], [1, 1, 10, 10], 40, 3) == [(0, 1), (1, 3), (3, 4)]
    assert plan_stages([50, 10], [1, 1], 40, 2) is None  # a segment over the budget: no split
    assert fewest_stages([16, 16, 16, 16, 16], 40) == 3
    assert fewest_stages([50], 40) is None
    assert fewest_stages([50], 0) == 1
    assert plan_stages([1, 1], [1, 1], 0, 5) == [(0, 1), (1, 2)]  # never more stages than segments


# -- a pool of stage workers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    _, full = stack_bundle(root, width=WIDTH, layers=LAYERS)
    return root, full


def _y(edge: Edge, rid: str, bundle_id: str, cut: int, tensors: dict) -> np.ndarray:
    """Ask once; the answer's "y" (it must be a result)."""
    edge.send_infer(rid, bundle_id, cut, tensors, deadline_ms=20_000)
    msg = edge.recv(20_000)
    assert msg is not None and msg.kind == "result", (rid, msg and msg.meta)
    return edge.outputs(msg)["y"]


def _heads(bundle: Bundle, x: np.ndarray) -> dict[int, dict]:
    """The tensors of every cut for input x (what an edge would send at that cut)."""
    with SegmentRunner(bundle, runner="ort-cpu") as r:
        return {k: r.run({"x": x}, 0, k) for k in range(bundle.num_segments)}


def test_a_bundle_over_the_worker_budget_is_served_in_stages_equal_to_the_unsplit_model(repo):
    root, full = repo
    bundle = Bundle.load(root / "stack.bundle")
    assert bundle.weight_bytes() > 3 * 40_000  # no worker can hold it whole
    with ServeProc(root, workers=5, heartbeat_ms=HB_MS, extra=["--worker-memory", BUDGET]) as server:
        # "ready" needs one worker a stage; the replica may still be loading its range
        assert eventually(lambda: all(set(s["ready"]) == set(s["workers"])
                                      for s in server.json("/v1/models")["pipelines"][0]["stages"]), 60)
        models = server.json("/v1/models")
        (placed,) = models["pipelines"]
        stages = placed["stages"]
        assert placed["bundle"] == bundle.id and len(stages) >= 4
        assert [s["segments"][0] for s in stages] == [0] + [s["segments"][1] for s in stages[:-1]]
        assert stages[-1]["segments"][1] == LAYERS
        assert all(s["weight_bytes"] <= 40_000 and s["ready"] for s in stages)
        # no worker holds more weights than its budget, and none holds the bundle whole
        for w in models["workers"]:
            assert w["memory"]["budget"] == 40_000 and 0 < w["memory"]["used"] <= 40_000, w
            assert bundle.id not in w["loaded"] and bundle.id in w["unfit"]
        rng = np.random.default_rng(5)
        edge = Edge(server.address)
        for batch in (1, 3):
            x = rng.standard_normal((batch, WIDTH)).astype(np.float32)
            want = reference(full, x)
            for k, tensors in _heads(bundle, x).items():  # any cut: the request enters at its stage
                np.testing.assert_allclose(_y(edge, f"b{batch}-k{k}", bundle.id, k, tensors), want, rtol=1e-5,
                                           atol=1e-6)
        edge.close()
        # the welcome profile is joined from the stages' own timings
        bundles = {b["id"]: b for b in server.json("/v1/models")["bundles"]}
        prof = bundles[bundle.id]["profile"]
        assert prof is not None and len(prof["segment_ms"]) == LAYERS and None not in prof["segment_ms"]
        text = server.get("/metrics")[1]
        assert "edgesplit_pipeline_stage_workers{" in text
        hops = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("edgesplit_pipeline_hops_total{")]
        assert len(hops) == len(stages) and sum(hops) > 0
        assert server.stop() == 0


@pytest.mark.parametrize("victim_stage", ["unreplicated", "replicated"])
def test_a_stage_worker_killed_under_load_every_request_answered_once_by_the_cloud(repo, victim_stage):
    root, full = repo
    bundle = Bundle.load(root / "stack.bundle")
    rng = np.random.default_rng(7)
    n_clients, per_client = 3, 40
    inputs = [{f"c{c}-{i}": rng.standard_normal((1 + i % 2, WIDTH)).astype(np.float32) for i in range(per_client)}
              for c in range(n_clients)]
    results: dict[str, list] = {}
    with ServeProc(root, workers=5, heartbeat_ms=HB_MS, extra=["--worker-memory", BUDGET]) as server:
        models = server.json("/v1/models")
        stages = models["pipelines"][0]["stages"]
        pid_of = {w["name"]: w["pid"] for w in models["workers"]}
        pick = [s for s in stages if (len(s["workers"]) > 1) == (victim_stage == "replicated")]
        assert pick, stages  # 5 workers, 4 stages: one replicated, three not
        victim_name = pick[0]["workers"][0]
        threads = [threading.Thread(target=drive_client, args=(server.address, bundle.id, 0, "x", inputs[c], results),
                                    kwargs={"window": 3, "deadline_ms": 60_000, "budget_s": 120})
                   for c in range(n_clients)]
        for t in threads:
            t.start()
        assert eventually(lambda: len(results) >= n_clients * per_client // 4, 60)
        os.kill(pid_of[victim_name], signal.SIGKILL)
        for t in threads:
            t.join()
        answered_once(inputs, results, lambda x: reference(full, x), rtol=1e-5, atol=1e-6)
        # the stage has workers again (a replica moved over, or the restarted worker took it)
        assert eventually(lambda: all(s["ready"] for s in server.json("/v1/models")["pipelines"][0]["stages"]), 60)
        lost = [w["name"] for w in server.json("/v1/models")["lost_workers"]]
        assert victim_name in lost
        assert server.stop() == 0


def test_forced_stages_without_a_budget_and_a_bad_size_is_refused(repo, tmp_path):
    root, full = repo
    bundle = Bundle.load(root / "stack.bundle")
    with ServeProc(root, workers=2, heartbeat_ms=HB_MS, extra=["--stages", "2"]) as server:
        (placed,) = server.json("/v1/models")["pipelines"]
        # two stages balanced by the workers' profiles of the segments (they hold the bundle whole)
        (a, b), (c, d) = [s["segments"] for s in placed["stages"]]
        assert a == 0 and b == c and d == LAYERS and 0 < b < LAYERS
        assert sorted(w for s in placed["stages"] for w in s["workers"]) == sorted(
            w["name"] for w in server.json("/v1/models")["workers"])  # one stage per worker
        x = np.random.default_rng(9).standard_normal((2, WIDTH)).astype(np.float32)
        edge = Edge(server.address)
        np.testing.assert_allclose(_y(edge, "f", bundle.id, 0, {"x": x}), reference(full, x), rtol=1e-5, atol=1e-6)
        edge.close()
        assert server.stop() == 0
    bad = subprocess.run([sys.executable, "-m", "cloud_server", "--repository", str(root), "--http", "127.0.0.1:0",
                          "--bind", "tcp://127.0.0.1:0", "--worker-memory", "lots"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--worker-memory must be a size" in bad.stderr


def test_the_agent_is_unchanged_over_a_staged_pool(repo):
    """EdgeAgent against a pool that serves its bundle in stages: same API, the cloud answers, equal
    to the unsplit model, whichever stage the cut enters at."""
    from edge_agent import AgentConfig, EdgeAgent

    root, full = repo
    bundle = Bundle.load(root / "stack.bundle")
    cfg = AgentConfig(heartbeat_interval_ms=100, deadline_ms=20_000, connect_timeout_ms=30_000, profile_runs=1)
    x = np.random.default_rng(11).standard_normal((2, WIDTH)).astype(np.float32)
    with ServeProc(root, workers=4, heartbeat_ms=HB_MS, extra=["--worker-memory", "70kB"]) as server:
        assert len(server.json("/v1/models")["pipelines"][0]["stages"]) == 2  # 4 segments a stage
        for cut in (0, 5):
            with EdgeAgent(bundle, [server.address], cut=cut, codec="raw", config=cfg) as agent:
                res = agent.infer({"x": x})
                assert res.where == "cloud", res
                np.testing.assert_allclose(res.outputs["y"], reference(full, x), rtol=1e-5, atol=1e-6)
        assert server.stop() == 0


def test_stages_asked_of_too_few_workers_serve_whole_and_a_bundle_no_worker_can_hold_says_why(repo):
    root, full = repo
    bundle = Bundle.load(root / "stack.bundle")
    x = np.random.default_rng(12).standard_normal((1, WIDTH)).astype(np.float32)
    # --stages 4 with one worker: no placement, the one worker serves the bundle whole meanwhile
    with ServeProc(root, workers=1, heartbeat_ms=HB_MS, extra=["--stages", "4"]) as server:
        assert server.json("/v1/models")["pipelines"] == []
        edge = Edge(server.address)
        np.testing.assert_allclose(_y(edge, "w", bundle.id, 0, {"x": x}), reference(full, x), rtol=1e-5, atol=1e-6)
        edge.close()
        assert server.stop() == 0
    # every segment (16.5 kB) is over a 10 kB budget: nothing can hold it; the answer says why
    with ServeProc(root, workers=1, heartbeat_ms=HB_MS, extra=["--worker-memory", "10kB"]) as server:
        edge = Edge(server.address)
        edge.send_infer("n", bundle.id, 0, {"x": x}, deadline_ms=500)
        msg = edge.recv(20_000)
        assert msg is not None and msg.kind == "error" and msg.meta["code"] == "deadline", msg and msg.meta
        assert "cannot be placed in pipeline stages" in msg.meta["message"], msg.meta
        w = server.json("/v1/models")["workers"][0]
        assert w["memory"]["used"] == 0 and bundle.id in w["unfit"]  # it never loaded past its budget
        edge.close()
        assert server.stop() == 0
