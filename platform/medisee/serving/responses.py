"""QueryResults as JSON: box, mask (COCO RLE or PNG), optional heatmap per query and one overlay per
image as base64 PNG; in box-prompt mode one result per box (a Decoded: the box as given, its mask and
the decoder's signals, named as in a query's result). Renderings are downscaled to `max_side` so that
a response stays small whatever the image's size and the number of queries (masks keep full
resolution: RLE, or a 1-channel PNG)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image, ImageDraw

from medisee.data.codec import rle_to_mask
from medisee.infer.results import Decoded

COLOURS = ((230, 60, 60), (60, 200, 90), (240, 190, 40), (170, 90, 230), (40, 200, 220), (240, 120, 30))


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_size(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(height, width) with the longest side at most max_side, aspect kept."""
    scale = min(1.0, max_side / max(hw))
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


def heatmap_png(similarity: np.ndarray, hw: tuple[int, int], max_side: int) -> str:
    span = float(similarity.max() - similarity.min())
    scaled = (
        ((similarity - similarity.min()) / span * 255).astype(np.uint8)
        if span > 0
        else np.zeros(similarity.shape, np.uint8)
    )
    h, w = render_size(hw, max_side)
    return png_b64(np.asarray(Image.fromarray(scaled).resize((w, h), Image.Resampling.BILINEAR)))


def overlay_png(image: np.ndarray, results: list, masks: list, max_side: int) -> str:
    """The image downscaled, every query's mask tinted in its own colour and its box drawn."""
    h, w = render_size(image.shape[:2], max_side)
    scale = w / image.shape[1], h / image.shape[0]
    out = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR), np.float32).copy()
    for j, mask in enumerate(masks):
        if mask is not None:
            small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
            out[small] = 0.55 * out[small] + 0.45 * np.asarray(COLOURS[j % len(COLOURS)], np.float32)
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for j, result in enumerate(results):
        if result.box:
            x0, y0, x1, y1 = result.box
            box = [x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1]]
            draw.rectangle(box, outline=COLOURS[j % len(COLOURS)], width=2)
    return png_b64(np.asarray(canvas))


def decoder_json(result) -> dict:
    """The decoder's signals of a QueryResult or a Decoded."""
    return {
        "mask_score": result.mask_score,
        "iou_score": result.iou_score,
        "area_fraction": result.area_fraction,
    }


def mask_json(rle: str | None, mask: np.ndarray | None, mask_format: str) -> dict | None:
    """`rle` the RLE text the decoder deployment returned, `mask` the same decoded."""
    if mask is None:
        return None
    if mask_format == "rle":
        return {"format": "rle", "rle": json.loads(rle)}
    return {"format": "png", "png": png_b64(mask.astype(np.uint8) * 255)}


def result_json(result, mask: np.ndarray | None, hw: tuple[int, int], options, max_side: int) -> dict:
    """`result.mask_rle` is the RLE text the decoder deployment returned (None when rejected or not
    found); `mask` the same decoded."""
    out = {
        "query": result.query,
        "answer": result.answer,
        "found": result.found,
        "verdict": result.verdict,
        "decided_by": result.decided_by,
        "scores": {"strength": result.strength, "compactness": result.compactness, "purity": result.purity},
        "decoder": decoder_json(result),
        "box": list(result.box) if result.box else None,
        "mask": mask_json(result.mask_rle, mask, options.mask_format),
        "mask_area": int(mask.sum()) if mask is not None else None,
    }
    if options.heatmap and result.similarity is not None:
        out["heatmap_png"] = heatmap_png(result.similarity, hw, max(16, max_side // 4))  # a coarse map
    return out


def box_result_json(decoded: Decoded, mask: np.ndarray, options) -> dict:
    """One box of a box-prompt request: the box as given, its mask, the decoder's signals (no query,
    no verdict: nothing but the box prompted the decoder; no heatmap: no text to map)."""
    return {
        "box": list(decoded.box),
        "decoder": decoder_json(decoded),
        "mask": mask_json(decoded.mask_rle, mask, options.mask_format),
        "mask_area": int(mask.sum()),
    }


def response_parts(results: list, image: np.ndarray, options, max_side: int) -> dict:
    """{"results": [...], "overlay_png"?: ...}; results are QueryResults, or Decoded in box-prompt
    mode. CPU work: the ingress runs it off the event loop."""
    masks = [rle_to_mask(r.mask_rle) if r.mask_rle is not None else None for r in results]
    hw = image.shape[:2]
    out = {
        "results": [
            box_result_json(r, m, options)
            if isinstance(r, Decoded)
            else result_json(r, m, hw, options, max_side)
            for r, m in zip(results, masks, strict=True)
        ]
    }
    if options.overlay:
        out["overlay_png"] = overlay_png(image, results, masks, max_side)
    return out
