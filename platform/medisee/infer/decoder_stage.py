"""Decoder stage: SAM's image encoder once per image, then routers, box decoder and mask decoder
for every query about it. Boxes and masks come back in original-image pixels. An image whose
embedding the MLLM stage already computed (medisee-lite: `embeddings`, or a PreparedImage's
`embedding`) is not encoded again.

`segment_boxes` is MedSAM's interactive mode on the same stage: a user's box, no text, straight to
the mask decoder (no [SEG] prompt token), the box returned as given."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medisee.infer.images import PreparedImage, embedding_of, original_shape, sam_of
from medisee.infer.results import Decoded
from medisee.model import boxes as box_ops


@dataclass
class _Encoded:
    local: torch.Tensor  # (Q,) index of each prompt's image among the encoded ones
    shapes: list[tuple[int, int]]  # original (h, w) of each encoded image
    resized: list[tuple[int, int]]  # its (h, w) inside the SAM frame
    image_hw: torch.Tensor  # (M, 2) the same, on the model's device
    embeddings: torch.Tensor  # (M, P, g, g)


class DecoderStage:
    def __init__(self, model, mask_threshold: float = 0.0):
        self.model, self.mask_threshold = model, mask_threshold

    def __call__(
        self,
        images: list[np.ndarray | PreparedImage],
        image_index: list[int],
        candidates: np.ndarray,
        embeddings: torch.Tensor | None = None,
    ) -> list[Decoded]:
        """candidates (Q, n, d) for queries about images[image_index[q]]; only those images are encoded.
        `embeddings`: (len(images), P, g, g) already computed for these images (MLLMStage.encode)."""
        return self.decode(images, image_index, candidates, embeddings=embeddings)[0]

    def segment_boxes(
        self, images: list[np.ndarray | PreparedImage], image_index: list[int], boxes: np.ndarray
    ) -> list[Decoded]:
        """boxes (Q, 4) pixel xyxy (last pixel inclusive) in images[image_index[q]] -> one mask each."""
        return self.decode(images, [], None, image_index, boxes)[1]

    @torch.no_grad()
    def decode(
        self,
        images: list[np.ndarray | PreparedImage],
        image_index: list[int],
        candidates: np.ndarray | None,
        box_index: list[int] = (),
        boxes: np.ndarray | None = None,
        embeddings: torch.Tensor | list[torch.Tensor | None] | None = None,
    ) -> tuple[list[Decoded], list[Decoded]]:
        """Queries (their candidate states) and box prompts together, every image they are about
        encoded once: (one Decoded per query, one per box). `embeddings[i]`: images[i]'s SAM
        embedding when already computed (None: encode it)."""
        image_index, box_index = list(image_index), list(box_index)
        if box_index:
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            if len(boxes) != len(box_index):
                raise ValueError(f"{len(boxes)} boxes for {len(box_index)} image indices")
        if not image_index and not box_index:
            return [], []
        model = self.model
        with model.autocast():
            encoded = self._encode(images, image_index + box_index, embeddings)
            split = len(image_index)
            queries = self._query_outputs(encoded, encoded.local[:split], candidates) if split else None
            prompted = self._box_outputs(encoded, encoded.local[split:], boxes) if box_index else None
        return (
            self._results(encoded, *queries) if queries else [],
            self._results(encoded, *prompted) if prompted else [],
        )

    def _query_outputs(self, encoded: _Encoded, local: torch.Tensor, candidates):
        model = self.model
        states = torch.as_tensor(np.asarray(candidates), dtype=torch.float32, device=model.device)
        box_norm, prompt_tokens = model.heads(states)
        box_frame = box_ops.normalized_to_frame(box_norm.float(), encoded.image_hw[local])
        low_res, iou = model.decode_masks(encoded.embeddings, local, box_frame, prompt_tokens)
        logits = model.frame_logits(low_res)
        original = torch.tensor([encoded.shapes[j] for j in local.tolist()], device=model.device)
        unclipped = box_ops.normalized_to_original(box_norm.float(), original, clip=False).cpu().numpy()
        clipped = box_ops.normalized_to_original(box_norm.float(), original).cpu().numpy()
        return local, logits, iou, clipped, unclipped

    def _box_outputs(self, encoded: _Encoded, local: torch.Tensor, boxes: np.ndarray):
        model = self.model
        # one scale for both axes, as MedSAM / LiteMedSAM map their box prompts into the frame
        scale = [model.sam_size / max(encoded.shapes[j]) for j in local.tolist()]
        box_frame = torch.as_tensor(boxes * np.asarray(scale)[:, None], dtype=torch.float32).to(model.device)
        low_res, iou = model.decode_masks(encoded.embeddings, local, box_frame, None)
        return local, model.frame_logits(low_res), iou, boxes, boxes

    def _encode(self, images, image_index: list[int], given=None) -> _Encoded:
        model = self.model
        used = sorted(set(image_index))
        local = torch.tensor([used.index(i) for i in image_index], device=model.device)
        sam_images, frames = zip(*(sam_of(images[i], model.sam_size) for i in used), strict=True)
        resized = [f.resized_hw for f in frames]
        image_hw = torch.tensor(resized, device=model.device)
        known = [given[i] if given is not None else _as_tensor(embedding_of(images[i])) for i in used]
        embeddings = self._embeddings(known, sam_images, image_hw)
        return _Encoded(local, [original_shape(images[i]) for i in used], resized, image_hw, embeddings)

    def _embeddings(self, known: list, sam_images, image_hw: torch.Tensor) -> torch.Tensor:
        """(M, P, g, g): the known embeddings, the others (None in `known`) encoded in one pass."""
        model = self.model
        todo = [j for j, e in enumerate(known) if e is None]
        if todo:
            pixels = torch.from_numpy(np.stack([sam_images[j] for j in todo])).to(model.device)
            fresh = model.image_embeddings(pixels, image_hw[todo])
            if len(todo) == len(known):
                return fresh
            for j, embedding in zip(todo, fresh, strict=True):
                known[j] = embedding
        return torch.stack([e.to(model.device, known[0].dtype) for e in known])

    def _results(self, encoded: _Encoded, local, logits, iou, clipped, unclipped) -> list[Decoded]:
        out = []
        for q, j in enumerate(local.tolist()):
            h, w = encoded.resized[j]
            crop = logits[q : q + 1, :h, :w].unsqueeze(0)
            full = F.interpolate(crop, encoded.shapes[j], mode="bilinear", align_corners=False)[0, 0]
            mask = full > self.mask_threshold
            out.append(
                Decoded(
                    box=tuple(float(v) for v in clipped[q]),
                    box_unclipped=tuple(float(v) for v in unclipped[q]),
                    mask=mask.cpu().numpy(),
                    mask_score=float(full.sigmoid()[mask].mean()) if mask.any() else 0.0,
                    iou_score=float(iou[q, 0]),
                    area_fraction=float(mask.float().mean()),
                )
            )
        return out


def _as_tensor(embedding: np.ndarray | None) -> torch.Tensor | None:
    return None if embedding is None else torch.from_numpy(np.asarray(embedding, np.float32))
