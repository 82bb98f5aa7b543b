"""Reader batches (numpy, from medisee.data.reader) -> model tensors.

Tokenises with the model's template, unpacks masks, de-duplicates images so one SAM image
embedding serves every target of an image, and pairs reasoning rows with the referring row of
the same (image, class) for the similarity loss.
"""

from __future__ import annotations

import numpy as np
import torch

from medisee.data.reader import unpack_masks
from medisee.model.text import TextSpec, answer_with_candidates


def collate(
    batch: dict[str, np.ndarray], text: TextSpec, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    tokens = [text.tokenizer.convert_ids_to_tokens(i) for i in text.candidate_ids]
    has_target = np.asarray(batch["has_target"], bool)
    answers = [
        answer_with_candidates(str(a), tokens) if t else str(a)
        for a, t in zip(batch["answer"], has_target, strict=True)
    ]
    out = text.batch([str(q) for q in batch["query"]], answers)

    image_ids = [str(i) for i in batch["image_id"]]
    first: dict[str, int] = {}
    for i, image_id in enumerate(image_ids):
        first.setdefault(image_id, i)
    unique_rows = list(first.values())
    image_index = [unique_rows.index(first[i]) for i in image_ids]

    pair = np.full(len(image_ids), -1, np.int64)
    referring = {
        (image_ids[i], str(batch["class_name"][i])): i
        for i in range(len(image_ids))
        if batch["query_kind"][i] == "referring" and has_target[i]
    }
    for i in range(len(image_ids)):
        if str(batch["query_kind"][i]).startswith("reasoning") and has_target[i]:
            pair[i] = referring.get((image_ids[i], str(batch["class_name"][i])), -1)

    size = batch["sam_image"].shape[1]
    out.update(
        sam_image=torch.from_numpy(np.ascontiguousarray(batch["sam_image"][unique_rows])),
        image_resized_hw=torch.from_numpy(np.asarray(batch["resized_hw"][unique_rows], np.int64)),
        image_index=torch.tensor(image_index),
        clip_image=torch.from_numpy(np.ascontiguousarray(batch["clip_image"])),
        mask=torch.from_numpy(unpack_masks(batch["mask_bits"], size)),
        box_sam=torch.from_numpy(np.asarray(batch["box_sam"], np.float32)),
        has_target=torch.from_numpy(has_target),
        resized_hw=torch.from_numpy(np.asarray(batch["resized_hw"], np.int64)),
        pair_index=torch.from_numpy(pair),
    )
    return {k: v.to(device) for k, v in out.items()}
