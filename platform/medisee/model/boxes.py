"""Box conversions between the normalised box head output, the padded SAM frame and the image.

The box head predicts (cx, cy, w, h) normalised to the image itself (x by its width, y by its
height). In the SAM frame the image occupies the top-left `resized_hw` region of the padded
square, so x scales by the resized width and y by the resized height — not by the padded side
(which is what the reference code does, and which is wrong for non-square images).
"""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(box: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = box.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def normalized_to_frame(box_norm_xyxy: torch.Tensor, resized_hw: torch.Tensor) -> torch.Tensor:
    """Normalised xyxy (B,4) -> pixel xyxy in the padded SAM frame; resized_hw (B,2) = (h, w)."""
    h, w = resized_hw[:, 0:1].to(box_norm_xyxy), resized_hw[:, 1:2].to(box_norm_xyxy)
    scale = torch.cat([w, h, w, h], -1)
    return box_norm_xyxy * scale


def frame_to_normalized(box_frame_xyxy: torch.Tensor, resized_hw: torch.Tensor) -> torch.Tensor:
    h, w = resized_hw[:, 0:1].to(box_frame_xyxy), resized_hw[:, 1:2].to(box_frame_xyxy)
    return box_frame_xyxy / torch.cat([w, h, w, h], -1)


def normalized_to_original(
    box_norm_xyxy: torch.Tensor, original_hw: torch.Tensor, clip: bool = True
) -> torch.Tensor:
    """Normalised xyxy -> pixel xyxy in the original image, clipped to it unless `clip=False`."""
    h, w = original_hw[:, 0:1].to(box_norm_xyxy), original_hw[:, 1:2].to(box_norm_xyxy)
    scale = torch.cat([w, h, w, h], -1)
    if not clip:
        return box_norm_xyxy * scale
    return torch.minimum(box_norm_xyxy.clamp_min(0) * scale, scale)
