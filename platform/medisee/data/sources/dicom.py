"""DICOM files (single- or multi-frame), optionally labelled.

    <input>/**/*           every file is tried as DICOM (the DICM preamble is not required),
                           except hidden files and NOT_DICOM suffixes
    <input>/labels.json    optional: {"<relative dicom path>": {"<class>": "<mask png path>"}}

Pixel values go through the modality LUT (rescale slope/intercept); the display window is the
file's own WindowCenter/WindowWidth, else `prepare.ct_window` for CT, else the frame's min-max.
Unlabelled files become image-only rows (inputs for batch scoring).
"""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np

from medisee import storage
from medisee.data.codec import BadRecord, as_rgb, window_to_uint8
from medisee.data.records import LoadedImage, LoadedTarget, split_for

NOT_DICOM = (".png", ".jpg", ".jpeg", ".json", ".txt", ".md", ".csv")


def specs(input_uri: str, ctx):
    labels_uri = storage.join(input_uri, "labels.json")
    labels = {}
    if storage.exists(labels_uri, ctx.settings):
        labels = json.loads(storage.read_text(labels_uri, ctx.settings))
    out = []
    root = input_uri.rstrip("/")
    for uri in storage.list_files(input_uri, (), ctx.settings):
        rel = uri[len(root) + 1 :] if uri.startswith(root) else posixpath.basename(uri)
        if rel.lower().endswith(NOT_DICOM) or posixpath.basename(rel).startswith("."):
            continue
        key = (
            rel.replace("/", "_").rsplit(".", 1)[0] if rel.lower().endswith(".dcm") else rel.replace("/", "_")
        )
        targets = [
            {"class_name": cls, "mask_uri": storage.join(input_uri, mask)}
            for cls, mask in labels.get(rel, {}).items()
        ]
        out.append(
            {
                "kind": "dicom",
                "image_key": key,
                "image_uri": uri,
                "split": split_for(key, ctx.prepare.val_fraction),
                "targets": targets,
            }
        )
    return out


def _window(ds, frame: np.ndarray, ctx) -> tuple[float, float]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        if width > 1:
            return center - width / 2, center + width / 2
    if str(ds.get("Modality", "")).upper() == "CT":
        return ctx.prepare.ct_window
    return float(frame.min()), float(frame.max())


def read_frames(data: bytes, ctx) -> tuple[str, list[np.ndarray]]:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    frames_count = int(ds.get("NumberOfFrames", 1) or 1)
    if str(ds.get("PhotometricInterpretation", "")).startswith("RGB") or (
        pixels.ndim == 3 and pixels.shape[-1] == 3 and frames_count == 1
    ):
        frames = [pixels] if frames_count == 1 else list(pixels)
        return str(ds.get("Modality", "ot")).lower(), [np.clip(f, 0, 255).astype(np.uint8) for f in frames]
    frames = list(pixels) if frames_count > 1 else [pixels]
    out = []
    for frame in frames:
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            frame = frame.max() - frame
        low, high = _window(ds, frame, ctx)
        out.append(as_rgb(window_to_uint8(frame, low, high)))
    return str(ds.get("Modality", "ot")).lower(), out


def load(spec: dict, ctx) -> list[LoadedImage]:
    try:
        modality, frames = read_frames(storage.read_bytes(spec["image_uri"], ctx.settings), ctx)
    except Exception as exc:  # pydicom raises many types for damaged / truncated files
        err = BadRecord("unreadable_dicom", f"{type(exc).__name__}: {str(exc)[:200]}")
        return [LoadedImage(spec["image_key"], spec["image_uri"], ctx.modality, spec["split"], err)]
    out = []
    for i, frame in enumerate(frames):
        key = spec["image_key"] if len(frames) == 1 else f"{spec['image_key']}_f{i:03d}"
        targets = []
        if len(frames) == 1:
            for t in spec["targets"]:
                try:
                    mask = storage.read_bytes(t["mask_uri"], ctx.settings)
                except OSError as exc:
                    mask = BadRecord("missing_mask", str(exc)[:200])
                targets.append(LoadedTarget(t["class_name"], mask, t["mask_uri"]))
        out.append(LoadedImage(key, spec["image_uri"], modality, spec["split"], frame, targets))
    return out
