"""MLMR-SD: reasoning queries over SA-Med2D-20M images.

    <input>/
      train.json      {"images/<name>.png": {"masks/<mask>.png": "<class>", ...}, ...}
      prompts.json    {"<class>": {"long": [...], "short": [...],
                                   "long_explanation": [...], "short_explanation": [...]}}
      test.jsonl      {"image", "mask", "class_text", "long", "short", "bbox"} per line

Index paths are relative to the input folder (see `files.locate`).
Each training target gives a long and a short reasoning query, picked reproducibly from
the class's pools (a query and its explanation share the same index when the pools align).
"""

from __future__ import annotations

import json
import posixpath

from medisee import storage
from medisee.data import prompts
from medisee.data.records import record_id, split_for
from medisee.data.sources.files import indexed_spec, indexed_target, with_false_queries
from medisee.data.sources.sa_med2d import MASK_SUFFIX, modality_of


def _pooled(pool: dict, length: str, key: str) -> dict | None:
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
    question, answer = prompts.reasoning(questions[i], explanation, key)
    return {"kind": f"reasoning_{length}", "text": question, "answer": answer, "explanation": explanation}


def _test_query(text: str, length: str, key: str) -> dict:
    question, answer = prompts.reasoning(text, None, key)
    return {"kind": f"reasoning_{length}", "text": question, "answer": answer}


def _reasoning_queries(pools: dict, class_name: str, key: str) -> list[dict] | None:
    pool = pools.get(class_name)
    if not pool:
        return None
    queries = [q for q in (_pooled(pool, "long", key + "/long"), _pooled(pool, "short", key + "/short")) if q]
    return queries or None


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
            targets = []
            for mask_rel, class_name in masks.items():
                rid = record_id(ctx.source, key, class_name, _instance(mask_rel), "reasoning")
                targets.append(
                    indexed_target(
                        input_uri,
                        mask_rel,
                        class_name=class_name,
                        instance=_instance(mask_rel),
                        queries=_reasoning_queries(pools, class_name, rid),
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
            spec["targets"].append(
                indexed_target(
                    input_uri,
                    item["mask"],
                    class_name=item["class_text"],
                    instance=_instance(item["mask"]),
                    queries=queries or None,
                    box=[float(v) for v in item["bbox"]] if item.get("bbox") else None,
                )
            )
        out.extend(by_image.values())
    if not out:
        raise FileNotFoundError(f"no train.json or test.jsonl under {input_uri}")
    return with_false_queries(out, ctx)
