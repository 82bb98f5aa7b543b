"""The SAM-Med2D demo layout (`data_demo/`).

    images/<case>_<slice>.png
    masks/<image stem>_<class name>_<NNN>.png
    image2label_train.json   {"data_demo/images/X.png": ["data_demo/masks/X_cls_000.png", ...]}
    label2image_test.json    {"data_demo/masks/X_cls_000.png": "data_demo/images/X.png"}

Paths in the JSON start with the repository folder name; only the part after it is used, and it
must stay inside the input (see `files.locate`).
Class names may contain underscores, so a mask name is parsed by removing the image stem
and the trailing `_NNN`. Images referenced by neither file become image-only rows.
"""

from __future__ import annotations

import json
import posixpath
import re

from medisee import storage
from medisee.data.sources.files import indexed_spec, indexed_target, with_false_queries

INSTANCE = re.compile(r"_(\d{3})$")
AMOS_ID = re.compile(r"^amos_(\d+)_")


def _relative(path: str) -> str:
    """`data_demo/images/x.png` -> `images/x.png`."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part in ("images", "masks"):
            return "/".join(parts[i:])
    return path


def modality_of(stem: str) -> str:
    """AMOS ids 500 and above are MR scans; the rest of the demo is CT."""
    match = AMOS_ID.match(stem)
    return "mr" if match and int(match[1]) >= 500 else "ct"


def parse_mask_name(mask_name: str, image_stem: str) -> tuple[str, int]:
    stem = posixpath.splitext(posixpath.basename(mask_name))[0]
    if not stem.startswith(image_stem + "_"):
        raise ValueError(f"mask {mask_name} does not belong to image {image_stem}")
    rest = stem[len(image_stem) + 1 :]
    match = INSTANCE.search(rest)
    return (rest[: match.start()], int(match[1])) if match else (rest, 0)


def specs(input_uri: str, ctx):
    groups: dict[str, tuple[str, list[str]]] = {}
    train_uri = storage.join(input_uri, "image2label_train.json")
    test_uri = storage.join(input_uri, "label2image_test.json")
    if storage.exists(train_uri, ctx.settings):
        for image, masks in json.loads(storage.read_text(train_uri, ctx.settings)).items():
            groups[_relative(image)] = ("train", [_relative(m) for m in masks])
    if storage.exists(test_uri, ctx.settings):
        for mask, image in json.loads(storage.read_text(test_uri, ctx.settings)).items():
            groups.setdefault(_relative(image), ("test", []))[1].append(_relative(mask))
    for uri in storage.list_files(storage.join(input_uri, "images"), (".png", ".jpg", ".jpeg"), ctx.settings):
        groups.setdefault("images/" + posixpath.basename(uri), ("train", []))

    out = []
    for image_rel, (split, masks) in sorted(groups.items()):
        stem = posixpath.splitext(posixpath.basename(image_rel))[0]
        targets = []
        for mask_rel in sorted(masks):
            class_name, instance = parse_mask_name(mask_rel, stem)
            targets.append(indexed_target(input_uri, mask_rel, class_name=class_name, instance=instance))
        out.append(indexed_spec(input_uri, image_rel, stem, modality_of(stem), split, targets))
    return with_false_queries([s for s in out if s["targets"]], ctx) + [s for s in out if not s["targets"]]
