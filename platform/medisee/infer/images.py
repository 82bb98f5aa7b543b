"""Input images for the stages: any uint8 grayscale / RGB / RGBA array becomes H×W×3 uint8."""

from __future__ import annotations

import numpy as np


class BadImage(ValueError):
    """An image the model cannot take (wrong dtype or shape); the message says what was wrong."""


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise BadImage(f"images must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, 2)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise BadImage(f"images must be H×W, H×W×3 or H×W×4, got shape {image.shape}")
    return np.ascontiguousarray(image)


def flatten_queries(queries: list[list[str]]) -> tuple[list[int], list[str]]:
    """Per-image query lists -> (image index of each query, queries) in order."""
    index = [i for i, qs in enumerate(queries) for _ in qs]
    return index, [q for qs in queries for q in qs]
