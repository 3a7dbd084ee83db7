"""`edgesplit run`: outputs, top-5 labels for an image, timings; user errors exit 1 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgesplit.cli import main
from test_agent_support import RealCloud, chain_bundle, reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return chain_bundle(tmp_path_factory.mktemp("cli"))


def test_run_npy_through_a_server(chain, tmp_path, capsys):
    bundle, full = chain
    x = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with RealCloud(bundle.path.parent) as srv:
        rc = main(["run", str(bundle.path), "--server", srv.address, "--input", str(tmp_path / "x.npy"),
                   "--repeat", "3", "--cut", "1", "--codec", "raw"])
        answered = srv.answered("ok")
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("cloud") >= 3 and "median of 3" in out
    first = reference(full, x)[0, 0]
    assert f"{first:.4f}"[:5] in out  # the printed outputs are the model's
    assert answered == 3  # the real server computed all three


def test_run_npz_locally_without_a_server(chain, tmp_path, capsys):
    bundle, _ = chain
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 16), np.float32))
    rc = main(["run", str(bundle.path), "--input", str(tmp_path / "x.npz"), "--connect-timeout-ms", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "local" in out and "y: float32[2, 8]" in out


@pytest.mark.parametrize("argv,needle", [
    (["--input", "missing.npy"], "no such input file"),
    (["--input", "pyproject.toml"], "unsupported input type"),
    (["--input", "x.npy", "--cut", "x"], "--cut must be an integer"),
    (["--input", "x.npy", "--cut", "7"], "cut must be 'auto' or an integer"),
])
def test_run_user_errors_exit_1_with_one_line(chain, tmp_path, argv, needle):
    bundle, _ = chain
    np.save(tmp_path / "x.npy", np.zeros((1, 16), np.float32))
    argv = [a if a != "x.npy" else str(tmp_path / "x.npy") for a in argv]
    done = subprocess.run([sys.executable, "-m", "edgesplit", "run", str(bundle.path), "--connect-timeout-ms", "0",
                           *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_run_image_prints_top5_labels(tmp_path, capsys):
    from edge_agent.local_cloud import demo_bundle

    bundle = demo_bundle(tmp_path / "eff", cuts=(17,))
    rc = main(["run", str(bundle.path), "--input", str(REPO / "edge_agent" / "demo_data" / "photos" / "coffee.jpg"),
               "--connect-timeout-ms", "0", "--cut", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(s for s in out.splitlines() if s.startswith("logits[0]:"))
    assert line.split(":", 1)[1].strip().startswith("espresso")
    assert line.count(",") == 4  # five labels
