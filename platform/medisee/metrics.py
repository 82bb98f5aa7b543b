"""Segmentation / detection metrics of the paper, computed in one place and reducible across workers.

Definitions follow LISA's `intersectionAndUnionGPU` and MediSee's `evaluate.py` (see docs/metrics.md):
per sample I = |P ∩ G|, U = |P ∪ G|; gIoU = mean of I / (U + 1e-5) with 1.0 for a sample whose
prediction and target are both empty; cIoU = ΣI / (ΣU + 1e-10); Dice = 2I / (|P| + |G| + 1e-6),
1.0 when both are empty; box IoU on the predicted box as the decoder gives it (the caller passes
the UNCLIPPED box); Acc@0.5 = share of boxes with IoU > 0.5 (strict).

Accumulate per-sample sums in a `MetricSums` per query kind; sum the raw arrays across workers
(all-reduce), then `finalize`. Never a mean of means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_iou

FIELDS = ("count", "intersection", "union", "iou_sum", "dice_sum", "box_iou_sum", "acc50")


@dataclass
class MetricSums:
    kinds: tuple[str, ...] = ("referring", "reasoning_short", "reasoning_long")
    sums: np.ndarray = field(default=None)  # (len(kinds), len(FIELDS)) float64

    def __post_init__(self):
        if self.sums is None:
            self.sums = np.zeros((len(self.kinds), len(FIELDS)), np.float64)

    def add(self, kind: str, pred_mask: np.ndarray, true_mask: np.ndarray, pred_box, true_box) -> None:
        """One sample: binary masks (pred = logits > 0, thresholded by the caller) and xyxy boxes.

        `pred_box` is the predicted box before any clipping to the image, as the reference scores it.
        """
        if kind not in self.kinds:
            return
        pred, true = np.asarray(pred_mask, bool), np.asarray(true_mask, bool)
        inter = float(np.logical_and(pred, true).sum())
        union = float(np.logical_or(pred, true).sum())
        total = float(pred.sum() + true.sum())
        biou = float(
            box_iou(
                torch.tensor([pred_box], dtype=torch.float64), torch.tensor([true_box], dtype=torch.float64)
            )[0, 0]
        )
        row = self.kinds.index(kind)
        self.sums[row] += [
            1,
            inter,
            union,
            inter / (union + 1e-5) if union else 1.0,
            2 * inter / (total + 1e-6) if total else 1.0,
            biou,
            float(biou > 0.5),
        ]

    def merge(self, other: MetricSums) -> MetricSums:
        return MetricSums(self.kinds, self.sums + other.sums)

    def finalize(self) -> dict[str, float]:
        out = {}
        groups = {kind: self.sums[i] for i, kind in enumerate(self.kinds)}
        groups["all"] = self.sums.sum(0)
        for name, s in groups.items():
            count = s[0]
            if count == 0:
                continue
            suffix = "" if name == "all" else f"/{name}"
            out[f"dice{suffix}"] = float(s[4] / count)
            out[f"giou{suffix}"] = float(s[3] / count)
            out[f"ciou{suffix}"] = float(s[1] / (s[2] + 1e-10))
            out[f"box_iou{suffix}"] = float(s[5] / count)
            out[f"acc50{suffix}"] = float(s[6] / count)
            out[f"count{suffix}"] = float(count)
        return out


def all_reduce(sums: MetricSums) -> MetricSums:
    """Sum the raw arrays across the torch.distributed group (no-op outside one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums
    tensor = torch.from_numpy(sums.sums.copy())
    torch.distributed.all_reduce(tensor)
    return MetricSums(sums.kinds, tensor.numpy())
