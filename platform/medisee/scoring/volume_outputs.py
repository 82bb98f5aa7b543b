"""Per-series / per-volume outputs of a finished partition: DICOM SEG and NIfTI label volumes.

Queries checked and found absent are kept (an empty segment / a label with 0 voxels and its
verdict), so "looked and absent" differs from "not looked at". A series or volume that cannot be
written (e.g. highdicom cannot place its frames) is reported in the partition's summary, not raised.
"""

from __future__ import annotations

import io
import json

import numpy as np

from medisee import storage
from medisee.data.codec import rle_to_mask


def queries_in_order(results: list[dict]) -> list[str]:
    order: list[str] = []
    for r in sorted(results, key=lambda r: (r["slice_index"] or 0, r["record_id"])):
        if r["query"] not in order:
            order.append(r["query"])
    return order


def overall_verdict(verdicts: list[str]) -> str:
    """Over the slices of a series or volume: present anywhere wins, then uncertain, else absent."""
    for verdict in ("present", "uncertain"):
        if verdict in verdicts:
            return verdict
    return "absent"


def write_dicom_seg(partition: str, results: list[dict], options) -> str:
    import pydicom

    from medisee.scoring.dicom_seg import ModelInfo, SegmentResult, build_dicom_seg

    by_source: dict[str, dict[str, dict]] = {}
    for r in results:
        by_source.setdefault(r["source"], {})[r["query"]] = r  # single-frame sources: one row per query
    sources = sorted(by_source, key=lambda uri: next(iter(by_source[uri].values()))["slice_index"] or 0)
    datasets = [pydicom.dcmread(io.BytesIO(storage.read_bytes(uri, options.settings))) for uri in sources]
    segments = []
    for query in queries_in_order(results):
        rows = [by_source[uri].get(query) for uri in sources]
        masks = [rle_to_mask(r["mask_rle"]) if r and r["mask_rle"] else None for r in rows]
        segments.append(SegmentResult(query, overall_verdict([r["verdict"] for r in rows if r]), masks))
    info = options.model_info
    name = f"{partition.removeprefix('dicom-')}.dcm"  # the key is unique and file-name safe
    try:
        seg = build_dicom_seg(
            datasets,
            segments,
            ModelInfo(info.get("name") or "medisee", info.get("version") or "", info.get("sha256") or ""),
        )
    except ValueError as exc:
        return f"not written: {exc}"
    buffer = io.BytesIO()
    seg.save_as(buffer)
    storage.write_bytes(storage.join(options.output, "dicom_seg", name), buffer.getvalue(), options.settings)
    return f"dicom_seg/{name}"


def write_nifti_labels(partition: str, results: list[dict], options) -> str:
    from scipy import ndimage

    from medisee.scoring.decode import load_nifti
    from medisee.scoring.nifti_labels import build_label_volume

    source = results[0]["source"]
    reference = load_nifti(storage.read_bytes(source, options.settings))
    axis = options.slice_axis
    in_plane = [s for i, s in enumerate(reference.shape[:3]) if i != axis]
    display_hw = (in_plane[1], in_plane[0])  # rot90 of the (first, second) in-plane axes
    queries = queries_in_order(results)
    labels, slice_masks = [], {}
    for label, query in enumerate(queries, 1):
        rows = [r for r in results if r["query"] == query]
        labels.append(
            {"label": label, "query": query, "verdict": overall_verdict([r["verdict"] for r in rows])}
        )
        for r in rows:
            if not r["mask_rle"]:
                continue
            mask = rle_to_mask(r["mask_rle"])
            if mask.shape != display_hw:  # scored after resampling to square pixels
                zoom = (display_hw[0] / mask.shape[0], display_hw[1] / mask.shape[1])
                mask = ndimage.zoom(mask.astype(np.uint8), zoom, order=0).astype(bool)
            slice_masks.setdefault(r["slice_index"], {})[label] = mask
    data, sidecar = build_label_volume(reference, axis, labels, slice_masks)
    sidecar["source"] = source
    base = partition.removeprefix("nifti-")  # the key is unique and file-name safe
    storage.write_bytes(
        storage.join(options.output, "nifti_labels", f"{base}.nii.gz"), data, options.settings
    )
    storage.write_bytes(
        storage.join(options.output, "nifti_labels", f"{base}.json"),
        json.dumps(sidecar, indent=2).encode(),
        options.settings,
    )
    return f"nifti_labels/{base}.nii.gz"
