"""Decoder stage: SAM's image encoder once per image, then routers, box decoder and mask decoder
for every query about it. Boxes and masks come back in original-image pixels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medisee.infer.images import PreparedImage, original_shape, sam_of
from medisee.infer.results import Decoded
from medisee.model import boxes as box_ops


class DecoderStage:
    def __init__(self, model, mask_threshold: float = 0.0):
        self.model, self.mask_threshold = model, mask_threshold

    @torch.no_grad()
    def __call__(
        self, images: list[np.ndarray | PreparedImage], image_index: list[int], candidates: np.ndarray
    ) -> list[Decoded]:
        """candidates (Q, n, d) for queries about images[image_index[q]]; only those images are encoded."""
        if len(image_index) == 0:
            return []
        model = self.model
        used = sorted(set(image_index))
        local = torch.tensor([used.index(i) for i in image_index], device=model.device)
        shapes = [original_shape(images[i]) for i in used]
        sam_images, frames = zip(*(sam_of(images[i], model.sam_size) for i in used), strict=True)
        image_hw = torch.tensor([f.resized_hw for f in frames], device=model.device)
        states = torch.as_tensor(np.asarray(candidates), dtype=torch.float32, device=model.device)
        with model.autocast():
            embeddings = model.image_embeddings(
                torch.from_numpy(np.stack(sam_images)).to(model.device), image_hw
            )
            box_norm, prompt_tokens = model.heads(states)
            box_frame = box_ops.normalized_to_frame(box_norm.float(), image_hw[local])
            low_res, iou = model.decode_masks(embeddings, local, box_frame, prompt_tokens)
            logits = model.frame_logits(low_res)
        original = torch.tensor([shapes[j] for j in local.tolist()], device=model.device)
        unclipped = box_ops.normalized_to_original(box_norm.float(), original, clip=False).cpu().numpy()
        clipped = box_ops.normalized_to_original(box_norm.float(), original).cpu().numpy()
        out = []
        for q, j in enumerate(local.tolist()):
            h, w = frames[j].resized_hw
            crop = logits[q : q + 1, :h, :w].unsqueeze(0)
            full = F.interpolate(crop, shapes[j], mode="bilinear", align_corners=False)[0, 0]
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
