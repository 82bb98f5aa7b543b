"""Similarity heatmaps drawn over the original image.

The [SEG]-to-image map covers the CLIP input: the shortest-side resize and centre crop of the
image. Rendering undoes that: the min-max normalised grid is resized onto the cropped square of
the original image; outside the crop there is no evidence and nothing is drawn. A medisee-lite map
(`padded`) covers the SAM frame instead: the longest side resized, padding right and bottom, so
the map's square starts at the top-left corner and its side is the image's longest.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from medisee.data.preprocess import clip_crop


def heatmap_on_image(
    similarity: np.ndarray, height: int, width: int, clip_size: int, padded: bool = False
) -> np.ndarray:
    """(side, side) map -> (H, W) float32 in [0, 1], placed where the CLIP crop (or the padded
    frame) came from; NaN outside."""
    grid = np.asarray(similarity, np.float64)
    grid = np.where(np.isfinite(grid), grid, np.nan)
    lo, hi = (
        np.nanmin(grid) if np.isfinite(grid).any() else 0.0,
        np.nanmax(grid) if np.isfinite(grid).any() else 0.0,
    )
    norm = np.nan_to_num((grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)).astype(np.float32)
    out = np.full((height, width), np.nan, np.float32)
    if padded:
        side = max(height, width)
        resized = np.asarray(Image.fromarray(norm).resize((side, side), Image.BILINEAR), np.float32)
        out[:] = np.clip(resized[:height, :width], 0.0, 1.0)
        return out
    scale, top, left = clip_crop(height, width, clip_size)
    size = clip_size / scale  # the crop's side in original pixels
    y0, x0 = top / scale, left / scale
    y1, x1 = int(round(y0)), int(round(x0))
    y2, x2 = min(height, int(round(y0 + size))), min(width, int(round(x0 + size)))
    resized = np.asarray(Image.fromarray(norm).resize((x2 - x1, y2 - y1), Image.BILINEAR), np.float32)
    out[y1:y2, x1:x2] = np.clip(resized, 0.0, 1.0)
    return out


def overlay_png(
    image: np.ndarray,
    similarity: np.ndarray,
    clip_size: int,
    alpha: float = 0.45,
    colormap: str = "jet",
    padded: bool = False,
) -> bytes:
    """A PNG of the image with the heatmap blended over it (colour map from matplotlib)."""
    from matplotlib import colormaps

    heat = heatmap_on_image(similarity, image.shape[0], image.shape[1], clip_size, padded)
    colors = (colormaps[colormap](np.nan_to_num(heat))[..., :3] * 255).astype(np.float32)
    weight = np.where(np.isnan(heat), 0.0, alpha)[..., None]
    blended = (image.astype(np.float32) * (1 - weight) + colors * weight).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blended).save(buf, format="PNG")
    return buf.getvalue()
