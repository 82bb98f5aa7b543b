"""Losses: the reference's mask BCE + Dice, box L1 + GIoU, and the similarity loss.

The mask losses score whatever grid they are given. MediSee calls them in the padded SAM frame
(`valid` = the image inside it); the reference calls them at the label's original resolution,
after postprocess_masks. The difference is measured in tests/model/test_mask_loss_resolution.py
and stated in MediSee.target_losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: float = 1000.0,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-mask Dice loss on flattened masks, with the reference code's scale and eps. Returns (N,).

    As in the reference: numerator 2·Σ(p/scale·t), denominator Σp/scale + Σt/scale.
    `valid` (bool, like targets) restricts the sums to the image inside a padded frame: the same
    as cropping each mask to its image first.
    """
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1).to(probs)
    if valid is not None:
        probs, targets = probs * valid.flatten(1), targets * valid.flatten(1)
    numerator = 2 * (probs / scale * targets).sum(-1)
    denominator = (probs / scale).sum(-1) + (targets / scale).sum(-1)
    return 1 - (numerator + eps) / (denominator + eps)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-mask mean binary cross-entropy over pixels (those in `valid`, when given). Returns (N,)."""
    loss = F.binary_cross_entropy_with_logits(
        logits.flatten(1), targets.flatten(1).to(logits), reduction="none"
    )
    if valid is None:
        return loss.mean(-1)
    valid = valid.flatten(1).to(loss)
    return (loss * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def box_loss(pred_xyxy: torch.Tensor, target_xyxy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-box L1 (mean over the 4 coordinates) and GIoU loss on normalised xyxy. Returns ((N,), (N,)).

    The mean of the per-box L1 over boxes equals the reference's `nn.L1Loss()` on the (N, 4) boxes.
    """
    l1 = (pred_xyxy - target_xyxy).abs().mean(-1)
    giou = generalized_box_iou_loss(pred_xyxy, target_xyxy, reduction="none", eps=1e-7)
    return l1, giou


def similarity_loss(
    map_a: torch.Tensor,
    map_b: torch.Tensor,
    js_weight: float = 2.0,
    mse_weight: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """2·JS(softmax a ‖ softmax b) + 1·MSE(min-max a, min-max b) per pair of flattened maps. Returns (N,)."""
    a, b = map_a.flatten(1).float(), map_b.flatten(1).float()
    p, q = a.softmax(-1), b.softmax(-1)
    m = 0.5 * (p + q)
    js = 0.5 * (p * ((p + eps) / (m + eps)).log()).sum(-1) + 0.5 * (q * ((q + eps) / (m + eps)).log()).sum(-1)

    def minmax(x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        return (x - lo) / (hi - lo + eps)

    mse = ((minmax(a) - minmax(b)) ** 2).mean(-1)
    return js_weight * js + mse_weight * mse
