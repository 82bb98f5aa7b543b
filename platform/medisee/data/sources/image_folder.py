"""A plain folder of images, optionally with masks.

    images/<stem>.(png|jpg|jpeg|bmp|tif|tiff)
    masks/<stem>/<class>[_NNN].png          (optional; absent -> image-only rows for scoring)

The modality is `prepare.modality` (default `unknown`) unless the folder has a
`modality.txt`.
"""

from __future__ import annotations

import posixpath

from medisee import storage
from medisee.data.records import split_for
from medisee.data.sources.files import file_spec, with_false_queries
from medisee.data.sources.sam_med2d_demo import INSTANCE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def specs(input_uri: str, ctx):
    modality = ctx.modality
    modality_uri = storage.join(input_uri, "modality.txt")
    if storage.exists(modality_uri, ctx.settings):
        modality = storage.read_text(modality_uri, ctx.settings).strip().lower() or modality
    masks_by_stem: dict[str, list[str]] = {}
    masks_root = storage.join(input_uri, "masks")
    for uri in storage.list_files(masks_root, (".png",), ctx.settings):
        stem = posixpath.basename(posixpath.dirname(uri))
        masks_by_stem.setdefault(stem, []).append(uri)
    out = []
    for uri in storage.list_files(storage.join(input_uri, "images"), IMAGE_SUFFIXES, ctx.settings):
        stem = posixpath.splitext(posixpath.basename(uri))[0]
        targets = []
        for mask_uri in sorted(masks_by_stem.get(stem, [])):
            name = posixpath.splitext(posixpath.basename(mask_uri))[0]
            match = INSTANCE.search(name)
            targets.append(
                {
                    "class_name": name[: match.start()] if match else name,
                    "mask_uri": mask_uri,
                    "instance": int(match[1]) if match else 0,
                }
            )
        out.append(file_spec(stem, uri, modality, split_for(stem, ctx.prepare.val_fraction), targets))
    return with_false_queries(out, ctx)
