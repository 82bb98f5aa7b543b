"""`medisee prepare phantom`: procedurally generated CT-like slices (see medisee.data.phantom).

The input URI is ignored except as a name; `prepare.phantom_images`, `prepare.phantom_size`
and `prepare.seed` decide what is generated.
"""

from __future__ import annotations

from medisee.data import phantom, prompts
from medisee.data.records import LoadedImage, LoadedTarget, choose_absent, split_for


def specs(input_uri: str, ctx):
    p = ctx.prepare
    return [
        {
            "kind": "phantom",
            "seed": p.seed,
            "index": i,
            "size": p.phantom_size,
            "image_key": f"phantom_s{p.seed}_{i:06d}",
            "split": split_for(f"phantom_s{p.seed}_{i:06d}", p.val_fraction),
        }
        for i in range(p.phantom_images)
    ]


def load(spec: dict, ctx) -> list[LoadedImage]:
    image, masks = phantom.generate(spec["seed"], spec["index"], spec["size"])
    key = spec["image_key"]
    ref = f"phantom://seed={spec['seed']}/index={spec['index']}"
    for_eval = prompts.is_eval_split(spec["split"])
    targets = [
        LoadedTarget(name, mask, ref, queries=phantom.queries_for(name, masks, f"{key}/{name}", for_eval))
        for name, mask in masks.items()
    ]
    absent = choose_absent(set(masks), list(phantom.ORGAN_NAMES), ctx.prepare.false_queries_per_image, key)
    return [LoadedImage(key, ref, "ct", spec["split"], image, targets, absent)]
