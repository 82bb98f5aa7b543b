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
from medisee.data.sources.files import indexed_spec, indexed_target, with_false_queries
from medisee.data.sources.sam_med2d_demo import INSTANCE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def specs(input_uri: str, ctx):
    modality = ctx.modality
    modality_uri = storage.join(input_uri, "modality.txt")
    if storage.exists(modality_uri, ctx.settings):
        modality = storage.read_text(modality_uri, ctx.settings).strip().lower() or modality
    masks_by_stem: dict[str, list[str]] = {}
    for rel in listed(input_uri, "masks", (".png",), ctx):
        stem = posixpath.basename(posixpath.dirname(rel))
        masks_by_stem.setdefault(stem, []).append(rel)
    out = []
    for rel in listed(input_uri, "images", IMAGE_SUFFIXES, ctx):
        stem = posixpath.splitext(posixpath.basename(rel))[0]
        targets = []
        for mask_rel in sorted(masks_by_stem.get(stem, [])):
            name = posixpath.splitext(posixpath.basename(mask_rel))[0]
            match = INSTANCE.search(name)
            targets.append(
                indexed_target(
                    input_uri,
                    mask_rel,
                    class_name=name[: match.start()] if match else name,
                    instance=int(match[1]) if match else 0,
                )
            )
        split = split_for(stem, ctx.prepare.val_fraction)
        out.append(indexed_spec(input_uri, rel, stem, modality, split, targets))
    return with_false_queries(out, ctx)


def listed(input_uri: str, folder: str, suffixes: tuple[str, ...], ctx) -> list[str]:
    """Files under `<input>/<folder>`, as paths relative to the input (a listing follows symbolic
    links, so `locate` still checks where each one leads)."""
    root = storage.join(input_uri, folder)
    return [
        posixpath.join(folder, posixpath.relpath(uri, root))
        for uri in storage.list_files(root, suffixes, ctx.settings)
    ]
