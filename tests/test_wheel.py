"""The first hour of a pip user: the wheel alone, in a fresh venv, runs `edgesplit demo` from any directory.

Builds the wheel from a copy of the sources (offline: --no-build-isolation, the test venv has
setuptools and wheel), installs it into a new virtual environment (its dependencies come from the
package index, through pip's cache), and runs `edgesplit --version` and `edgesplit demo` in an
empty temporary directory, with nothing of the checkout importable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a wheel is built from: the distribution's own files (a copy, so the checkout gets no build/).
SOURCES = ("pyproject.toml", "README.md", "edgesplit", "edge_agent", "cloud_server")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("wheelhouse")
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", str(out)], cwd=src, env=dict(os.environ), timeout=300)
    (whl,) = out.glob("edgesplit-*.whl")
    return whl


def test_the_wheel_carries_the_demo_data_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    data = {n for n in names if "/demo_data/" in n}
    assert "edge_agent/demo_data/efficientnet_lite0.onnx" in data
    assert "edge_agent/demo_data/imagenet_classes.txt" in data
    assert "edge_agent/demo_data/README.md" in data and "edge_agent/demo_data/photos/README.md" in data
    assert sum(n.endswith(".jpg") for n in data) == 7
    assert not [n for n in names if n.startswith(("models/", "tests/", "benchmarks/", "examples/"))]
    size_mb = wheel.stat().st_size / 1e6
    print(f"\n{wheel.name}: {size_mb:.1f} MB")
    assert 10 < size_mb < 25, "README.md states the wheel's size: keep them in step"


def test_demo_from_a_fresh_venv_with_only_the_wheel(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
         cwd=tmp_path, env=env, timeout=600)
    work = tmp_path / "anywhere"
    work.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import edge_agent; print(edge_agent.__file__)"],
                 cwd=work, env=env, timeout=60).stdout
    assert str(env_dir) in where and str(REPO) not in where, where

    version = _run([str(bin_dir / "edgesplit"), "--version"], cwd=work, env=env, timeout=60).stdout
    assert "0." in version

    done = _run([str(bin_dir / "edgesplit"), "demo", "--max-photos", "4"], cwd=work, env=env, timeout=300)
    out = done.stdout
    rows = [line for line in out.splitlines() if ".jpg" in line]
    assert any(" cloud " in r for r in rows) and any(" local " in r for r in rows), out
    # real labels: coffee.jpg is the fourth photo by name, the cat the second
    assert any("coffee.jpg" in r and "espresso" in r for r in rows), out
    assert any("chelsea_cat.jpg" in r and "tiger cat" in r for r in rows), out
    assert list(work.iterdir()) == [], "the demo leaves nothing in the working directory"
