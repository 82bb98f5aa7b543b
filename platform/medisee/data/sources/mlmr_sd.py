"""MLMR-SD: reasoning queries over SA-Med2D-20M images.

    <input>/
      train.json      {"images/<name>.png": {"masks/<mask>.png": "<class>", ...}, ...}
      prompts.json    {"<class>": {"long": [...], "short": [...],
                                   "long_explanation": [...], "short_explanation": [...]}}
      test.jsonl      {"image", "mask", "class_text", "long", "short", "bbox"} per line

Index paths are relative to the input folder (see `files.locate`).
A test `bbox` is [x0, y0, x1, y1] normalised by the image's width and height (the reference
compares it with its normalised predictions); rows store it in pixels. A test item whose box is
not such a box is quarantined.
Each training target gives a long and a short reasoning query, picked reproducibly from
the class's pools (a query and its explanation share the same index when the pools align).
"""

from __future__ import annotations

import json
import math
import posixpath

from medisee import storage
from medisee.data import prompts
from medisee.data.records import NORMALIZED, record_id, split_for
from medisee.data.sources.files import indexed_spec, indexed_target, with_false_queries
from medisee.data.sources.sa_med2d import MASK_SUFFIX, modality_of


def _pooled(pool: dict, length: str, key: str, for_eval: bool) -> dict | None:
    questions = pool.get(length) or []
    if not questions:
        return None
    i = prompts.pick(range(len(questions)), key)
    explanations = pool.get(f"{length}_explanation") or []
    if explanations:
        explanation = (
            explanations[i] if len(explanations) == len(questions) else prompts.pick(explanations, key + "/e")
        )
    else:
        explanation = None
    question, answer = prompts.reasoning(questions[i], explanation, key, for_eval)
    return {"kind": f"reasoning_{length}", "text": question, "answer": answer, "explanation": explanation}


def _test_query(text: str, length: str, key: str) -> dict:
    question, answer = prompts.reasoning(text, None, key, for_eval=True)
    return {"kind": f"reasoning_{length}", "text": question, "answer": answer}


def _reasoning_queries(pools: dict, class_name: str, key: str, for_eval: bool) -> list[dict] | None:
    pool = pools.get(class_name)
    if not pool:
        return None
    pooled = (
        _pooled(pool, "long", key + "/long", for_eval),
        _pooled(pool, "short", key + "/short", for_eval),
    )
    queries = [q for q in pooled if q]
    return queries or None


def _test_box(raw) -> tuple[dict | None, str | None]:
    """A test.jsonl `bbox` as a normalised target box, or why it is refused ("reason: detail")."""
    if not raw:
        return None, None  # no box given: the mask's box is used
    shown = repr(raw)[:120]
    if not isinstance(raw, list | tuple) or len(raw) != 4 or not all(_is_number(v) for v in raw):
        return None, f"bad_box: {shown} is not four numbers [x0, y0, x1, y1]"
    x0, y0, x1, y1 = (float(v) for v in raw)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        return None, (
            f"box_not_normalized: {shown} has a coordinate outside [0, 1]; MLMR-SD test boxes are "
            "[x0, y0, x1, y1] divided by the image's width and height, not pixels"
        )
    if x1 < x0 or y1 < y0:
        return None, f"bad_box: {shown} has x1 < x0 or y1 < y0"
    return {NORMALIZED: [x0, y0, x1, y1]}, None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _instance(mask_rel: str) -> int:
    match = MASK_SUFFIX.search(posixpath.basename(mask_rel))
    return int(match["inst"]) if match else 0


def specs(input_uri: str, ctx):
    files = {
        posixpath.basename(u): u for u in storage.list_files(input_uri, (".json", ".jsonl"), ctx.settings)
    }
    pools = (
        json.loads(storage.read_text(files["prompts.json"], ctx.settings)) if "prompts.json" in files else {}
    )
    out = []
    if "train.json" in files:
        index = json.loads(storage.read_text(files["train.json"], ctx.settings))
        for image_rel, masks in index.items():
            key = posixpath.splitext(posixpath.basename(image_rel))[0]
            split = split_for(key, ctx.prepare.val_fraction)
            targets = []
            for mask_rel, class_name in masks.items():
                rid = record_id(ctx.source, key, class_name, _instance(mask_rel), "reasoning")
                targets.append(
                    indexed_target(
                        input_uri,
                        mask_rel,
                        class_name=class_name,
                        instance=_instance(mask_rel),
                        queries=_reasoning_queries(pools, class_name, rid, prompts.is_eval_split(split)),
                    )
                )
            out.append(
                indexed_spec(
                    input_uri,
                    image_rel,
                    key,
                    modality_of(image_rel),
                    split,
                    targets,
                )
            )
    if "test.jsonl" in files:
        by_image: dict[str, dict] = {}
        for line in storage.read_text(files["test.jsonl"], ctx.settings).splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key = posixpath.splitext(posixpath.basename(item["image"]))[0]
            spec = by_image.setdefault(
                key, indexed_spec(input_uri, item["image"], key, modality_of(item["image"]), "test", [])
            )
            queries = [
                _test_query(item[length], length, f"{key}/{item['mask']}/{length}")
                for length in ("long", "short")
                if item.get(length)
            ]
            box, box_refused = _test_box(item.get("bbox"))
            target = indexed_target(
                input_uri,
                item["mask"],
                class_name=item["class_text"],
                instance=_instance(item["mask"]),
                queries=queries or None,
                box=box,
            )
            if box_refused and "mask_refused" not in target:
                # a refused target is loaded as a BadRecord: each of its records is quarantined
                target["mask_refused"] = box_refused
            spec["targets"].append(target)
        out.extend(by_image.values())
    if not out:
        raise FileNotFoundError(f"no train.json or test.jsonl under {input_uri}")
    return with_false_queries(out, ctx)
