"""The shared loader for sources made of image files and per-target mask files.

Spec: {"kind": "file", "image_key", "image_uri", "modality", "split",
       "targets": [{"class_name", "mask_uri", "instance", "queries"?, "box"?}],
       "absent_classes": [...]}
"""

from __future__ import annotations

from medisee import storage
from medisee.data.codec import BadRecord, decode_image
from medisee.data.records import LoadedImage, LoadedTarget, Query


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


def _read(uri: str, ctx, reason: str) -> bytes | BadRecord:
    try:
        return storage.read_bytes(uri, ctx.settings)
    except (OSError, FileNotFoundError) as exc:
        return BadRecord(reason, f"{uri}: {str(exc)[:200]}")


def load(spec: dict, ctx) -> list[LoadedImage]:
    raw = _read(spec["image_uri"], ctx, "missing_image")
    if isinstance(raw, BadRecord):
        image = raw
    else:
        try:
            image = decode_image(raw)
        except BadRecord as err:
            image = err
    targets = []
    for t in spec.get("targets", []):
        mask = _read(t["mask_uri"], ctx, "missing_mask") if t.get("mask_uri") else BadRecord("missing_mask")
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
