"""NIfTI label volumes from per-slice display masks: synthetic and real (TotalSegmentator) grids."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from medisee.scoring.nifti_labels import build_label_volume, from_display


def _load(data: bytes) -> nib.Nifti1Image:
    assert data[:2] == b"\x1f\x8b"  # gzip
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def _display(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    """Expected mapping, written independently of the module: display = rot90 of the voxel slice."""
    return np.rot90(np.take(volume, index, axis=axis))


def _check_grid(out: nib.Nifti1Image, reference: nib.Nifti1Image) -> None:
    assert out.shape == reference.shape[:3]
    np.testing.assert_allclose(out.affine, reference.affine, atol=1e-5)
    assert int(out.header["qform_code"]) == int(reference.header["qform_code"])
    assert int(out.header["sform_code"]) == int(reference.header["sform_code"])
    assert out.header.get_intent()[0] == "label"


def _check_sidecar(sidecar: dict, volume: np.ndarray, labels: list[dict], axis: int) -> None:
    json.dumps(sidecar)
    assert sidecar["axis"] == axis
    assert sidecar["source_shape"] == list(volume.shape)
    assert [(e["label"], e["query"], e["verdict"]) for e in sidecar["labels"]] == [
        (e["label"], e["query"], e["verdict"]) for e in labels
    ]
    for entry in sidecar["labels"]:
        assert entry["voxels"] == int(np.sum(volume == entry["label"]))


@pytest.fixture
def synthetic() -> nib.Nifti1Image:
    affine = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.5], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.zeros((5, 6, 7), dtype=np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    return nib.Nifti1Image.from_bytes(image.to_bytes())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_synthetic_round_trip_with_overlap(synthetic, axis):
    rng = np.random.default_rng(axis)
    shape = synthetic.shape
    display_shape = _display(np.zeros(shape), 0, axis).shape
    labels = [
        {"label": 1, "query": "liver", "verdict": "present"},
        {"label": 2, "query": "tumour", "verdict": "uncertain"},
        {"label": 3, "query": "kidney", "verdict": "absent"},
    ]
    slice_masks = {
        index: {1: rng.random(display_shape) > 0.5, 2: rng.random(display_shape) > 0.6}
        for index in range(0, shape[axis], 2)
    }
    slice_masks[1] = {2: rng.random(display_shape) > 0.5}

    data, sidecar = build_label_volume(synthetic, axis, labels, slice_masks)
    out = _load(data)
    _check_grid(out, synthetic)
    assert out.get_data_dtype() == np.uint8
    volume = np.asanyarray(out.dataobj)
    for index in range(shape[axis]):
        expected = np.zeros(display_shape, dtype=np.uint8)
        for entry in labels:  # later labels win
            mask = slice_masks.get(index, {}).get(entry["label"])
            if mask is not None:
                expected[mask] = entry["label"]
        np.testing.assert_array_equal(_display(volume, index, axis), expected)
    _check_sidecar(sidecar, volume, labels, axis)
    assert sidecar["labels"][2]["voxels"] == 0
    assert sidecar["labels"][0]["voxels"] > 0


def test_from_display_inverts_to_display():
    from medisee.data.display import to_display

    voxels = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(from_display(to_display(voxels)), voxels)


def test_large_label_ids_use_uint16(synthetic):
    display_shape = _display(np.zeros(synthetic.shape), 0, 2).shape
    mask = np.zeros(display_shape, dtype=bool)
    mask[1, 2] = True
    labels = [{"label": 300, "query": "q", "verdict": "present"}]
    data, sidecar = build_label_volume(synthetic, 2, labels, {4: {300: mask}})
    out = _load(data)
    assert out.get_data_dtype() == np.uint16
    volume = np.asanyarray(out.dataobj)
    assert sidecar["labels"][0]["voxels"] == 1 == int(np.sum(volume == 300))
    np.testing.assert_array_equal(_display(volume, 4, 2) == 300, mask)


def test_invalid_masks(synthetic):
    labels = [{"label": 1, "query": "q", "verdict": "present"}]
    wrong = np.zeros(synthetic.shape[:2], dtype=bool)  # voxel orientation (5, 6), display is (6, 5)
    with pytest.raises(ValueError, match=r"mask shape \(5, 6\).*\(6, 5\)"):
        build_label_volume(synthetic, 2, labels, {0: {1: wrong}})
    ok = wrong.T
    with pytest.raises(ValueError, match="not listed"):
        build_label_volume(synthetic, 2, labels, {0: {2: ok}})
    with pytest.raises(ValueError, match="slice index 7"):
        build_label_volume(synthetic, 2, labels, {7: {1: ok}})
    with pytest.raises(ValueError, match="axis"):
        build_label_volume(synthetic, 3, labels, {})
    with pytest.raises(ValueError, match="duplicate"):
        build_label_volume(synthetic, 2, labels * 2, {})


@pytest.mark.parametrize(
    ("image_name", "seg_name", "axis"),
    [("example_ct_sm.nii.gz", "example_seg.nii.gz", 2), ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", 0)],
)
def test_real_volume_round_trip(shared_data, image_name, seg_name, axis):
    folder = shared_data / "totalsegmentator_ref"
    if not folder.is_dir():
        pytest.skip(f"TotalSegmentator reference volumes not found at {folder}")
    reference = nib.load(folder / image_name)
    seg = np.asanyarray(nib.load(folder / seg_name).dataobj).astype(np.int32)
    present = [int(v) for v in np.unique(seg) if v != 0]
    chosen = present[:5]
    labels = [{"label": v, "query": f"class {v}", "verdict": "present"} for v in chosen]
    labels.append({"label": 250, "query": "not there", "verdict": "absent"})
    # display masks as the pipeline sees them: rot90 of each label slice
    slice_masks = {}
    for index in range(seg.shape[axis]):
        display = _display(seg, index, axis)
        masks = {v: display == v for v in chosen if np.any(display == v)}
        if masks:
            slice_masks[index] = masks

    data, sidecar = build_label_volume(reference, axis, labels, slice_masks)
    out = _load(data)
    _check_grid(out, reference)
    volume = np.asanyarray(out.dataobj)
    np.testing.assert_array_equal(volume, np.where(np.isin(seg, chosen), seg, 0))
    _check_sidecar(sidecar, volume, labels, axis)
    assert sidecar["labels"][-1]["voxels"] == 0
