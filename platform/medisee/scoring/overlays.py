"""PNG overlays for a sample of images: masks and boxes per query, beside the similarity heatmap."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from medisee.data.codec import rle_to_mask

COLOURS = [(230, 60, 60), (60, 170, 230), (90, 200, 90), (240, 200, 40), (200, 90, 220), (250, 140, 40)]


def draw_overlay(image: np.ndarray, results: list[dict], row: dict) -> bytes:
    """Left: the image with each query's mask (tinted) and box; right: the [SEG] similarity heatmap
    of the first query. Queries rejected as absent have no mask; their box is not drawn either."""
    left = image.astype(np.float32).copy()
    for j, result in enumerate(results):
        if result.get("mask_rle"):
            mask = rle_to_mask(result["mask_rle"])
            left[mask] = 0.55 * left[mask] + 0.45 * np.asarray(COLOURS[j % len(COLOURS)], np.float32)
    canvas = Image.fromarray(left.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for j, result in enumerate(results):
        if result.get("box"):
            draw.rectangle(result["box"], outline=COLOURS[j % len(COLOURS)], width=2)
    heat = heatmap(row, image.shape[:2])
    strip = Image.new("RGB", (canvas.width * 2, canvas.height))
    strip.paste(canvas, (0, 0))
    strip.paste(heat, (canvas.width, 0))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap(row: dict, hw: tuple[int, int]) -> Image.Image:
    side = row["similarity_side"]
    maps = np.frombuffer(row["similarity"], np.float32).reshape(-1, side, side)
    first = maps[0]
    span = float(first.max() - first.min())
    scaled = (
        ((first - first.min()) / span * 255).astype(np.uint8) if span > 0 else np.zeros_like(first, np.uint8)
    )
    rgb = np.stack([scaled, np.zeros_like(scaled), 255 - scaled], axis=-1)
    return Image.fromarray(rgb).resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
