"""QueryResults as JSON: box, mask (COCO RLE or PNG), optional heatmap and overlay as base64 PNG."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from medisee.data.codec import rle_to_mask


def png_b64(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_png(similarity: np.ndarray, hw: tuple[int, int]) -> str:
    from PIL import Image

    span = float(similarity.max() - similarity.min())
    scaled = (
        ((similarity - similarity.min()) / span * 255).astype(np.uint8)
        if span > 0
        else np.zeros(similarity.shape, np.uint8)
    )
    return png_b64(np.asarray(Image.fromarray(scaled).resize((hw[1], hw[0]), Image.Resampling.BILINEAR)))


def overlay_png(image: np.ndarray, mask: np.ndarray | None, box) -> str:
    from PIL import Image, ImageDraw

    out = image.astype(np.float32).copy()
    if mask is not None:
        out[mask] = 0.55 * out[mask] + 0.45 * np.asarray((230, 60, 60), np.float32)
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if box:
        ImageDraw.Draw(canvas).rectangle(list(box), outline=(60, 170, 230), width=2)
    return png_b64(np.asarray(canvas))


def result_json(result, image: np.ndarray, mask_format: str, heatmap: bool, overlay: bool) -> dict:
    """`result.mask` is the RLE text the decoder deployment returned (None when rejected or not found)."""
    mask = rle_to_mask(result.mask) if result.mask is not None else None
    out = {
        "query": result.query,
        "answer": result.answer,
        "found": result.found,
        "verdict": result.verdict,
        "decided_by": result.decided_by,
        "scores": {"strength": result.strength, "compactness": result.compactness, "purity": result.purity},
        "decoder": {
            "mask_score": result.mask_score,
            "iou_score": result.iou_score,
            "area_fraction": result.area_fraction,
        },
        "box": list(result.box) if result.box else None,
        "mask": None,
        "mask_area": int(mask.sum()) if mask is not None else None,
    }
    if mask is not None:
        out["mask"] = {"format": "rle", "rle": json.loads(result.mask)} if mask_format == "rle" else {
            "format": "png", "png": png_b64(mask.astype(np.uint8) * 255)
        }  # fmt: skip
    if heatmap and result.similarity is not None:
        out["heatmap_png"] = heatmap_png(result.similarity, image.shape[:2])
    if overlay:
        out["overlay_png"] = overlay_png(image, mask, result.box)
    return out
