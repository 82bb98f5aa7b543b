"""DICOM files (single- or multi-frame), optionally labelled.

    <input>/**/*           every file is tried as DICOM (the DICM preamble is not required),
                           except hidden files and NOT_DICOM suffixes
    <input>/labels.json    optional: {"<relative dicom path>": {"<class>": "<mask png path>"}}

Pixels become the model's image as every front end makes them (medisee.data.display): the modality
LUT, the file's own WindowCenter/WindowWidth, else `prepare.ct_window` for CT, else the frame's min-max.
Unlabelled files become image-only rows (inputs for batch scoring). A file whose header says it
decodes to more than max_image_pixels a frame or max_dicom_bytes in all (`medisee.data.bounded`;
the prepare section's fields of those names when it has them) is quarantined as too_large before
its pixel data is decoded. A listed file or label mask that is a symbolic link leaving the input
(or a label path that is absolute or has a `..` part) is quarantined unopened.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np

from medisee import storage
from medisee.data.bounded import Limits, read_dicom, read_stored
from medisee.data.codec import BadRecord
from medisee.data.display import dicom_frames
from medisee.data.records import LoadedImage, LoadedTarget, split_for
from medisee.data.sources.files import locate, outside_input

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
        targets = [_label_target(input_uri, cls, mask) for cls, mask in labels.get(rel, {}).items()]
        spec = {
            "kind": "dicom",
            "image_key": key,
            "image_uri": uri,
            "split": split_for(key, ctx.prepare.val_fraction),
            "targets": targets,
        }
        refused = outside_input(input_uri, rel)  # the listing follows symbolic links
        out.append(spec | ({"image_refused": f"{refused.reason}: {refused.detail}"} if refused else {}))
    return out


def _label_target(input_uri: str, class_name: str, mask: str) -> dict:
    uri, refused = locate(input_uri, mask)
    return {"class_name": class_name, "mask_uri": uri} | ({"mask_refused": refused} if refused else {})


def read_frames(
    data: bytes, ct_window: tuple[float, float], limits: Limits, count: int | None = None
) -> tuple[str, list[np.ndarray]]:
    """The modality and the first `count` frames (all by default) as uint8 H×W×3 (medisee.data.display);
    InputTooLarge when the header says the file is over `limits`."""
    ds = read_dicom(data, limits.max_image_pixels, limits.max_dicom_bytes)
    return str(ds.get("Modality", "ot")).lower(), dicom_frames(ds, ct_window, count)


def load(spec: dict, ctx) -> list[LoadedImage]:
    try:
        if spec.get("image_refused"):
            raise _refused(spec["image_refused"])
        data = read_stored(spec["image_uri"], ctx.settings)
        modality, frames = read_frames(data, ctx.prepare.ct_window, Limits.of(ctx.prepare))
    except BadRecord as err:  # refused from its path, or from its header (too_large)
        return [LoadedImage(spec["image_key"], spec["image_uri"], ctx.modality, spec["split"], err)]
    except Exception as exc:  # pydicom raises many types for damaged / truncated files
        err = BadRecord("unreadable_dicom", f"{type(exc).__name__}: {str(exc)[:200]}")
        return [LoadedImage(spec["image_key"], spec["image_uri"], ctx.modality, spec["split"], err)]
    out = []
    for i, frame in enumerate(frames):
        key = spec["image_key"] if len(frames) == 1 else f"{spec['image_key']}_f{i:03d}"
        targets = []
        if len(frames) == 1:
            for t in spec["targets"]:
                targets.append(LoadedTarget(t["class_name"], _mask(t, ctx), t["mask_uri"]))
        out.append(LoadedImage(key, spec["image_uri"], modality, spec["split"], frame, targets))
    return out


def _mask(target: dict, ctx) -> bytes | BadRecord:
    if target.get("mask_refused"):
        return _refused(target["mask_refused"])
    try:
        return storage.read_bytes(target["mask_uri"], ctx.settings)
    except OSError as exc:
        return BadRecord("missing_mask", str(exc)[:200])


def _refused(why: str) -> BadRecord:
    """The BadRecord of a path `locate` / `outside_input` refused ("reason: detail")."""
    reason, _, detail = why.partition(": ")
    return BadRecord(reason, detail)
