"""Every metric the project reports, computed here and nowhere else (definitions: docs/metrics.md).

Masks and boxes follow LISA's `intersectionAndUnionGPU` and MediSee's `evaluate.py`: per sample
I = |P ∩ G|, U = |P ∪ G|; IoU = I / (U + 1e-5) and Dice = 2I / (|P| + |G| + 1e-6), both 1.0 when
prediction and target are empty; gIoU = mean IoU; cIoU = ΣI / (ΣU + 1e-10); box IoU on the
predicted box as the decoder gives it (the caller passes the UNCLIPPED box); Acc@0.5 = share of
boxes with IoU > 0.5 (strict).

Accumulate per-sample sums in a `MetricSums` per query kind; sum the raw arrays across workers
(all-reduce), then `finalize`. Never a mean of means.

The verifier's rejection of false queries is scored as a detector (positive = false query,
predicted positive = rejected). A ratio whose denominator is 0 is NaN, never 0.

torch is imported where a box or a reduction needs it: the verifier stage imports this module
(through the calibration) in processes that never load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIELDS = ("count", "intersection", "union", "iou_sum", "dice_sum", "box_iou_sum", "acc50")
ACC_IOU = 0.5
IOU_EPS, DICE_EPS, CIOU_EPS = 1e-5, 1e-6, 1e-10


# ----- masks and boxes, one sample ---------------------------------------------------------------
def mask_counts(pred: np.ndarray, true: np.ndarray) -> tuple[float, float, float]:
    """(I, U, |P| + |G|) of two binary masks of the same shape."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    inter = float(np.logical_and(pred, true).sum())
    union = float(np.logical_or(pred, true).sum())
    return inter, union, float(pred.sum() + true.sum())


def iou_from_counts(inter: float, union: float) -> float:
    return inter / (union + IOU_EPS) if union else 1.0


def dice_from_counts(inter: float, total: float) -> float:
    return 2.0 * inter / (total + DICE_EPS) if total else 1.0


def mask_iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Per-sample IoU; 1.0 when both masks are empty."""
    inter, union, _ = mask_counts(pred, true)
    return iou_from_counts(inter, union)


def mask_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Per-sample Dice; 1.0 when both masks are empty."""
    inter, _, total = mask_counts(pred, true)
    return dice_from_counts(inter, total)


def box_iou(pred_box, true_box) -> float:
    """IoU of two xyxy boxes (torchvision's box_iou, in float64)."""
    import torch
    from torchvision.ops import box_iou as _torch_box_iou

    pred = torch.as_tensor(pred_box, dtype=torch.float64).reshape(1, 4)
    true = torch.as_tensor(true_box, dtype=torch.float64).reshape(1, 4)
    return float(_torch_box_iou(pred, true)[0, 0])


def box_hit(iou: float) -> bool:
    """Counts for Acc@0.5: strictly above 0.5, as the reference's `box_ious > 0.5`."""
    return iou > ACC_IOU


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
        inter, union, total = mask_counts(pred_mask, true_mask)
        biou = box_iou(pred_box, true_box)
        row = self.kinds.index(kind)
        self.sums[row] += [
            1,
            inter,
            union,
            iou_from_counts(inter, union),
            dice_from_counts(inter, total),
            biou,
            float(box_hit(biou)),
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
            out[f"ciou{suffix}"] = float(s[1] / (s[2] + CIOU_EPS))
            out[f"box_iou{suffix}"] = float(s[5] / count)
            out[f"acc50{suffix}"] = float(s[6] / count)
            out[f"count{suffix}"] = float(count)
        return out


def all_reduce(sums: MetricSums) -> MetricSums:
    """Sum the raw arrays across the torch.distributed group (no-op outside one)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums
    tensor = torch.from_numpy(sums.sums.copy())
    torch.distributed.all_reduce(tensor)
    return MetricSums(sums.kinds, tensor.numpy())


# ----- binary detection (the verifier's rejection of false queries) ----------------------------
def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (the value is undefined)."""
    return numerator / denominator if denominator else float("nan")


def confusion(actual, predicted) -> dict[str, int]:
    """tp / fp / fn / tn of boolean arrays (True = positive)."""
    actual, predicted = np.asarray(actual, bool), np.asarray(predicted, bool)
    return {
        "tp": int((actual & predicted).sum()),
        "fp": int((~actual & predicted).sum()),
        "fn": int((actual & ~predicted).sum()),
        "tn": int((~actual & ~predicted).sum()),
    }


def balanced_accuracy_of(c: dict[str, int]) -> float:
    """Mean of sensitivity and specificity; NaN unless both classes occur."""
    return (ratio(c["tp"], c["tp"] + c["fn"]) + ratio(c["tn"], c["tn"] + c["fp"])) / 2


def balanced_accuracy(actual, predicted) -> float:
    """Balanced accuracy of boolean arrays; the same whichever class is called positive."""
    return balanced_accuracy_of(confusion(actual, predicted))


def rejection_metrics(c: dict[str, int]) -> dict[str, float]:
    """The verifier as a detector of false queries, from counts where positive = false query and
    predicted positive = rejected. F1 = 2TP / (2TP + FP + FN), the harmonic mean of precision and
    recall wherever both are defined."""
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "false_queries": tp + fn,
        "true_queries": tn + fp,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
        "balanced_accuracy": balanced_accuracy_of(c),
    }
