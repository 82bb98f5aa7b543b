"""Batch decode refuses hostile DICOM / NIfTI from their headers: one error row each, nothing huge."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medisee.scoring.decode import DecodeOptions, decode_partition
from medisee.scoring.queries import parse_query_spec
from tests.data.hostile import (
    deflated_dicom_of_zeros,
    image_dataset,
    multiframe_dicom,
    nifti_bytes,
    traced_peak,
)

MIB = 1024 * 1024
QUERIES = "template=Segment the {class}.;classes=liver"


def dicom_partition(folder, files: dict[str, bytes]) -> dict:
    items = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        items.append({"uri": str(folder / name), "rel": name, "sop_uid": name})
    return {"key": "dicom-s", "kind": "dicom", "series_uid": "s", "items": items}


def nifti_partition(folder, name: str, data: bytes) -> dict:
    (folder / name).write_bytes(data)
    return {"key": f"nifti-{name}", "kind": "nifti", "uri": str(folder / name), "rel": name}


def decode(partition: dict, folder, **options) -> list[dict]:
    return decode_partition(partition, parse_query_spec(QUERIES, str(folder)), DecodeOptions(**options))


def reasons(rows: list[dict]) -> dict[str, str | None]:
    return {r["image_id"]: r.get("error") for r in rows}


def test_a_dicom_series_with_bombs_gives_one_error_row_each(tmp_path):
    many_frames = image_dataset(512, 512, 1_000_000)
    many_frames.PixelData = bytes(512 * 512 * 2)
    buffer = io.BytesIO()
    many_frames.save_as(buffer, enforce_file_format=True)
    files = {
        "bomb.dcm": deflated_dicom_of_zeros(2048, 2048, 64),
        "frames.dcm": buffer.getvalue(),
        "truncated.dcm": open(get_testdata_file("MR_truncated.dcm"), "rb").read(),
        "ok.dcm": multiframe_dicom(64, 64, 3),
    }
    partition = dicom_partition(tmp_path, files)
    decode(partition, tmp_path)  # imports, outside the traced call
    with traced_peak() as peak:
        rows = decode(partition, tmp_path)
    assert peak["bytes"] < 64 * MIB  # the bomb alone inflated to 512 MiB and 2 GiB of float32 before
    assert reasons(rows) == {
        "s/bomb.dcm": "too_large", "s/frames.dcm": "too_large", "s/truncated.dcm": "unreadable_dicom",
        "s/ok.dcm#f0": None, "s/ok.dcm#f1": None, "s/ok.dcm#f2": None,
    }  # fmt: skip
    assert (
        "64 DICOM frame(s) of 2048×2048"
        in next(r for r in rows if r["image_id"] == "s/bomb.dcm")["error_detail"]
    )


def test_dicom_limits_come_from_the_options(tmp_path):
    partition = dicom_partition(tmp_path, {"a.dcm": multiframe_dicom(64, 64, 4)})
    assert set(reasons(decode(partition, tmp_path)).values()) == {None}
    assert reasons(decode(partition, tmp_path, max_dicom_bytes=64 * 64 * 2 * 3)) == {"s/a.dcm": "too_large"}
    assert reasons(decode(partition, tmp_path, max_image_pixels=64 * 63)) == {"s/a.dcm": "too_large"}


def test_a_huge_nifti_slice_and_a_gzip_bomb_are_error_rows(tmp_path):
    wide = nifti_partition(tmp_path, "wide.nii.gz", gzip.compress(nifti_bytes((8000, 8000, 1)), 1))
    decode(nifti_partition(tmp_path, "small.nii", nifti_bytes((8, 8, 2))), tmp_path)  # imports
    with traced_peak() as peak:
        rows = decode(wide, tmp_path)
    assert reasons(rows) == {"wide.nii.gz": "too_large"} and peak["bytes"] < 16 * MIB
    bomb_head = nifti_bytes((32, 32, 2))
    bomb = nifti_partition(tmp_path, "bomb.nii.gz", gzip.compress(bomb_head + bytes(64 * MIB), 1))
    with traced_peak() as peak:
        rows = decode(bomb, tmp_path)
    assert reasons(rows) == {"bomb.nii.gz": "too_large"} and peak["bytes"] < 16 * MIB
    big = nifti_partition(tmp_path, "big.nii", nifti_bytes((64, 64, 64), np.float32))
    assert reasons(decode(big, tmp_path, max_volume_bytes=64**3 * 4 - 1)) == {"big.nii": "too_large"}


@pytest.mark.parametrize(
    ("zooms", "reason"),
    [
        ((1.0, 1e-5, 1.0), "too_large"),  # 64 × 64 slices would resample to 6 400 000 × 64
        ((1.0, float("inf"), 1.0), "bad_spacing"),
        ((1.0, float("nan"), 1.0), "bad_spacing"),
    ],
)
def test_resampling_by_absurd_spacing_is_refused_before_reading(tmp_path, zooms, reason):
    volume = np.zeros((64, 64, 2), np.int16)
    volume[10:50, 10:50] = 100
    partition = nifti_partition(tmp_path, "v.nii", nifti_bytes(volume.shape, zooms=zooms, data=volume))
    assert reasons(decode(partition, tmp_path, resample_spacing=True)) == {"v.nii": reason}
    assert set(reasons(decode(partition, tmp_path)).values()) == {None}  # without resampling: scored


def test_normal_spacing_still_resamples(tmp_path):
    volume = np.zeros((40, 20, 1), np.int16)
    volume[5:30, 5:15] = 100
    partition = nifti_partition(
        tmp_path, "v.nii", nifti_bytes(volume.shape, zooms=(1.0, 2.0, 3.0), data=volume)
    )
    (row,) = decode(partition, tmp_path, resample_spacing=True)
    assert (row["height"], row["width"], row["native_hw"]) == (40, 40, [20, 40])


def test_real_dicom_files_decode_as_before(tmp_path):
    from tests.data.test_bounded import old_frames

    names = ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "image_dfl.dcm")
    files = {name: open(get_testdata_file(name), "rb").read() for name in names}
    rows = decode(dicom_partition(tmp_path, files), tmp_path)
    for name, data in files.items():
        expected = old_frames(data)
        mine = [r for r in rows if r["sop_uid"] == name]
        assert len(mine) == len(expected) and not any(r.get("error") for r in mine)
        for row, before in zip(mine, expected, strict=True):
            assert (row["height"], row["width"]) == before.shape[:2]
            assert row["image"] == before.tobytes()


def test_real_nifti_volumes_decode_as_before(tmp_path, shared_data):
    import nibabel as nib

    from medisee.data.codec import as_rgb, window_to_uint8
    from medisee.data.display import volume_slice

    path = shared_data / "totalsegmentator_ref" / "example_mr_sm.nii.gz"
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    low, high = (float(v) for v in np.percentile(volume, [0.5, 99.5]))
    rows = decode(nifti_partition(tmp_path, "mr.nii.gz", path.read_bytes()), tmp_path)
    assert rows and not any(r.get("error") for r in rows)
    for row in rows:
        expected = as_rgb(window_to_uint8(volume_slice(volume, 2, row["slice_index"]), low, high))
        assert row["image"] == expected.tobytes()
