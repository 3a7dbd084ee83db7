"""Calibration: ranges recorded from real runs of a bundle, stored in its manifest, used by codecs."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.bundle import Bundle
from edgesplit.cli import main
from edgesplit.codecs import get_codec
from edgesplit.codecs.calibration import RangeCollector, calibration_for
from edgesplit.errors import ConfigError


def test_range_collector_minmax_and_percentile():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 50, 50)).astype(np.float32) * np.array([1, 2, 3], np.float32)[None, :, None, None]
    x[0, 0, 0, 0] = 1000.0  # one outlier
    mm = RangeCollector(percentile=100)
    mm.update("a", x)
    pc = RangeCollector(percentile=99.9)
    pc.update("a", x[:2])
    pc.update("a", x[2:])
    e_mm, e_pc = mm.result()["tensors"]["a"], pc.result()["tensors"]["a"]
    assert e_mm["max"] >= 1000.0 and e_mm["min"] <= x.min()
    assert e_pc["max"] < 20 and e_pc["min"] < -2  # the outlier is ignored, the bulk is kept
    assert e_pc["axis"] == 1 and len(e_pc["max_c"]) == 3
    assert e_pc["max_c"][0] < e_pc["max_c"][1] < e_pc["max_c"][2]
    assert all(lo <= hi for lo, hi in zip(e_mm["min_c"], e_mm["max_c"]))
    assert e_mm["max_c"][0] >= 1000.0
    ids = RangeCollector()
    ids.update("ids", np.arange(5))  # integer tensors are not quantised, so not calibrated
    assert ids.result()["tensors"] == {}
    with pytest.raises(ConfigError):
        RangeCollector(percentile=20)


def test_calibrate_command_writes_the_manifest(mlp_bundle, tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "a.npy", rng.standard_normal((5, 16)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.standard_normal(16).astype(np.float32))  # one sample, no batch dim
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((2, 16)).astype(np.float32))
    old_id = mlp_bundle.id
    rc = main(["calibrate", str(mlp_bundle.path), "--inputs", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
               str(tmp_path / "c.npz"), "--percentile", "100", "--batch", "3"])
    assert rc == 0
    bundle = Bundle.load(mlp_bundle.path)
    assert bundle.id != old_id
    cal = bundle.get("calibration")
    assert cal["samples"] == 8 and set(cal["tensors"]) == {"x", "h", "y"}
    # The recorded range of h is what the head really makes on those inputs.
    from edgesplit.runtime import SegmentChain

    xs = np.concatenate([np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")[None],
                         np.load(tmp_path / "c.npz")["x"]])
    with SegmentChain(bundle, 0, 1) as head:
        h = head.run({"x": xs})["h"]
    entry = calibration_for(bundle, "h")
    assert entry["min"] <= h.min() and entry["max"] >= h.max()
    assert entry["max"] == pytest.approx(h.max(), rel=1e-4)
    assert np.allclose(entry["max_c"], h.max(axis=0), rtol=1e-4)
    # A codec given the entry quantises with the calibrated per-channel ranges.
    enc = get_codec("int8:pc").encode(np.tile(h, (16, 1)), calibration=entry)  # >= 128 values per channel
    span = np.maximum(entry["max_c"], 0) - np.minimum(entry["min_c"], 0)
    # A dead channel (all zeros after the ReLU) gets scale 1: any scale represents it exactly.
    assert np.frombuffer(enc.params["scales"], "<f4") == pytest.approx(np.where(span > 0, span / 255, 1), rel=1e-5)
    assert calibration_for(bundle.manifest, "h") == entry == calibration_for(cal, "h")
    assert calibration_for(bundle, "nope") is None


def test_calibrate_command_user_errors(mlp_bundle, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4), np.float32))
    (tmp_path / "x.txt").write_text("hi")
    for inputs in [[str(tmp_path / "bad.npy")], [str(tmp_path / "x.txt")], [str(tmp_path / "missing.npy")]]:
        assert main(["calibrate", str(mlp_bundle.path), "--inputs", *inputs]) == 1
        assert "error:" in capsys.readouterr().err
