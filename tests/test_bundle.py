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


def _rewrite_manifest(bundle, **changes):
    """Edit the manifest and give it the id its files hash to, as an attacker who can write it would."""
    from edgesplit.bundle import compute_id

    mpath = bundle.path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for key, value in changes.items():
        manifest[key] = value
    manifest["id"] = compute_id(bundle.path, manifest)
    mpath.write_text(json.dumps(manifest))


@pytest.mark.parametrize("file", ["../../outside/evil.onnx", "segments/../../evil.onnx", "/tmp/evil.onnx",
                                  "segments//0.onnx", "manifest.json", "segments/C:evil.onnx\\x"])
def test_a_segment_path_that_leaves_the_bundle_is_refused(mlp_bundle, tmp_path, file):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(mlp_bundle.segments[1].path, outside / "evil.onnx")
    segs = json.loads((mlp_bundle.path / "manifest.json").read_text())["segments"]
    segs[1]["file"] = file
    _rewrite_manifest(mlp_bundle, segments=segs)
    with pytest.raises(BundleError, match="segment file"):
        Bundle.load(mlp_bundle.path)


def test_a_symlink_out_of_the_bundle_is_refused(mlp_bundle, tmp_path):
    seg = mlp_bundle.segments[1].path
    target = tmp_path / "evil.onnx"
    shutil.copy(seg, target)
    seg.unlink()
    seg.symlink_to(target)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(mlp_bundle.path)


def _external_data_bundle(mlp_bundle):
    """The MLP bundle with each segment's weights in a data file beside it, as big models are stored."""
    import onnx

    from edgesplit.bundle import save_segment

    for s in mlp_bundle.segments:
        save_segment(onnx.load(str(s.path)), s.path, external_threshold=0)
    _rewrite_manifest(mlp_bundle)
    return Bundle.load(mlp_bundle.path)


def test_external_data_is_contained_and_covered_by_the_id(mlp_bundle, tmp_path):
    import onnx

    from edgesplit.bundle import external_data_files

    b = _external_data_bundle(mlp_bundle)
    seg = b.segments[0].path  # its 16x32 weights are over save_segment's 1 kB threshold
    assert external_data_files(seg) == ["0.onnx.data"]
    # any change to a file a segment reads changes the id: the old id no longer loads
    data = seg.with_name("0.onnx.data")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="does not match the bundle id"):
        Bundle.load(b.path)
    # a segment whose external data points outside the bundle is refused, whatever the id says
    m = onnx.load(str(seg), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../outside.data"
    (tmp_path / "outside.data").write_bytes(bytes(raw))
    onnx.save(m, str(seg))
    _rewrite_manifest(b)
    with pytest.raises(BundleError, match="external data of segments/0.onnx.*leaves the bundle"):
        Bundle.load(b.path)
