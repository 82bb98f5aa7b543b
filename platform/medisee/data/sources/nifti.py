"""NIfTI volumes with label maps, sliced into 2D images.

    <input>/index.json
      {"volumes": [{"image": "ct.nii.gz", "label": "seg.nii.gz", "modality": "ct",
                    "classes": {"1": "spleen", ...}  |  "classes": "class_map.json#total"}]}

Paths are relative to the index (or absolute / s3://). Each slice along `prepare.slice_axis`
becomes an image as every front end makes it (medisee.data.display): CT is windowed
(`prepare.ct_window`, HU), other modalities are scaled between the 0.5th and 99.5th percentile of the
volume, and a volume of unknown modality reaching down to air is taken as CT. Each label present in a slice is one
target; classes of the map absent from that slice feed the false queries. A volume whose header
says it is over max_volume_bytes, or whose slices are over max_image_pixels (`medisee.data.bounded`;
the prepare section's fields of those names when it has them), is quarantined as too_large before
its data is inflated; a .nii.gz is inflated no further than its header implies.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np

from medisee import storage
from medisee.data.bounded import Limits, read_nifti_image, read_stored
from medisee.data.codec import BadRecord
from medisee.data.display import slice_image, volume_slice, volume_window
from medisee.data.records import LoadedImage, LoadedTarget, choose_absent, split_for


def _resolve(base_uri: str, path: str) -> str:
    return path if path.startswith(("s3://", "/", "file://")) else storage.join(base_uri, path)


def _classes(entry, base_uri: str, ctx) -> dict[int, str]:
    classes = entry.get("classes", {})
    if isinstance(classes, str):
        path, _, key = classes.partition("#")
        classes = json.loads(storage.read_text(_resolve(base_uri, path), ctx.settings))
        if key:
            classes = classes[key]
    return {int(k): str(v) for k, v in classes.items() if int(k) != 0}


def specs(input_uri: str, ctx):
    index_uri = input_uri if input_uri.endswith(".json") else storage.join(input_uri, "index.json")
    base = (
        posixpath.dirname(index_uri)
        if storage.is_s3(index_uri)
        else str(__import__("pathlib").Path(index_uri).parent)
    )
    index = json.loads(storage.read_text(index_uri, ctx.settings))
    out = []
    for entry in index["volumes"]:
        image_uri = _resolve(base, entry["image"])
        stem = posixpath.basename(image_uri).split(".nii")[0]
        out.append(
            {
                "kind": "nifti",
                "image_key": stem,
                "image_uri": image_uri,
                "label_uri": _resolve(base, entry["label"]) if entry.get("label") else None,
                "modality": entry.get("modality", ctx.modality).lower(),
                "classes": {str(k): v for k, v in _classes(entry, base, ctx).items()},
                "split": entry.get("split") or split_for(stem, ctx.prepare.val_fraction),
            }
        )
    return out


def read_volume(uri: str, ctx) -> np.ndarray:
    """The volume's data; InputTooLarge when its header is over the prepare section's limits."""
    limits = Limits.of(ctx.prepare)
    data = read_stored(uri, ctx.settings)  # as stored: inflated here, within the header's bound
    image = read_nifti_image(data, limits.max_volume_bytes, limits.max_image_pixels, ctx.prepare.slice_axis)
    return np.asanyarray(image.dataobj)


def load(spec: dict, ctx) -> list[LoadedImage]:
    axis = ctx.prepare.slice_axis
    try:
        volume = read_volume(spec["image_uri"], ctx).astype(np.float32)
        labels = read_volume(spec["label_uri"], ctx).astype(np.int32) if spec.get("label_uri") else None
        if labels is not None and labels.shape != volume.shape:
            raise BadRecord("mask_shape_mismatch", f"label {labels.shape} vs volume {volume.shape}")
    except BadRecord as err:
        return [_bad(spec, err)]
    except Exception as exc:  # nibabel raises many types for damaged files
        return [_bad(spec, BadRecord("unreadable_volume", f"{type(exc).__name__}: {str(exc)[:200]}"))]

    window = volume_window(volume, spec["modality"], ctx.prepare.ct_window)
    classes = {int(k): v for k, v in spec["classes"].items()}
    k = ctx.prepare.false_queries_per_image
    out = []
    for index in range(volume.shape[axis]):
        image = slice_image(volume, axis, index, window)
        key = f"{spec['image_key']}_{'xyz'[axis]}{index:03d}"
        targets, present = [], set()
        if labels is not None:
            label_slice = volume_slice(labels, axis, index)
            for label_id in np.unique(label_slice):
                if label_id == 0:
                    continue
                name = classes.get(int(label_id), f"label {int(label_id)}")
                present.add(name)
                targets.append(
                    LoadedTarget(
                        class_name=name,
                        mask=label_slice == label_id,
                        input_ref=f"{spec['label_uri']}#{'xyz'[axis]}={index},label={int(label_id)}",
                    )
                )
        absent = (
            choose_absent(present, sorted(classes.values()), k, key) if (k and labels is not None) else []
        )
        out.append(
            LoadedImage(
                image_key=key,
                input_ref=f"{spec['image_uri']}#{'xyz'[axis]}={index}",
                modality=spec["modality"],
                split=spec["split"],
                image=image,
                targets=targets,
                absent_classes=absent,
            )
        )
    return out


def _bad(spec: dict, err: BadRecord) -> LoadedImage:
    return LoadedImage(spec["image_key"], spec["image_uri"], spec["modality"], spec["split"], err)
