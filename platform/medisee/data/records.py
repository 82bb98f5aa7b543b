"""Turn a loaded image and its targets into shard rows or quarantine rows.

Every candidate record becomes exactly one output row: a shard row, or a quarantine row
carrying the reason. That is what makes `input = written + quarantined` hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from medisee.data import prompts
from medisee.data.codec import BadRecord, check_mask, decode_mask_png, encode_png, mask_box, mask_to_rle
from medisee.data.schema import empty_row

NORMALIZED = "normalized"  # the key of a source box given relative to the image size


@dataclass
class Query:
    kind: str
    text: str
    answer: str
    explanation: str | None = None


@dataclass
class LoadedTarget:
    class_name: str
    mask: np.ndarray | bytes | BadRecord  # bool/uint8 array, PNG bytes, or why it failed to load
    input_ref: str
    instance: int = 0
    queries: list[Query] | None = None  # None: one referring query from the templates
    # given by the source (else computed from the mask): pixel xyxy, or {NORMALIZED: xyxy in [0, 1]}
    # for a source that gives boxes relative to the image size, scaled here once the image is read
    box: list[float] | dict | None = None


@dataclass
class LoadedImage:
    image_key: str
    input_ref: str
    modality: str
    split: str
    image: np.ndarray | BadRecord
    targets: list[LoadedTarget] = field(default_factory=list)
    absent_classes: list[str] = field(default_factory=list)


def target_box(box: list[float] | dict | None, mask: np.ndarray, height: int, width: int) -> list[float]:
    """The pixel xyxy box of a row: the source's (a normalised one times the image's width and
    height), else the mask's inclusive box (`mask_box`)."""
    if not box:
        return mask_box(mask)
    if isinstance(box, dict):
        x0, y0, x1, y1 = (float(v) for v in box[NORMALIZED])
        return [x0 * width, y0 * height, x1 * width, y1 * height]
    return [float(v) for v in box]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


def record_id(source: str, image_key: str, class_name: str, instance: int | str, kind: str) -> str:
    inst = f"{instance:03d}" if isinstance(instance, int) else instance
    return f"{source}/{image_key}/{slug(class_name)}/{inst}/{kind}"


def _quarantine(rid: str, source: str, input_ref: str, err: BadRecord) -> dict:
    row = empty_row()
    row.update(record_id=rid, source=source, input_ref=input_ref, reason=err.reason, detail=err.detail)
    return row


def _target_queries(
    source: str, image_key: str, target: LoadedTarget, for_eval: bool
) -> list[tuple[str, Query]]:
    queries = target.queries
    if queries is None:
        key = record_id(source, image_key, target.class_name, target.instance, "referring")
        text, answer = prompts.referring(target.class_name, key, for_eval)
        queries = [Query("referring", text, answer)]
    return [(record_id(source, image_key, target.class_name, target.instance, q.kind), q) for q in queries]


def rows_for_image(source: str, loaded: LoadedImage, mask_format: str = "png") -> list[dict]:
    """All output rows (shard or quarantine) for one image."""
    out: list[dict] = []
    for_eval = prompts.is_eval_split(loaded.split)
    candidates = [
        (t, rid, q)
        for t in loaded.targets
        for rid, q in _target_queries(source, loaded.image_key, t, for_eval)
    ]
    false_ids = [
        (name, record_id(source, loaded.image_key, name, "absent", "false_query"))
        for name in loaded.absent_classes
    ]

    if isinstance(loaded.image, BadRecord):
        ids = [(rid, t.input_ref) for t, rid, _ in candidates] + [
            (rid, loaded.input_ref) for _, rid in false_ids
        ]
        if not ids:
            ids = [(record_id(source, loaded.image_key, "image", "all", "image_only"), loaded.input_ref)]
        return [_quarantine(rid, source, ref, loaded.image) for rid, ref in ids]

    image = loaded.image
    height, width = image.shape[:2]
    base = empty_row()
    base.update(
        image_id=f"{source}/{loaded.image_key}",
        source=source,
        modality=loaded.modality,
        image_png=encode_png(image),
        height=height,
        width=width,
        split=loaded.split,
    )

    checked: dict[int, tuple[np.ndarray | None, BadRecord | None]] = {}
    for target, rid, query in candidates:
        if id(target) not in checked:
            try:
                checked[id(target)] = (_checked_mask(target.mask, (height, width)), None)
            except BadRecord as err:
                checked[id(target)] = (None, err)
        mask, err = checked[id(target)]
        if err is not None:
            out.append(_quarantine(rid, source, target.input_ref, err))
            continue
        row = dict(base)
        row.update(
            record_id=rid,
            input_ref=target.input_ref,
            class_name=prompts.class_text(target.class_name),
            box=target_box(target.box, mask, height, width),
            query=query.text,
            answer=query.answer,
            query_kind=query.kind,
            explanation=query.explanation,
        )
        if mask_format == "rle":
            row["mask_rle"] = mask_to_rle(mask)
        else:
            row["mask_png"] = encode_png(mask.astype(np.uint8) * 255)
        out.append(row)

    for name, rid in false_ids:
        text, answer = prompts.false_query(name, rid, for_eval)
        row = dict(base)
        row.update(
            record_id=rid,
            input_ref=loaded.input_ref,
            class_name=prompts.class_text(name),
            query=text,
            answer=answer,
            query_kind="false_query",
        )
        out.append(row)

    if not candidates and not false_ids:
        row = dict(base)
        row.update(
            record_id=record_id(source, loaded.image_key, "image", "all", "image_only"),
            input_ref=loaded.input_ref,
            query_kind="image_only",
        )
        out.append(row)
    return out


def _checked_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(mask, BadRecord):
        raise mask
    if isinstance(mask, bytes | bytearray):
        return decode_mask_png(bytes(mask), shape)
    return check_mask(np.asarray(mask), shape)


def choose_absent(present: set[str], vocabulary: list[str], k: int, key: str) -> list[str]:
    """k classes of the vocabulary absent from the image, chosen reproducibly."""
    pool = sorted(c for c in vocabulary if c not in present)
    chosen: list[str] = []
    for i in range(min(k, len(pool))):
        name = prompts.pick(pool, f"{key}/absent/{i}")
        pool.remove(name)
        chosen.append(name)
    return chosen


def split_for(key: str, val_fraction: float) -> str:
    digest = prompts.pick(range(10_000), key + "/split")
    return "val" if digest < val_fraction * 10_000 else "train"
