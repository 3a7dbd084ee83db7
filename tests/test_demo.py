"""`edgesplit demo`: cloud answers, local answers while the link is cut, cloud again; no process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(d.name))
    return pids


def test_demo_help_needs_no_heavy_import():
    done = subprocess.run([sys.executable, "-m", "edgesplit", "demo", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0 and "--max-photos" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks leftover processes through /proc")
def test_demo_runs_and_leaves_nothing_behind():
    done = subprocess.run([sys.executable, "-m", "edgesplit", "demo", "--max-photos", "3"], capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    phase = {k: out.split(k, 1)[1] for k in ("3. classifying", "4. cutting", "5. restoring")}
    cloud_rows = [line for line in phase["3. classifying"].split("4. cutting")[0].splitlines() if ".jpg" in line]
    cut_rows = [line for line in phase["4. cutting"].split("5. restoring")[0].splitlines() if ".jpg" in line]
    back_rows = [line for line in phase["5. restoring"].splitlines() if ".jpg" in line]
    assert len(cloud_rows) == len(cut_rows) == len(back_rows) == 3
    assert all(" cloud " in r for r in cloud_rows)
    assert all(" local " in r for r in cut_rows)
    assert " cloud " in back_rows[-1]
    assert "tiger cat" in out  # chelsea_cat.jpg is among the first three photos, sorted by name
    assert processes_mentioning("edgesplit-demo-") == []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks leftover processes through /proc")
def test_demo_stops_its_server_when_terminated():
    proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "classifying the photos" in line:
                break
        assert any("server tcp://" in s for s in seen), "".join(seen)
        assert processes_mentioning("edgesplit-demo-"), "the server should be running now"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while processes_mentioning("edgesplit-demo-") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning("edgesplit-demo-") == []


@pytest.mark.parametrize("argv, says", [
    (["--photos", "/no/such/folder"], "no such folder of photos"),
    (["--photos", str(REPO / "models" / "zoo" / "external")], "no photos to classify"),
    (["--model", "/no/such/model.onnx"], "no such model"),
    (["--model", str(REPO / "models" / "zoo" / "lstm.onnx")], "needs one NCHW image input with 3 channels"),
    (["--cut", "7"], "--cut must be 1, 2, 3 or auto"),
    (["--delay", "soon"], "bad duration"),
])
def test_demo_user_errors_are_one_line_before_anything_starts(argv, says, tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgesplit", "demo", *argv], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""  # nothing partitioned, no server started
    assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, done.stderr
