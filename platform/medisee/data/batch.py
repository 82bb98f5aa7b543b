"""The training batch: one contract between the reader, the collate step and the model.

The reader (`medisee.data.reader.Preprocess`) emits numpy rows with READER_FIELDS; `collate`
turns a batch of them into a `TrainingBatch` of tensors, which `MediSee.forward` reads as is.
Masks travel bit-packed (8x smaller than uint8): `pack_masks` / `unpack_masks` live here together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

# name -> (dtype, shape after the row axis; S = SAM side, C = CLIP side, P = packed mask bytes)
READER_FIELDS = {
    "sam_image": ("uint8", "S,S,3"),
    "clip_image": ("uint8", "C,C,3"),
    "mask_bits": ("uint8", "P"),
    "box_sam": ("float32", "4  pixel xyxy in the padded SAM frame"),
    "has_target": ("bool", ""),
    "resized_hw": ("int32", "2  the image's (h, w) inside the SAM frame"),
    "original_hw": ("int32", "2"),
    "record_id": ("object", ""),
    "image_id": ("object", ""),
    "query": ("object", ""),
    "answer": ("object", ""),
    "query_kind": ("object", ""),
    "class_name": ("object", ""),
    "modality": ("object", ""),
}


def packed_length(size: int) -> int:
    return (size * size + 7) // 8


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(N, S, S) {0, 1} -> (N, ceil(S²/8)) uint8."""
    return np.packbits(np.asarray(masks, np.uint8).reshape(len(masks), -1), axis=1)


def unpack_masks(mask_bits: np.ndarray, size: int) -> np.ndarray:
    """(N, ceil(S²/8)) packed bits -> (N, S, S) uint8 {0, 1}."""
    return np.unpackbits(mask_bits, axis=1, count=size * size).reshape(len(mask_bits), size, size)


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting for the GPU: from pinned memory, asynchronously."""
    if device.type != "cuda" or values.device.type != "cpu":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


@dataclass
class TrainingBatch:
    """B query rows over M distinct images (rows of one image share its encodings)."""

    input_ids: torch.Tensor  # (B, L) long, right-padded
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 outside the answer
    image_index: torch.Tensor  # (B,) long: row -> image in [0, M)
    clip_image: torch.Tensor  # (M, C, C, 3) uint8
    sam_image: torch.Tensor  # (M, S, S, 3) uint8, padded bottom/right
    image_resized_hw: torch.Tensor  # (M, 2) long
    mask: torch.Tensor  # (B, S, S) uint8 target masks in the SAM frame
    box_sam: torch.Tensor  # (B, 4) float32 target boxes, pixel xyxy in the SAM frame
    has_target: torch.Tensor  # (B,) bool: rows with a mask and box (false queries have none)
    pair_index: torch.Tensor  # (B,) long: the referring row of the same (image, class), or -1
    image_keys: tuple[str, ...] = ()  # (M,) the images' ids (keys of an image-embedding cache)
    image_embeddings: torch.Tensor | None = None  # (M, P, g, g) SAM embeddings, when already known
    vision_tokens: torch.Tensor | None = None  # (M, N, v) MLLM vision-tower tokens, when already known

    def to(self, device, non_blocking: bool = False) -> TrainingBatch:
        """On `device`; `non_blocking` copies to a GPU from pinned memory while the GPU keeps working."""
        device = torch.device(device)

        def move(value):
            if not isinstance(value, torch.Tensor):
                return value
            return to_device(value, device) if non_blocking else value.to(device)

        return TrainingBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @property
    def resized_hw(self) -> torch.Tensor:
        """(B, 2) per row."""
        return self.image_resized_hw[self.image_index]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def distinct_images(image_ids: list[str]) -> tuple[list[int], list[int]]:
    """(first row of each distinct image, image index of each row), in order of appearance."""
    index_of: dict[str, int] = {}
    first_rows: list[int] = []
    image_index: list[int] = []
    for row, image_id in enumerate(image_ids):
        if image_id not in index_of:
            index_of[image_id] = len(first_rows)
            first_rows.append(row)
        image_index.append(index_of[image_id])
    return first_rows, image_index


def similarity_pairs(batch: dict[str, np.ndarray], has_target: np.ndarray) -> np.ndarray:
    """For each reasoning row, the referring row about the same (image, class) in the batch, else -1."""
    image_ids = [str(i) for i in batch["image_id"]]
    classes = [str(c) for c in batch["class_name"]]
    kinds = [str(k) for k in batch["query_kind"]]
    referring = {
        (image_ids[i], classes[i]): i for i in range(len(kinds)) if kinds[i] == "referring" and has_target[i]
    }
    pair = np.full(len(kinds), -1, np.int64)
    for i, kind in enumerate(kinds):
        if kind.startswith("reasoning") and has_target[i]:
            pair[i] = referring.get((image_ids[i], classes[i]), -1)
    return pair


def answer_with_candidates(answer: str, tokens: list[str]) -> str:
    """Make sure every candidate token appears in a positive answer (n > 2 adds extras at the end)."""
    missing = [t for t in tokens if t not in answer]
    return (answer.rstrip() + " " + " ".join(missing)).strip() if missing else answer


def collate(batch: dict[str, np.ndarray], text, device: torch.device | str = "cpu") -> TrainingBatch:
    """Reader rows (READER_FIELDS) -> TrainingBatch; `text` is the model's TextSpec (template, tokenizer)."""
    tokens = [text.tokenizer.convert_ids_to_tokens(i) for i in text.candidate_ids]
    has_target = np.asarray(batch["has_target"], bool)
    answers = [
        answer_with_candidates(str(a), tokens) if t else str(a)
        for a, t in zip(batch["answer"], has_target, strict=True)
    ]
    tokenized = text.batch([str(q) for q in batch["query"]], answers)
    unique_rows, image_index = distinct_images([str(i) for i in batch["image_id"]])
    size = batch["sam_image"].shape[1]
    return TrainingBatch(
        input_ids=tokenized["input_ids"],
        attention_mask=tokenized["attention_mask"],
        labels=tokenized["labels"],
        image_index=torch.tensor(image_index, dtype=torch.long),
        clip_image=torch.from_numpy(np.ascontiguousarray(batch["clip_image"][unique_rows])),
        sam_image=torch.from_numpy(np.ascontiguousarray(batch["sam_image"][unique_rows])),
        image_resized_hw=torch.from_numpy(np.asarray(batch["resized_hw"][unique_rows], np.int64)),
        mask=torch.from_numpy(unpack_masks(batch["mask_bits"], size)),
        box_sam=torch.from_numpy(np.asarray(batch["box_sam"], np.float32)),
        has_target=torch.from_numpy(has_target),
        pair_index=torch.from_numpy(similarity_pairs(batch, has_target)),
        image_keys=tuple(str(batch["image_id"][row]) for row in unique_rows),
    ).to(device, non_blocking=True)
