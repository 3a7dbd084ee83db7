"""`edgesplit inspect / partition / verify` from the command line, good input and bad."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import builders as tm
from edgesplit.bundle import Bundle
from edgesplit.cli import main

EFFNET = Path(__file__).resolve().parent.parent / "edge_agent" / "demo_data" / "efficientnet_lite0.onnx"


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesplit", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_inspect_json_lists_cuts(tmp_path, capsys):
    path = tm.save(tm.residual(), tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["index"] for c in doc["cuts"]] == list(range(1, len(doc["cuts"]) + 1))
    assert {"index", "tensors", "bytes_per_sample"} <= set(doc["cuts"][0])
    assert doc["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}]
    assert main(["inspect", str(path), "--json", "--all"]) == 0
    every = json.loads(capsys.readouterr().out)["cuts"]
    assert len(every) > len(doc["cuts"])
    assert ["b0_in", "b0_r1"] in [c["tensors"] for c in every]


def test_inspect_table_and_shape_option(tmp_path, capsys):
    path = tm.save(tm.attention(), tmp_path)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "bytes/sample" in text and "--shape" in text  # S is unbound: the table says so
    assert main(["inspect", str(path), "--shape", "S=64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["symbols"] == {"S": 64, "N": 1} and doc["unbound_symbols"] == []
    res = next(c for c in doc["cuts"] if c["tensors"] == ["res"])
    assert res["bytes_per_sample"] == 64 * 8 * 4


def test_partition_then_verify(tmp_path, capsys):
    model = tm.two_in_two_out()
    path = tm.save(model, tmp_path)
    out = tmp_path / "bundle"
    assert main(["partition", str(path), "--cut", "h1,h2", "--cut", "y1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 segments" in text
    bundle = Bundle.load(out)
    assert [c.tensors for c in bundle.cuts] == [("x2", "h1", "h2"), ("x2", "y1")]
    assert main(["verify", str(out), "--batch", "3"]) == 0
    text = capsys.readouterr().out
    assert "OK" in text and "max abs error" in text
    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["per_cut"]) == 3 and set(report["max_rel"]) == {"y1", "y2"}


def test_symbolic_dims_must_be_bound_and_verify_honours_them(tmp_path, capsys):
    path = tm.save(tm.attention(), tmp_path)
    out = tmp_path / "b"
    # a cut's bytes would be a guess with S unknown: refused, naming the inputs and an example
    assert main(["partition", str(path), "--cut", "res", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input 'x' has symbolic dims S" in err and "--shape x=1x128x8" in err
    assert not out.exists()
    # sizes given at partition time are recorded and used by verify
    assert main(["partition", str(path), "--cut", "res", "--shape", "S=12", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--shape", "S=7", "--batch", "2"]) == 0
    assert "x[2, 7, 8]" in capsys.readouterr().out
    assert Bundle.load(out).manifest["model"]["shapes"] == {"S": [12]}
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "x[1, 12, 8]" in capsys.readouterr().out


def test_verify_catches_a_wrong_segment(tmp_path, capsys):
    """Swap the tail's weights for other numbers (and re-hash): verify must fail with exit 1."""
    from edgesplit.bundle import compute_id

    path = tm.save(tm.chain(), tmp_path)
    out = tmp_path / "b"
    assert main(["partition", str(path), "--cut", "h1", "-o", str(out)]) == 0
    tail = onnx.load(str(out / "segments" / "1.onnx"))
    w = tail.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w) * 1.01
    w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), w.name))
    onnx.save_model(tail, str(out / "segments" / "1.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["id"] = compute_id(out, manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_catches_a_cut_that_misses_a_tensor(tmp_path, capsys):
    """A manifest whose cut forgot the skip connection (re-hashed): verify reports it, exit 1."""
    from edgesplit.bundle import compute_id

    path = tm.save(tm.residual(), tmp_path)
    out = tmp_path / "b"
    assert main(["partition", str(path), "--cut", "b0_r1", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cuts"][0]["tensors"] == ["b0_in", "b0_r1"]
    manifest["cuts"][0]["tensors"] = ["b0_r1"]
    manifest["cuts"][0]["specs"] = manifest["cuts"][0]["specs"][1:]
    manifest["id"] = compute_id(out, manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "segment 1 reads ['b0_in']" in text and "FAILED" in text


def test_verify_with_model_option_and_moved_source(tmp_path, capsys):
    path = tm.save(tm.chain(), tmp_path)
    out = tmp_path / "b"
    assert main(["partition", str(path), "--cut", "h2", "-o", str(out)]) == 0
    moved = tmp_path / "moved.onnx"
    path.rename(moved)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert "--model" in capsys.readouterr().err
    assert main(["verify", str(out), "--model", str(moved)]) == 0
    other = tm.save(tm.residual(), tmp_path)
    assert main(["verify", str(out), "--model", str(other)]) == 1
    assert "not the model this bundle was cut from" in capsys.readouterr().err


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs_give_one_line_and_leave_nothing(tmp_path):
    good = tm.save(tm.if_model(), tmp_path)
    text = tmp_path / "text.onnx"
    text.write_text("definitely not protobuf\n" * 10)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    notbundle = tmp_path / "notbundle"
    notbundle.mkdir()
    (notbundle / "precious.txt").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    cases = [
        (["inspect", text], ["not an ONNX model"]),
        (["partition", text, "--cut", "h", "-o", out], ["not an ONNX model"]),
        (["inspect", trunc], ["trunc.onnx"]),
        (["partition", trunc, "--cut", "h", "-o", out], ["trunc.onnx"]),
        (["partition", good, "--cut", "nope", "-o", out], ["nope"]),
        (["partition", good, "--cut", "h,nope", "-o", out], ["nope"]),
        (["partition", good, "--cut", "then_sum", "-o", out], ["then_sum", "If"]),
        (["partition", good, "--cut", "y", "-o", out], ["tail empty"]),
        (["partition", good, "--cut", "h", "-o", notbundle], ["not a bundle"]),
        (["partition", good, "-o", out], ["--cut"]),
        (["partition", tmp_path / "missing.onnx", "--cut", "h", "-o", out], ["no such file"]),
        (["inspect", good, "--shape", "x=1x2x3"], ["3 dims"]),
        (["verify", notbundle], ["not a bundle"]),
    ]
    for args, words in cases:
        _one_line_error(cli(*args), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert [p.name for p in notbundle.iterdir()] == ["precious.txt"]


@pytest.mark.skipif(not EFFNET.is_file(), reason="edge_agent/demo_data/efficientnet_lite0.onnx not built")
def test_efficientnet_inspect_partition_verify(tmp_path):
    proc = cli("inspect", EFFNET, "--json")
    assert proc.returncode == 0, proc.stderr
    cuts = json.loads(proc.stdout)["cuts"]
    assert len(cuts) >= 8
    args = []
    for c in cuts[2::4]:
        args += ["--cut", ",".join(c["tensors"])]
    proc = cli("partition", EFFNET, *args, "-o", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    proc = cli("verify", tmp_path / "b", "--batch", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_first_hour_cli_errors_are_one_line_and_checked_first(tmp_path, capsys):
    """--version; --cut by the numbers inspect prints; an existing bundle needs --force; an
    unwritable profile output is refused before any profiling."""
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("edgesplit ")
    path = tm.save(tm.chain(), tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["cuts"]
    out = tmp_path / "b"
    assert main(["partition", str(path), "--cut", str(listed[0]["index"]), "-o", str(out)]) == 0
    assert Bundle.load(out).cut(1).tensors == tuple(listed[0]["tensors"])
    first_id = Bundle.load(out).id
    _one_line_error(cli("partition", str(path), "--cut", "99", "-o", str(tmp_path / "c")), "--cut 99", "lists cuts")
    _one_line_error(cli("partition", str(path), "--cut", str(listed[-1]["index"]), "-o", str(out)), "--force")
    assert Bundle.load(out).id == first_id  # untouched
    assert main(["partition", str(path), "--cut", str(listed[-1]["index"]), "-o", str(out), "--force"]) == 0
    _one_line_error(cli("profile", str(out), "-o", str(tmp_path / "missing" / "p.json")), "does not exist")
    _one_line_error(cli("profile", str(tmp_path / "nope"), "-o", str(tmp_path / "p.json")), "no such bundle")
