"""A small run of benchmarks/split_vs_oracle.py end to end (slow: real server, agents, netsim)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import builders

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_split_vs_oracle_runs_on_a_user_model(tmp_path):
    model = builders.save(builders.chain(width=256, depth=6), tmp_path)
    out = tmp_path / "out.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "split_vs_oracle.py"), "--model", str(model), "--rates", "2,50",
         "--rtt-ms", "10", "--requests", "3", "--warmup", "1", "--edge-slowdown", "5", "--trace-rates", "",
         "--work", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 2 and doc["edge_slowdown"] == 5
    for rec in doc["results"]:
        for key in ("model", "rate_mbit", "rtt_ms", "auto_ms", "oracle_ms", "all_edge_ms", "all_cloud_ms"):
            assert key in rec
        # The oracle is the best fixed choice, so no fixed configuration beats it.
        assert rec["oracle_ms"] <= min(rec["all_edge_ms"], rec["all_cloud_ms"])
        assert rec["auto_ms"] > 0
    assert out.with_suffix(".md").read_text().count("| chain |") == 2
    assert out.with_suffix(".png").is_file()
