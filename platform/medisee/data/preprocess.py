"""Model-side inputs built from uint8 images; normalisation stays next to the model.

SAM side: resize the longest side to `sam_size`, pad bottom/right to a square.
CLIP side: resize the shortest side to `clip_size`, centre crop (CLIPImageProcessor's way);
the crop is recorded so the verifier can map the token grid back onto the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SamFrame:
    """How an original H×W image sits in the padded square SAM frame."""

    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def resized_hw(self) -> tuple[int, int]:
        # at least one pixel: a 1 × 20000 strip would otherwise resize to a side of 0
        return max(1, int(self.height * self.scale + 0.5)), max(1, int(self.width * self.scale + 0.5))


def sam_input(image: np.ndarray, size: int) -> tuple[np.ndarray, SamFrame]:
    frame = SamFrame(image.shape[0], image.shape[1], size)
    h, w = frame.resized_hw
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[:h, :w] = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    return out, frame


def sam_mask(mask: np.ndarray, frame: SamFrame) -> np.ndarray:
    h, w = frame.resized_hw
    out = np.zeros((frame.size, frame.size), dtype=np.uint8)
    out[:h, :w] = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST))
    return out


def clip_resized_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after the shortest-side resize: the long side is floored, size · long // short, as
    CLIPImageProcessor computes it (512 × 333 → 516 × 336 at size 336, not 517)."""
    if height <= width:
        return size, size * width // height
    return size * height // width, size


def clip_crop(height: int, width: int, size: int) -> tuple[float, int, int]:
    """(scale, top, left) of the shortest-side resize + centre crop; `scale` is the short side's
    (the floored long side comes out up to one resized pixel shorter than `scale` gives)."""
    rh, rw = clip_resized_hw(height, width, size)
    return size / min(height, width), (rh - size) // 2, (rw - size) // 2


def clip_input(image: np.ndarray, size: int) -> np.ndarray:
    _, top, left = clip_crop(image.shape[0], image.shape[1], size)
    rh, rw = clip_resized_hw(image.shape[0], image.shape[1], size)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BICUBIC))
    return np.ascontiguousarray(resized[top : top + size, left : left + size])
