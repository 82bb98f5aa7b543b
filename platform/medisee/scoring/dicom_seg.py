"""One DICOM Segmentation (SEG) per scored series, built with highdicom.

The SEG is BINARY, with one segment per query (segment numbers 1..N in query order), each
labelled with the query (cut to the 64-character LO limit) and described by
`SegmentDescription` = ``verdict=<present|absent|uncertain>``. Segments are AUTOMATIC, with
the model's name and version in the algorithm identification (family: DCM "Artificial
Intelligence") and the weights digest as the algorithm parameter ``weights_sha256``. The
segmented property is the generic SCT "Tissue"/"Tissue": queries are free text, not coded.

Looked-at-and-absent versus not-looked-at: every query gets its segment in the Segment
Sequence whatever its masks, so a query that was checked is always listed (with its verdict);
a query that was not scored is not in the SEG at all. Frames are written with
``omit_empty_frames=True``, and highdicom 0.28 then drops, per segment, each frame whose mask is
empty: a segment whose masks are all empty or None keeps its Segment Sequence item and has no
frame at all. Readers get zeros for it with highdicom's
``get_pixels_by_source_instance(..., assert_missing_frames_are_empty=True)`` (or
``get_pixels_by_source_frame``). When no segment has any pixel, highdicom cannot omit every
frame (it would warn and write all frames x segments); we then pass it only the first source
frame, so the SEG holds one empty frame per segment at that position.

Only source frames where at least one segment has a pixel are handed to highdicom (with their
plane positions, which it matches back to the source frames), so a long series with small
findings does not need a frames x rows x columns x segments array in memory. Several frames
need a frame of reference (patient coordinates); a multi-frame source must be an enhanced
image (per-frame functional groups): otherwise ValueError, as highdicom cannot place them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from highdicom.spatial import get_image_coordinate_system
from highdicom.utils import get_plane_positions_of_image, get_plane_positions_of_series
from pydicom.sr.codedict import codes

import medisee

VERDICTS = ("present", "absent", "uncertain")
LO_MAX = 64  # DICOM LO value representation: at most 64 characters, no backslash or controls
_LO_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")


@dataclass
class SegmentResult:
    query: str
    verdict: str  # "present" | "absent" | "uncertain"
    masks: list[np.ndarray | None]  # one per source frame; bool H x W; None = no mask


@dataclass
class ModelInfo:
    name: str
    version: str
    sha256: str


def _lo(text: str) -> str:
    return _LO_FORBIDDEN.sub(" ", text).strip()[:LO_MAX]


def _frame_count(sources: Sequence[pydicom.Dataset]) -> int:
    if not sources:
        raise ValueError("build_dicom_seg needs at least one source image")
    if len(sources) == 1:
        return int(sources[0].get("NumberOfFrames", 1) or 1)
    multi = [i for i, ds in enumerate(sources) if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise ValueError(
            f"sources must be single-frame images or ONE multi-frame image; source(s) {multi} "
            "of a series of several datasets have several frames"
        )
    return len(sources)


def _stack(sources: Sequence[pydicom.Dataset], segments: Sequence[SegmentResult]) -> np.ndarray:
    """Masks as (frames, rows, columns, segments) bool; None becomes an empty frame."""
    frames = _frame_count(sources)
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    stack = np.zeros((frames, rows, columns, len(segments)), dtype=bool)
    for s, segment in enumerate(segments):
        if len(segment.masks) != frames:
            raise ValueError(
                f"query {segment.query!r}: {len(segment.masks)} masks for {frames} source frames"
            )
        for f, mask in enumerate(segment.masks):
            if mask is None:
                continue
            if mask.shape != (rows, columns):
                raise ValueError(
                    f"query {segment.query!r}, frame {f}: mask shape {tuple(mask.shape)} does not "
                    f"match the source Rows x Columns ({rows}, {columns})"
                )
            stack[f, :, :, s] = mask.astype(bool, copy=False)
    return stack


def _plane_positions(sources: Sequence[pydicom.Dataset]) -> list:
    if get_image_coordinate_system(sources[0]) is None:
        raise ValueError(
            "the sources have several frames but no frame of reference (FrameOfReferenceUID, "
            "image position): a DICOM SEG cannot place more than one frame"
        )
    if len(sources) > 1:
        return list(get_plane_positions_of_series(sources))
    if "PerFrameFunctionalGroupsSequence" not in sources[0]:
        raise ValueError(
            "the multi-frame source is not an enhanced image (no per-frame functional groups, "
            f"SOP class {sources[0].SOPClassUID}): a DICOM SEG cannot reference its frames"
        )
    return list(get_plane_positions_of_image(sources[0]))


def _segment_descriptions(
    segments: Sequence[SegmentResult], model: ModelInfo
) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(model.name),
        family=codes.cid7162.ArtificialIntelligence,
        version=_lo(model.version),
        source="MediSee",
        parameters={"weights_sha256": model.sha256},
    )
    out = []
    for number, segment in enumerate(segments, start=1):
        if segment.verdict not in VERDICTS:
            raise ValueError(f"query {segment.query!r}: verdict {segment.verdict!r} not in {VERDICTS}")
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_lo(segment.query) or f"query {number}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        description.SegmentDescription = f"verdict={segment.verdict}"
        out.append(description)
    return out


def build_dicom_seg(
    sources: list[pydicom.Dataset],
    segments: list[SegmentResult],
    model: ModelInfo,
    series_number: int = 900,
) -> pydicom.Dataset:
    if not segments:
        raise ValueError("build_dicom_seg needs at least one segment (query)")
    stack = _stack(sources, segments)
    keep = np.flatnonzero(stack.any(axis=(1, 2, 3)))
    has_pixels = keep.size > 0
    if not has_pixels:
        keep = np.array([0])
    plane_positions = None
    if stack.shape[0] > 1:
        positions = _plane_positions(sources)  # also rejects sources highdicom cannot place
        if keep.size < stack.shape[0]:
            plane_positions = [positions[i] for i in keep]
            stack = stack[keep]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(segments, model),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MediSee",
        manufacturer_model_name=_lo(model.name),
        software_versions=_lo(f"{model.version} (medisee {medisee.__version__})"),
        device_serial_number=model.sha256[:16],
        content_description=_lo(f"MediSee reasoning segmentation, {model.name}"),
        content_label="MEDISEE",
        plane_positions=plane_positions,
        # highdicom reverts to all frames (with a warning) when every frame is empty
        omit_empty_frames=has_pixels,
    )
