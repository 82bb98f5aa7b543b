"""One NIfTI-1 label volume per scored volume, on the exact grid of the input.

Masks arrive per slice in display orientation (`medisee.data.display.to_display`) and
are rotated back onto the voxel grid with `from_display`, its inverse. The output has the
reference's shape[:3], affine, qform/sform (matrices and codes), voxel sizes and spatial unit,
intent NIFTI_INTENT_LABEL, uint8 (uint16 from label 256 up), gzip-compressed. Where masks
of several labels overlap, the label listed LATER in `labels` wins. Voxel counts in the sidecar
are taken from the final volume, so they already reflect overwrites.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from medisee.data.display import to_display

if TYPE_CHECKING:
    import nibabel

MAX_LABEL = int(np.iinfo(np.uint16).max)


def from_display(display: np.ndarray) -> np.ndarray:
    """Inverse of `to_display`: image rows/columns back to voxel (i, j) axes."""
    return np.ascontiguousarray(np.rot90(display, k=-1))


def _check_labels(labels: Sequence[dict]) -> list[int]:
    ids = [int(entry["label"]) for entry in labels]
    bad = [i for i in ids if not 1 <= i <= MAX_LABEL]
    if bad:
        raise ValueError(f"labels must be in 1..{MAX_LABEL}, got {bad}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate label ids in {ids}")
    return ids


def _paint(
    volume: np.ndarray,
    axis: int,
    order: Sequence[int],
    slice_masks: Mapping[int, Mapping[int, np.ndarray]],
) -> None:
    slices = np.moveaxis(volume, axis, 0)  # a view: writing into it writes into volume
    display_shape = to_display(slices[0]).shape
    known = set(order)
    for index, masks in slice_masks.items():
        if not 0 <= int(index) < slices.shape[0]:
            raise ValueError(f"slice index {index} outside 0..{slices.shape[0] - 1} along axis {axis}")
        unknown = set(masks) - known
        if unknown:
            raise ValueError(f"slice {index}: masks for labels {sorted(unknown)} not listed in labels")
        for label in order:  # listed order: later labels overwrite earlier ones
            mask = masks.get(label)
            if mask is None:
                continue
            if mask.shape != display_shape:
                raise ValueError(
                    f"slice {index}, label {label}: mask shape {tuple(mask.shape)} does not match the "
                    f"display slice shape {display_shape}"
                )
            slices[int(index)][from_display(mask.astype(bool, copy=False))] = label


def _image(reference: nibabel.Nifti1Image, volume: np.ndarray) -> nibabel.Nifti1Image:
    import nibabel as nib

    ref = reference.header
    image = nib.Nifti1Image(volume, reference.affine)
    header = image.header
    header.set_data_dtype(volume.dtype)
    header.set_zooms(tuple(float(z) for z in ref.get_zooms()[:3]))
    header.set_xyzt_units(xyz=ref.get_xyzt_units()[0])
    image.set_qform(ref.get_qform(), code=int(ref["qform_code"]))
    image.set_sform(ref.get_sform(), code=int(ref["sform_code"]))
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, int(volume.max())
    return image


def build_label_volume(
    reference: nibabel.Nifti1Image,
    axis: int,
    labels: list[dict],
    slice_masks: dict[int, dict[int, np.ndarray]],
) -> tuple[bytes, dict]:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    shape = tuple(int(n) for n in reference.shape[:3])
    order = _check_labels(labels)
    dtype = np.uint8 if max(order, default=0) < 256 else np.uint16
    volume = np.zeros(shape, dtype=dtype)
    _paint(volume, axis, order, slice_masks)
    data = gzip.compress(_image(reference, volume).to_bytes(), compresslevel=6, mtime=0)
    sidecar = {
        "labels": [
            {
                "label": label,
                "query": str(entry["query"]),
                "verdict": str(entry["verdict"]),
                "voxels": int(np.count_nonzero(volume == label)),
            }
            for label, entry in zip(order, labels, strict=True)
        ],
        "axis": axis,
        "source_shape": list(shape),
    }
    return data, sidecar
