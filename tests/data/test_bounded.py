"""Bounded readers: hostile DICOM / NIfTI refused from their headers, normal files read as before.

The hostile cases go through the public paths (serving's decode_upload, prepare's loaders), which
exist before and after the bounded readers; the unit tests of `medisee.data.bounded` import it.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medisee.config import PrepareConfig
from medisee.data.bounded import Limits
from medisee.data.codec import BadRecord, as_rgb, window_to_uint8
from medisee.data.display import to_display
from medisee.data.sources import dicom, nifti
from medisee.data.sources.context import ConvertContext
from medisee.serving.args import AppArgs
from medisee.serving.requests import ApiError, decode_upload
from tests.data.hostile import (
    deflated_dicom_of_zeros,
    gzip_bomb_nifti,
    image_dataset,
    multiframe_dicom,
    nifti_bytes,
    nifti_header_only,
    traced_peak,
)

MIB = 1024 * 1024
CTX = ConvertContext(settings=None, prepare=PrepareConfig(), source="test")
SERVING_PIXELS = AppArgs.model_fields["max_image_pixels"].default
SERVING_BYTES = AppArgs.model_fields["max_image_bytes"].default
DEFAULT_PIXELS, DEFAULT_DICOM_BYTES, DEFAULT_VOLUME_BYTES = 50_000_000, 256 * MIB, 1024 * MIB
# pydicom's own test files, all stored in the package: every transfer syntax the decoders here read
PYDICOM_FILES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm", "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_rle_2frame.dcm", "rtdose.dcm",
    "rtdose_rle.dcm", "image_dfl.dcm",
]  # fmt: skip


def old_frames(data: bytes, ct_window=(-160.0, 240.0)) -> list[np.ndarray]:
    """What the readers returned before (every frame decoded at once), as the reference."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    frames = list(pixels) if count > 1 else [pixels]
    if photometric.startswith("RGB") or (pixels.ndim == 3 and pixels.shape[-1] == 3 and count == 1):
        return [np.clip(f, 0, 255).astype(np.uint8) for f in frames]
    out = []
    for frame in frames:
        if photometric == "MONOCHROME1":
            frame = frame.max() - frame
        out.append(as_rgb(window_to_uint8(frame, *_old_window(ds, frame, ct_window))))
    return out


def _old_window(ds, frame, ct_window):
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if width > 1:
            return center - width / 2, center + width / 2
    if str(ds.get("Modality", "")).upper() == "CT":
        return ct_window
    return float(frame.min()), float(frame.max())


def serve(data: bytes, max_bytes: int = SERVING_BYTES) -> np.ndarray:
    return decode_upload(data, SERVING_PIXELS, max_bytes)


def saved(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def frames_claim(rows: int, cols: int, frames: int) -> bytes:
    """A header claiming `frames` frames, holding one frame's pixel data."""
    ds = image_dataset(rows, cols, frames)
    ds.PixelData = bytes(rows * cols * 2)
    return saved(ds)


# ----- serving: the first frame only, the header checked first, inflation bounded ----------------
def test_serving_refuses_a_deflated_bomb_over_its_limit_from_the_header():
    frames = SERVING_BYTES // (2048 * 2048 * 2) + 1  # one frame over the serving limit
    bomb = deflated_dicom_of_zeros(2048, 2048, frames)
    assert len(bomb) < 2 * MIB
    with traced_peak() as peak, pytest.raises(ApiError) as refused:
        serve(bomb)
    assert refused.value.status == 413
    assert peak["bytes"] < 64 * MIB  # pydicom inflated all of it (over 512 MiB) to read the header
    assert f"{frames} DICOM frame(s) of 2048×2048 pixels" in refused.value.message


def test_serving_refuses_pixel_data_longer_than_its_header_says():
    bomb = deflated_dicom_of_zeros(64, 64, 1, pixel_bytes=256 * MIB)  # 8 KiB claimed, 256 MiB inside
    with traced_peak() as peak, pytest.raises(ApiError) as refused:
        serve(bomb)
    assert refused.value.status == 413 and "inflates to more than" in refused.value.message
    assert peak["bytes"] < 64 * MIB


def test_serving_refuses_headers_claiming_too_much():
    with pytest.raises(ApiError) as frames:
        serve(frames_claim(512, 512, 1_000_000))
    assert frames.value.status == 413 and "1000000" in frames.value.message
    with pytest.raises(ApiError) as pixels:
        decode_upload(deflated_dicom_of_zeros(4096, 4096, 1), 1_000_000, SERVING_BYTES)
    assert (
        pixels.value.status == 413 and "4096×4096 pixels exceeds the limit of 1000000" in pixels.value.message
    )


def test_serving_decodes_one_frame_of_a_multiframe_file_as_before():
    data = multiframe_dicom(512, 512, 32)  # 16 MiB of 16-bit pixels
    expected = old_frames(data)[0]
    serve(data)  # imports, outside the traced call
    with traced_peak() as peak:
        image = serve(data)
    np.testing.assert_array_equal(image, expected)
    assert peak["bytes"] < 24 * MIB  # all 32 frames as float32 alone were 32 MiB


def test_serving_answers_400_for_damaged_files():
    truncated = open(get_testdata_file("MR_truncated.dcm"), "rb").read()
    deflated = multiframe_dicom(64, 64, 2, DeflatedExplicitVRLittleEndian)
    for data in (truncated, deflated[: len(deflated) // 2]):
        with pytest.raises(ApiError) as refused:
            serve(data)
        assert refused.value.status == 400 and refused.value.message.startswith("unreadable DICOM")


@pytest.mark.parametrize("name", PYDICOM_FILES)
def test_real_files_read_as_before(name):
    data = open(get_testdata_file(name), "rb").read()
    expected = old_frames(data)
    _, frames = dicom.read_frames(
        data, CTX.prepare.ct_window, Limits.of(CTX.prepare)
    )  # prepare and batch: every frame, each windowed alone
    assert len(frames) == len(expected)
    for frame, before in zip(frames, expected, strict=True):
        np.testing.assert_array_equal(frame, before)
    np.testing.assert_array_equal(serve(data), expected[0])


@pytest.mark.parametrize("syntax", [None, DeflatedExplicitVRLittleEndian])
def test_generated_multiframe_files_read_as_before(syntax):
    data = multiframe_dicom(200, 96, 6, syntax, seed=3)  # deflated: over one 64 KiB input piece
    expected = old_frames(data)
    _, frames = dicom.read_frames(data, CTX.prepare.ct_window, Limits.of(CTX.prepare))
    assert len(frames) == 6 and not np.array_equal(frames[0], frames[1])
    for frame, before in zip(frames, expected, strict=True):
        np.testing.assert_array_equal(frame, before)
    np.testing.assert_array_equal(serve(data), expected[0])


# ----- prepare: quarantined, never decoded -------------------------------------------------------
def test_prepare_quarantines_dicom_bombs_as_too_large(tmp_path):
    files = {
        "bomb.dcm": deflated_dicom_of_zeros(2048, 2048, 64),  # 512 MiB of pixels, over 256 MiB
        "frames.dcm": frames_claim(512, 512, 1_000_000),
        "ok.dcm": multiframe_dicom(32, 32, 3),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    dicom.load(_spec(tmp_path / "ok.dcm"), CTX)  # imports, outside the traced call
    with traced_peak() as peak:
        loaded = {name: dicom.load(_spec(tmp_path / name), CTX) for name in files}
    assert peak["bytes"] < 64 * MIB
    for name in ("bomb.dcm", "frames.dcm"):
        (row,) = loaded[name]
        assert isinstance(row.image, BadRecord) and row.image.reason == "too_large", name
    assert [type(i.image) for i in loaded["ok.dcm"]] == [np.ndarray] * 3


def _spec(path) -> dict:
    return {"image_key": path.stem, "image_uri": str(path), "split": "train", "targets": []}


def test_prepare_dicom_refuses_links_and_label_paths_leaving_the_input(tmp_path):
    from PIL import Image

    from tests.data.test_converters import read_output_of

    folder = tmp_path / "dicom"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "outside.dcm")
    (folder / "leak.dcm").symlink_to(tmp_path / "outside.dcm")
    mask = np.zeros((128, 128), np.uint8)
    mask[40:60, 50:80] = 255
    Image.fromarray(mask).save(tmp_path / "lesion.png")
    labels = {"ct.dcm": {"lesion": "../lesion.png", "organ": "/etc/passwd"}}
    (folder / "labels.json").write_text(json.dumps(labels))
    manifest, rows, quarantine = read_output_of("dicom", folder, tmp_path)
    refused = {q["input_ref"].rsplit("/", 1)[-1]: q["reason"] for q in quarantine}
    assert refused == {
        "leak.dcm": "symlink_outside_input", "lesion.png": "unsafe_path", "passwd": "unsafe_path",
    }  # fmt: skip
    assert rows and {r["image_id"] for r in rows} == {"dicom/mr"}  # ct.dcm has only refused labels


# ----- NIfTI -------------------------------------------------------------------------------------
def nifti_spec(path, modality: str = "ct") -> dict:
    return {"image_key": "v", "image_uri": str(path), "modality": modality, "split": "train", "classes": {}}


def test_prepare_refuses_a_huge_slice_in_a_small_file(tmp_path):
    path = tmp_path / "wide.nii.gz"
    path.write_bytes(gzip.compress(nifti_bytes((8000, 8000, 1)), compresslevel=1))
    assert path.stat().st_size < 1 * MIB
    with traced_peak() as peak:
        (row,) = nifti.load(nifti_spec(path), CTX)
    assert isinstance(row.image, BadRecord) and row.image.reason == "too_large"
    assert "8000×8000 pixels" in row.image.detail
    assert peak["bytes"] < 16 * MIB  # the 64 MB slice was inflated, then windowed as float32


def test_prepare_refuses_a_gzip_bomb_without_inflating_it(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip_bomb_nifti((64, 64, 1), payload_zeros=256 * MIB))
    with traced_peak() as peak:
        (row,) = nifti.load(nifti_spec(path), CTX)
    assert isinstance(row.image, BadRecord) and row.image.reason == "too_large"
    assert "more than its header implies" in row.image.detail
    assert peak["bytes"] < 16 * MIB


def test_prepare_refuses_a_header_claiming_gigabytes(tmp_path):
    path = tmp_path / "claim.nii"
    path.write_bytes(nifti_header_only((1024, 1024, 1024), np.float32))
    (row,) = nifti.load(nifti_spec(path), CTX)
    assert isinstance(row.image, BadRecord) and row.image.reason == "too_large"
    assert "1024×1024×1024 voxels" in row.image.detail


def test_totalsegmentator_volumes_load_as_before(shared_data):
    folder = shared_data / "totalsegmentator_ref"
    for name, modality in (("example_ct_sm.nii.gz", "ct"), ("example_mr_sm.nii.gz", "mr")):
        reference = np.asanyarray(nib.load(folder / name).dataobj).astype(np.float32)
        images = nifti.load(nifti_spec(folder / name, modality), CTX)
        assert len(images) == reference.shape[2]
        low, high = (-160.0, 240.0) if modality == "ct" else np.percentile(reference, [0.5, 99.5])
        for index in (0, reference.shape[2] // 2, reference.shape[2] - 1):
            expected = as_rgb(window_to_uint8(to_display(reference[:, :, index]), low, high))
            np.testing.assert_array_equal(images[index].image, expected)


# ----- medisee.data.bounded ----------------------------------------------------------------------
def test_limits_and_errors():
    from medisee.data.bounded import (
        MAX_DICOM_BYTES,
        MAX_IMAGE_PIXELS,
        MAX_VOLUME_BYTES,
        InputTooLarge,
        Limits,
    )

    assert (MAX_IMAGE_PIXELS, MAX_DICOM_BYTES, MAX_VOLUME_BYTES) == (
        DEFAULT_PIXELS, DEFAULT_DICOM_BYTES, DEFAULT_VOLUME_BYTES,
    )  # fmt: skip
    from medisee.scoring.decode import DecodeOptions

    assert Limits.of(PrepareConfig()) == Limits()
    assert Limits.of(DecodeOptions(max_image_pixels=7, max_dicom_bytes=8)) == Limits(7, 8)
    err = InputTooLarge("over")
    assert isinstance(err, BadRecord) and isinstance(err, ValueError)
    assert (err.reason, err.detail) == ("too_large", "over")


def test_the_bounded_dicom_reader_matches_pydicom_and_refuses_bombs():
    from medisee.data.bounded import InputTooLarge, read_dicom

    data = multiframe_dicom(128, 96, 4, DeflatedExplicitVRLittleEndian, seed=1)
    ours, theirs = read_dicom(data, DEFAULT_PIXELS, DEFAULT_DICOM_BYTES), pydicom.dcmread(io.BytesIO(data))
    assert ours.file_meta == theirs.file_meta and ours.preamble == theirs.preamble
    assert [e.tag for e in ours] == [e.tag for e in theirs] and ours.PixelData == theirs.PixelData
    with traced_peak() as peak, pytest.raises(InputTooLarge, match="64 DICOM frame"):
        read_dicom(deflated_dicom_of_zeros(2048, 2048, 64), DEFAULT_PIXELS, DEFAULT_DICOM_BYTES)
    assert peak["bytes"] < 64 * MIB
    with pytest.raises(ValueError, match="ends before its end-of-stream") as cut:
        read_dicom(data[: len(data) // 2], DEFAULT_PIXELS, DEFAULT_DICOM_BYTES)
    assert not isinstance(cut.value, InputTooLarge)


def test_the_header_reader_inflates_a_bomb_no_further_than_its_allowance():
    """What batch planning needs (rows, UIDs) from a file or its first megabyte."""
    from medisee.data.bounded import DATASET_ALLOWANCE, read_dicom_header

    bomb = deflated_dicom_of_zeros(2048, 2048, 64)
    with traced_peak() as peak:
        header = read_dicom_header(bomb)
    assert (header.Rows, header.NumberOfFrames) == (2048, 64) and "PixelData" not in header
    assert peak["bytes"] < 2 * DATASET_ALLOWANCE + 8 * MIB  # pydicom inflated all 512 MiB
    for name in ("image_dfl.dcm", "CT_small.dcm", "MR_truncated.dcm"):
        data = open(get_testdata_file(name), "rb").read()
        expected = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        assert read_dicom_header(data) == expected
    deflated = multiframe_dicom(64, 64, 2, DeflatedExplicitVRLittleEndian)
    assert read_dicom_header(deflated[:400]).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


def test_the_nifti_reader_checks_the_header_before_inflating():
    from medisee.data.bounded import InputTooLarge, read_nifti_image

    wide = gzip.compress(nifti_bytes((8000, 8000, 1)), compresslevel=1)
    with pytest.raises(InputTooLarge, match="8000×8000 pixels"):
        read_nifti_image(wide, DEFAULT_VOLUME_BYTES, DEFAULT_PIXELS, axis=2)
    assert read_nifti_image(wide, DEFAULT_VOLUME_BYTES, DEFAULT_PIXELS, axis=0).shape == (8000, 8000, 1)
    claim = nifti_header_only((1024, 1024, 1024), np.float32)
    for data in (claim, gzip.compress(claim)):
        with pytest.raises(InputTooLarge, match="1024×1024×1024 voxels"):
            read_nifti_image(data, DEFAULT_VOLUME_BYTES, DEFAULT_PIXELS)
    bomb = gzip_bomb_nifti((64, 64, 1), payload_zeros=64 * MIB)
    with traced_peak() as peak, pytest.raises(InputTooLarge, match="more than its header implies"):
        read_nifti_image(bomb, None)  # no size limit: still no further than the header implies
    assert peak["bytes"] < 16 * MIB
    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 16), dtype=np.uint8)
    whole = gzip.compress(nifti_bytes(noise.shape, data=noise))
    np.testing.assert_array_equal(np.asanyarray(read_nifti_image(whole, DEFAULT_VOLUME_BYTES).dataobj), noise)
    with pytest.raises(EOFError):  # gzip cut short: a clean error, as before
        read_nifti_image(whole[: len(whole) // 2], DEFAULT_VOLUME_BYTES)


def test_totalsegmentator_volumes_read_as_before(shared_data):
    from medisee.data.bounded import read_nifti_image

    for name in ("example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "example_seg.nii.gz"):
        path = shared_data / "totalsegmentator_ref" / name
        image = read_nifti_image(path.read_bytes(), DEFAULT_VOLUME_BYTES, DEFAULT_PIXELS)
        reference = nib.load(path)
        assert image.shape == reference.shape
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(reference.dataobj))


def test_reading_as_stored_leaves_inflating_to_the_reader(tmp_path):
    """pyarrow's input streams inflate a .gz name by themselves, with no bound."""
    from medisee.data.bounded import read_stored

    packed = gzip.compress(b"x" * 1000)
    (tmp_path / "a.nii.gz").write_bytes(packed)
    assert read_stored(str(tmp_path / "a.nii.gz")) == packed
