"""The bundle format: writing, loading, content hash, and the errors for broken bundles."""

from __future__ import annotations

import json
import shutil

import pytest

from edgesplit.bundle import Bundle, update_manifest, write_bundle
from edgesplit.errors import BundleError


def test_roundtrip_fields(mlp_bundle):
    b = Bundle.load(mlp_bundle.path)
    assert b.id == mlp_bundle.id and len(b.id) == 64
    assert b.num_segments == 2
    assert [c.index for c in b.cuts] == [1]
    assert b.cut(0).tensors == ("x",) and b.cut(2).tensors == ("y",)
    assert b.cut(1).specs[0].shape == ("N", 32)
    assert b.cut(1).bytes_per_sample == 32 * 4
    manifest = json.loads((b.path / "manifest.json").read_text())
    assert manifest["format"] == "edgesplit-bundle/1"
    assert {"format", "id", "model", "segments", "cuts"} <= set(manifest)


def test_tampered_segment_is_refused(mlp_bundle):
    seg = mlp_bundle.segments[1].path
    seg.write_bytes(seg.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="does not match the bundle id"):
        Bundle.load(mlp_bundle.path)


def test_missing_things_are_named(mlp_bundle, tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(tmp_path / "empty")
    mlp_bundle.segments[0].path.unlink()
    with pytest.raises(BundleError, match="segments/0.onnx is missing"):
        Bundle.load(mlp_bundle.path)
    (mlp_bundle.path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        Bundle.load(mlp_bundle.path)


def test_bad_cut_index(mlp_bundle):
    with pytest.raises(BundleError, match="no cut 5"):
        mlp_bundle.cut(5)


def test_write_refuses_foreign_directory_and_leaves_it_alone(mlp_bundle, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    segs = [(__import__("onnx").load(s.path), s.inputs, s.outputs) for s in mlp_bundle.segments]
    with pytest.raises(BundleError, match="exists and is not a bundle"):
        write_bundle(foreign, mlp_bundle.manifest["model"], segs, mlp_bundle.cuts)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "mlp.bundle"]  # no temp dirs left


def test_rewrite_existing_bundle_and_update_manifest(mlp_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mlp_bundle.path, copy)
    segs = [(__import__("onnx").load(s.path), s.inputs, s.outputs) for s in mlp_bundle.segments]
    again = write_bundle(copy, mlp_bundle.manifest["model"], segs, mlp_bundle.cuts)
    assert again.id == mlp_bundle.id  # content-addressed: same content, same id
    updated = update_manifest(copy, calibration={"h": {"min": 0.0, "max": 1.0}})
    assert updated.id != mlp_bundle.id
    assert Bundle.load(copy).get("calibration") == {"h": {"min": 0.0, "max": 1.0}}
