"""DICOM SEG from scored series: real pydicom test images, read back with pydicom and highdicom."""

from __future__ import annotations

import copy
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import SegmentationStorage, generate_uid

from medisee.scoring.dicom_seg import ModelInfo, SegmentResult, build_dicom_seg

MODEL = ModelInfo(name="medisee-tiny", version="2.4.1", sha256="0123456789abcdef" * 4)


def _ct_series(n: int = 3) -> list[pydicom.Dataset]:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        out.append(ds)
    return out


@pytest.fixture
def series() -> list[pydicom.Dataset]:
    return _ct_series()


@pytest.fixture
def enhanced_ct() -> pydicom.Dataset:
    """A real multi-frame (enhanced) CT: pydicom's wheel ships none, so convert the CT series."""
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        _ct_series(4),
        series_instance_uid=generate_uid(),
        series_number=7,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    return pydicom.dcmread(io.BytesIO(_to_bytes(image)))


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _box(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _frames_per_segment(ds: pydicom.Dataset) -> dict[int, int]:
    counts: dict[int, int] = {}
    for item in ds.PerFrameFunctionalGroupsSequence:
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + 1
    return counts


def _expected(segments: list[SegmentResult], shape: tuple[int, int]) -> np.ndarray:
    frames = len(segments[0].masks)
    out = np.zeros((frames, *shape, len(segments)), dtype=bool)
    for s, segment in enumerate(segments):
        for f, mask in enumerate(segment.masks):
            if mask is not None:
                out[f, :, :, s] = mask
    return out


def test_series_round_trip(series):
    shape = (int(series[0].Rows), int(series[0].Columns))
    segments = [
        SegmentResult(
            "liver lesion", "present", [_box(shape, 10, 30, 40, 70), None, _box(shape, 50, 60, 5, 9)]
        ),
        SegmentResult("kidney stone", "absent", [None, None, None]),
        SegmentResult("fluid", "uncertain", [np.zeros(shape, bool), _box(shape, 0, 3, 0, 128), None]),
    ]
    data = _to_bytes(build_dicom_seg(series, segments, MODEL))

    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == SegmentationStorage
    assert ds.SegmentationType == "BINARY"
    assert ds.SeriesNumber == 900
    assert ds.StudyInstanceUID == series[0].StudyInstanceUID
    assert ds.SeriesInstanceUID != series[0].SeriesInstanceUID
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3]
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver lesion", "kidney stone", "fluid"]
    assert [s.SegmentDescription for s in ds.SegmentSequence] == [
        "verdict=present",
        "verdict=absent",
        "verdict=uncertain",
    ]
    for item in ds.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medisee-tiny"
        assert algorithm.AlgorithmVersion == "2.4.1"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert MODEL.sha256 in algorithm.AlgorithmParameters
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
    # the absent segment is listed but has no frame; each non-empty mask is exactly one frame
    assert _frames_per_segment(ds) == {1: 2, 3: 1}
    referenced = ds.ReferencedSeriesSequence
    assert len(referenced) == 1
    assert referenced[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in referenced[0].ReferencedInstanceSequence] == [
        s.SOPInstanceUID for s in series
    ]
    uids = [s.SOPInstanceUID for s in series]
    for item in ds.PerFrameFunctionalGroupsSequence:  # frame-level references back to the sources
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID in uids

    seg = hd.seg.segread(io.BytesIO(data))
    assert seg.number_of_segments == 3
    assert seg.get_segment_description(2).SegmentDescription == "verdict=absent"
    pixels = seg.get_pixels_by_source_instance(
        uids, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True
    )
    assert pixels.shape == (3, *shape, 3)
    np.testing.assert_array_equal(pixels.astype(bool), _expected(segments, shape))


def test_masks_on_every_frame(series):
    """All frames carry pixels: highdicom takes the frames as they are (no plane positions)."""
    shape = (int(series[0].Rows), int(series[0].Columns))
    masks = [_box(shape, 10 * i, 10 * i + 5, 3, 100) for i in range(3)]
    segments = [SegmentResult("spleen", "present", masks), SegmentResult("tumour", "absent", [None] * 3)]
    seg = hd.seg.segread(io.BytesIO(_to_bytes(build_dicom_seg(series, segments, MODEL, series_number=3))))
    assert seg.SeriesNumber == 3
    pixels = seg.get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in series], segment_numbers=[1, 2], assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(pixels.astype(bool), _expected(segments, shape))


def test_multiframe_source(enhanced_ct):
    rows, columns, frames = int(enhanced_ct.Rows), int(enhanced_ct.Columns), int(enhanced_ct.NumberOfFrames)
    assert frames == 4
    segments = [
        SegmentResult("bone", "present", [None, _box((rows, columns), 20, 40, 20, 40), None, None]),
        SegmentResult("air", "absent", [None] * frames),
    ]
    data = _to_bytes(build_dicom_seg([enhanced_ct], segments, MODEL))
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == enhanced_ct.SeriesInstanceUID
    assert [
        i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    ] == [enhanced_ct.SOPInstanceUID]
    source = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == enhanced_ct.SOPInstanceUID
    assert int(source.ReferencedFrameNumber) == 2
    assert _frames_per_segment(ds) == {1: 1}

    seg = hd.seg.segread(io.BytesIO(data))
    pixels = seg.get_pixels_by_source_frame(
        enhanced_ct.SOPInstanceUID,
        source_frame_numbers=list(range(1, frames + 1)),
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels.astype(bool), _expected(segments, (rows, columns)))


def test_nothing_found_still_records_every_query(series):
    segments = [SegmentResult("a", "absent", [None] * 3), SegmentResult("b", "uncertain", [None] * 3)]
    data = _to_bytes(build_dicom_seg(series, segments, MODEL))
    ds = pydicom.dcmread(io.BytesIO(data))
    assert [s.SegmentDescription for s in ds.SegmentSequence] == ["verdict=absent", "verdict=uncertain"]
    # one empty frame per segment, at the first source frame
    assert _frames_per_segment(ds) == {1: 1, 2: 1}
    source = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == series[0].SOPInstanceUID
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 3
    pixels = hd.seg.segread(io.BytesIO(data)).get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in series], segment_numbers=[1, 2], assert_missing_frames_are_empty=True
    )
    assert pixels.shape == (3, 128, 128, 2) and not pixels.any()


def test_single_image_and_label_cleanup():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    query = "find the\\lesion\n" + "x" * 100
    mask = _box((128, 128), 1, 2, 1, 2)
    seg = build_dicom_seg([ds], [SegmentResult(query, "present", [mask])], MODEL)
    label = seg.SegmentSequence[0].SegmentLabel
    assert len(label) == 64 and "\\" not in label and "\n" not in label
    back = hd.seg.segread(io.BytesIO(_to_bytes(seg)))
    pixels = back.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), mask)


def test_mask_shape_mismatch(series):
    segments = [SegmentResult("liver", "present", [None, np.ones((64, 128), bool), None])]
    with pytest.raises(ValueError, match=r"frame 1: mask shape \(64, 128\).*\(128, 128\)"):
        build_dicom_seg(series, segments, MODEL)


def test_invalid_inputs(series):
    with pytest.raises(ValueError, match="2 masks for 3 source frames"):
        build_dicom_seg(series, [SegmentResult("q", "absent", [None, None])], MODEL)
    with pytest.raises(ValueError, match="verdict"):
        build_dicom_seg(series, [SegmentResult("q", "maybe", [None] * 3)], MODEL)
    with pytest.raises(ValueError, match="at least one segment"):
        build_dicom_seg(series, [], MODEL)
    with pytest.raises(ValueError, match="at least one source"):
        build_dicom_seg([], [SegmentResult("q", "absent", [])], MODEL)


def test_multiframe_without_frame_of_reference_is_rejected():
    cine = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))  # ultrasound, 30 frames
    frames = int(cine.NumberOfFrames)
    segments = [SegmentResult("q", "present", [np.ones((cine.Rows, cine.Columns), bool)] * frames)]
    with pytest.raises(ValueError, match="frame of reference"):
        build_dicom_seg([cine], segments, MODEL)
