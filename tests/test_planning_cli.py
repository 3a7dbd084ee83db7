"""`edgesplit plan` and `edgesplit partition --auto`, run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import builders
from edgesplit.bundle import Bundle
from edgesplit.planning import NodeProfile, Profile
from test_planning_mincut import synthetic_profiles, two_branch_model


def es(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgesplit", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def bundle_and_profiles(tmp_path):
    from edgesplit.graph import partition

    path = builders.save(builders.chain(width=32, depth=4), tmp_path)
    bundle = partition(path, [["h0"], ["h2"]], tmp_path / "bundle")
    # Profiles as two devices would write them: a slow edge and a fast cloud.
    edge = Profile(bundle.id, bundle.name, "test edge", "ort-cpu", 1, 1, [20.0, 20.0, 20.0],
                   [25.0, 25.0, 25.0])
    cloud = Profile(bundle.id, bundle.name, "test cloud", "ort-cuda", 1, None, [1.0, 1.0, 1.0],
                    [1.5, 1.5, 1.5])
    edge.save(tmp_path / "edge.json")
    cloud.save(tmp_path / "cloud.json")
    return bundle, tmp_path / "edge.json", tmp_path / "cloud.json"


def test_plan_prints_the_table_and_the_best_cut(bundle_and_profiles, tmp_path):
    bundle, edge, cloud = bundle_and_profiles
    r = es("plan", bundle.path, "--edge-profile", edge, "--cloud-profile", cloud,
           "--bandwidth", "0.01mbit:1000mbit", "--points", "5", "--rtt", "5ms")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("cut 1" in ln and "cut 2" in ln for ln in lines)
    rows = [ln for ln in lines if ln.split() and ln.split()[0].endswith("bit")]
    assert len(rows) == 5
    assert rows[0].rstrip().endswith("edge")        # 10 kbit/s: stay on the device
    assert rows[-1].rstrip().endswith("cloud")               # 1 Gbit/s: ship the input


def test_plan_json_and_plot(bundle_and_profiles, tmp_path):
    bundle, edge, cloud = bundle_and_profiles
    png = tmp_path / "plan.png"
    r = es("plan", bundle.path, "--edge-profile", edge, "--cloud-profile", cloud, "--bandwidth",
           "1mbit,10mbit,100mbit", "--rtt", "20ms", "--json", "--plot", png)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [row["bandwidth_bps"] for row in doc["rows"]] == [1e6, 10e6, 100e6]
    for row in doc["rows"]:
        lat = row["latency_ms"]
        assert len(lat) == 4 and lat[row["best"]] == min(lat)
        assert lat[3] == pytest.approx(60.0)                  # all-edge: 3 x 20 ms
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_energy_needs_power_and_uses_it(bundle_and_profiles, tmp_path):
    bundle, edge, cloud = bundle_and_profiles
    r = es("plan", bundle.path, "--edge-profile", edge, "--objective", "energy")
    assert r.returncode == 1 and "--power" in r.stderr
    (tmp_path / "p.json").write_text(json.dumps({"busy_w": 5, "idle_w": 0.1, "tx_j_per_byte": 1e-6}))
    r = es("plan", bundle.path, "--edge-profile", edge, "--cloud-profile", cloud, "--power",
           tmp_path / "p.json", "--objective", "energy", "--bandwidth", "10mbit", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    assert row["energy_j"][row["best"]] == min(row["energy_j"])


def test_partition_auto_writes_the_min_cut_bundle(tmp_path):
    model = two_branch_model()
    path = builders.save(model, tmp_path)
    edge_ms, cloud_ms = synthetic_profiles(model)
    for name, ms in (("edge", edge_ms), ("cloud", cloud_ms)):
        NodeProfile("0" * 64, "two_branch", name, "ort-cpu", 1, 1, [n.name for n in model.graph.node],
                    [n.op_type for n in model.graph.node], ms, sum(ms)).save(tmp_path / f"{name}.json")
    r = es("partition", path, "--auto", "--edge-profile", tmp_path / "edge.json", "--cloud-profile",
           tmp_path / "cloud.json", "--bandwidths", "3mbit:30mbit", "--rtt", "1ms", "-o", tmp_path / "auto")
    assert r.returncode == 0, r.stderr
    bundle = Bundle.load(tmp_path / "auto")
    assert set(bundle.cut(1).tensors) == {"a", "b"}
    assert "min-cut" in r.stdout
    bad = es("partition", path, "--auto", "-o", tmp_path / "x")
    assert bad.returncode == 1 and "--edge-profile" in bad.stderr and "Traceback" not in bad.stderr
    seg = es("partition", path, "--auto", "--edge-profile", tmp_path / "edge.json", "--cloud-profile",
             tmp_path / "nope.json", "-o", tmp_path / "x")
    assert seg.returncode == 1 and "Traceback" not in seg.stderr
