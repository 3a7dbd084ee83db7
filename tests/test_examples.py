"""Every example runs (briefly) and says what it promises; each is a README + a script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# example folder -> (script, brief arguments, a line the output must contain)
CASES = {
    "robot_camera_loop": ("camera_loop.py", ["--frames", "24", "--outage-at", "0.3", "--outage-for", "0.5"],
                          "24 frames in"),
    "asyncio_app": ("app.py", ["--clients", "2", "--requests", "3"], "6 answers"),
    "curve_deployment": ("secure_deployment.py", ["--requests", "2"], "the known robot was served"),
    "decoder_generation": ("generate.py", ["--tokens", "16"], "equal to the unsplit model: True"),
}


def test_every_example_is_listed_and_documented():
    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == sorted(CASES)
    for name, (script, _, _) in CASES.items():
        assert (EXAMPLES / name / "README.md").is_file()
        assert (EXAMPLES / name / script).is_file()
        assert script in (EXAMPLES / name / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name):
    script, argv, expect = CASES[name]
    done = subprocess.run([sys.executable, str(EXAMPLES / name / script), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert expect in out, out[-3000:]
