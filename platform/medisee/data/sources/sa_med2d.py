"""SA-Med2D-20M release layout.

    SAMed2Dv1/
      images/ct_00--AbdomenCT1K--Case_00011--x_0040.png
      masks/ct_00--AbdomenCT1K--Case_00011--x_0040--0003_000.png
      SAMed2D_v1.json                      {"images/<name>.png": ["masks/<name>--0003_000.png", ...]}
      SAMed2D_v1_class_mapping_id.json     mask name -> class, or class -> [mask names]

Index paths are relative to the release folder (see `files.locate`).
The modality is the image name's prefix (`ct_00` -> `ct`); the instance index is the
mask name's trailing `_NNN`. Queries: the referring templates.
"""

from __future__ import annotations

import json
import posixpath
import re

from medisee import storage
from medisee.data.records import split_for
from medisee.data.sources.files import indexed_spec, indexed_target, with_false_queries

INDEX_NAME = "SAMed2D_v1.json"
MASK_SUFFIX = re.compile(r"--(?P<cls>\d+)_(?P<inst>\d+)\.png$")


def _find(input_uri: str, ctx, name_part: str) -> str:
    for uri in storage.list_files(input_uri, (".json",), ctx.settings):
        if name_part in posixpath.basename(uri):
            return uri
    raise FileNotFoundError(f"no *{name_part}*.json under {input_uri}")


def load_class_mapping(text: str) -> dict[str, str]:
    """mask basename -> class name, from either orientation of the mapping file."""
    raw = json.loads(text)
    mapping: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, list):
            for mask in value:
                mapping[posixpath.basename(mask)] = key
        else:
            mapping[posixpath.basename(key)] = str(value)
    return mapping


def modality_of(image_name: str) -> str:
    prefix = posixpath.basename(image_name).split("--", 1)[0]
    return prefix.split("_", 1)[0].lower() or "unknown"


def specs(input_uri: str, ctx):
    index = json.loads(storage.read_text(storage.join(input_uri, INDEX_NAME), ctx.settings))
    mapping = load_class_mapping(storage.read_text(_find(input_uri, ctx, "class_mapping"), ctx.settings))
    out = []
    for image_rel, masks in index.items():
        key = posixpath.splitext(posixpath.basename(image_rel))[0]
        targets = []
        for mask_rel in masks:
            name = posixpath.basename(mask_rel)
            match = MASK_SUFFIX.search(name)
            targets.append(
                indexed_target(
                    input_uri,
                    mask_rel,
                    class_name=mapping.get(name, f"class {match['cls']}" if match else "unknown"),
                    instance=int(match["inst"]) if match else 0,
                )
            )
        out.append(
            indexed_spec(
                input_uri,
                image_rel,
                key,
                modality_of(image_rel),
                split_for(key, ctx.prepare.val_fraction),
                targets,
            )
        )
    return with_false_queries(out, ctx)
