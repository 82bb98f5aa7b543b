"""The shared loader for sources made of image files and per-target mask files.

Spec: {"kind": "file", "image_key", "image_uri", "image_refused"?, "modality", "split",
       "targets": [{"class_name", "mask_uri", "mask_refused"?, "instance", "queries"?, "box"?}],
       "absent_classes": [...]}

A path an index file lists goes through `locate`: one that could reach outside the input (absolute,
a URI, a `..` part, a symbolic link leaving a local input folder) is refused there, carried in the
spec as `*_refused`, and its records are quarantined with that reason; the file is never opened.
"""

from __future__ import annotations

import os

from medisee import storage
from medisee.data.codec import BadRecord, decode_image
from medisee.data.records import LoadedImage, LoadedTarget, Query

UNSAFE_PATH = "unsafe_path"
SYMLINK_OUTSIDE = "symlink_outside_input"


def outside_input(input_uri: str, entry: str) -> BadRecord | None:
    """Why the file `entry` (a path relative to the input `input_uri`) must not be opened, or None:
    an absolute path, a URI, a `..` part, or one resolving outside a local input folder."""
    parts = entry.replace("\\", "/").split("/")
    if not entry or entry.startswith(("/", "\\")) or "://" in entry:
        return BadRecord(UNSAFE_PATH, f"{entry!r}: not a path relative to the input")
    if ".." in parts:
        return BadRecord(UNSAFE_PATH, f"{entry!r}: a '..' part climbs out of the input")
    if storage.is_s3(input_uri):
        return None
    root = os.path.realpath(storage.filesystem(input_uri)[1])
    target = os.path.realpath(os.path.join(root, entry))
    if os.path.commonpath([root, target]) != root:
        return BadRecord(SYMLINK_OUTSIDE, f"{entry!r}: a symbolic link to a file outside the input")
    return None


def locate(input_uri: str, entry: str) -> tuple[str, str | None]:
    """Where an index entry points: (its URI under the input, None), or (the entry, why it is
    refused) for a path `outside_input` refuses."""
    problem = outside_input(input_uri, entry)
    if problem is not None:
        return entry, f"{problem.reason}: {problem.detail}"
    return storage.join(input_uri, entry), None


def file_spec(image_key: str, image_uri: str, modality: str, split: str, targets: list[dict]) -> dict:
    """The spec of one image file and its targets (see the module docstring)."""
    return {
        "kind": "file",
        "image_key": image_key,
        "image_uri": image_uri,
        "modality": modality,
        "split": split,
        "targets": targets,
    }


def indexed_spec(input_uri: str, image_entry: str, image_key: str, modality: str, split: str,
                 targets: list[dict]) -> dict:  # fmt: skip
    """`file_spec` of an image an index file lists (its path relative to the input)."""
    uri, refused = locate(input_uri, image_entry)
    spec = file_spec(image_key, uri, modality, split, targets)
    return spec | ({"image_refused": refused} if refused else {})


def indexed_target(input_uri: str, mask_entry: str, **fields) -> dict:
    """A target whose mask an index file lists (its path relative to the input)."""
    uri, refused = locate(input_uri, mask_entry)
    return {**fields, "mask_uri": uri} | ({"mask_refused": refused} if refused else {})


def _read(uri: str, ctx, reason: str) -> bytes | BadRecord:
    try:
        return storage.read_bytes(uri, ctx.settings)
    except (OSError, FileNotFoundError) as exc:
        return BadRecord(reason, f"{uri}: {str(exc)[:200]}")


def _refused(why: str) -> BadRecord:
    reason, _, detail = why.partition(": ")
    return BadRecord(reason, detail)


def load(spec: dict, ctx) -> list[LoadedImage]:
    refused = spec.get("image_refused")
    raw = _refused(refused) if refused else _read(spec["image_uri"], ctx, "missing_image")
    if isinstance(raw, BadRecord):
        image = raw
    else:
        try:
            image = decode_image(raw)
        except BadRecord as err:
            image = err
    targets = []
    for t in spec.get("targets", []):
        if t.get("mask_refused"):
            mask = _refused(t["mask_refused"])
        else:
            mask = (
                _read(t["mask_uri"], ctx, "missing_mask") if t.get("mask_uri") else BadRecord("missing_mask")
            )
        queries = [Query(**q) for q in t["queries"]] if t.get("queries") else None
        targets.append(
            LoadedTarget(
                class_name=t["class_name"],
                mask=mask,
                input_ref=t.get("mask_uri") or spec["image_uri"],
                instance=int(t.get("instance", 0)),
                queries=queries,
                box=t.get("box"),
            )
        )
    return [
        LoadedImage(
            image_key=spec["image_key"],
            input_ref=spec["image_uri"],
            modality=spec["modality"],
            split=spec["split"],
            image=image,
            targets=targets,
            absent_classes=list(spec.get("absent_classes", [])),
        )
    ]


def with_false_queries(specs: list[dict], ctx) -> list[dict]:
    """Add `absent_classes` to each spec: classes of the same modality not in that image."""
    from medisee.data.records import choose_absent

    vocab: dict[str, set[str]] = {}
    for spec in specs:
        vocab.setdefault(spec["modality"], set()).update(t["class_name"] for t in spec["targets"])
    k = ctx.prepare.false_queries_per_image
    for spec in specs:
        present = {t["class_name"] for t in spec["targets"]}
        spec["absent_classes"] = (
            choose_absent(present, sorted(vocab[spec["modality"]]), k, spec["image_key"]) if k else []
        )
    return specs
