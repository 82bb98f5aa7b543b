"""What the stages hand each other (small: states, maps and masks, never image features), and
how one query's result is put together from them. No torch here: batch writers and the serving
ingress import this without loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class QueryEncoding:
    """MLLM stage output for one query."""

    image_index: int  # which image of the call the query is about
    query: str
    answer: str
    found: bool  # the answer holds every candidate token (always true when teacher-forced)
    candidates: np.ndarray | None  # (n, d) float32 states before each candidate token; None if not found
    similarity: np.ndarray | None  # (side, side) float32 [SEG]·image-token map; None if not found


@dataclass
class Screening:
    """Verifier stage, before decoding: the MedVeriSeg scores and the rule's verdict."""

    strength: float
    compactness: float
    purity: float
    rule: str  # present | absent | uncertain


@dataclass
class Decoded:
    """Decoder stage output for one query."""

    box: tuple[float, float, float, float]  # pixel xyxy in the original image, clipped to it
    box_unclipped: tuple[float, float, float, float]  # as the decoder predicts it (metrics use this)
    mask: np.ndarray | None  # bool H×W of the original image (None once sent on as `mask_rle`)
    mask_score: float  # mean foreground probability inside the mask
    iou_score: float  # SAM's predicted IoU
    area_fraction: float
    mask_rle: str | None = None  # the mask as COCO RLE text, where it crosses a process boundary


@dataclass
class QueryResult:
    """One answer of the Predictor (and of batch scoring and serving)."""

    query: str
    answer: str
    found: bool
    verdict: str | None  # present | absent | uncertain (uncertain only when nothing resolved it)
    decided_by: str | None  # rule | judge | fallback | answer (no candidate tokens in the answer)
    strength: float | None = None
    compactness: float | None = None
    purity: float | None = None
    box: tuple[float, float, float, float] | None = None
    box_unclipped: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None
    mask_rle: str | None = None  # instead of `mask` where results cross processes (serving)
    similarity: np.ndarray | None = None
    mask_score: float | None = None
    iou_score: float | None = None
    area_fraction: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, shared by the call


def wants_decoder(screening, early_reject: bool) -> bool:
    """Decode unless the answer had no candidate tokens, or early rejection is on and the rule said absent."""
    return screening is not None and not (early_reject and screening.rule == "absent")


def assemble(
    encoding, screening, decoded, verdict: str, decided_by: str, early_reject: bool = False
) -> QueryResult:
    """One result; with early rejection, a query whose final verdict is absent shows no box and no mask."""
    result = QueryResult(
        query=encoding.query,
        answer=encoding.answer,
        found=encoding.found,
        verdict=verdict,
        decided_by=decided_by,
        similarity=encoding.similarity,
    )
    if screening is not None:
        result.strength, result.compactness, result.purity = (
            screening.strength,
            screening.compactness,
            screening.purity,
        )
    if decoded is not None:
        result.box, result.box_unclipped = decoded.box, decoded.box_unclipped
        result.mask, result.mask_rle = decoded.mask, decoded.mask_rle
        result.mask_score, result.iou_score = decoded.mask_score, decoded.iou_score
        result.area_fraction = decoded.area_fraction
    if early_reject and verdict == "absent":
        result.box = result.box_unclipped = result.mask = result.mask_rle = None
    return result


class BadBox(ValueError):
    """A user-given box that cannot prompt the decoder (the message says why)."""


def check_box(box, image_hw: tuple[int, int]) -> None:
    """A prompt box must be four finite pixel coordinates x0 <= x1, y0 <= y1 that meet the image."""
    try:
        values = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = np.empty(0)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise BadBox(f"box must be four finite numbers [x0, y0, x1, y1], got {str(box)[:100]}")
    x0, y0, x1, y1 = values
    h, w = image_hw
    if x1 < x0 or y1 < y0:
        raise BadBox(f"box {values.tolist()} has x1 < x0 or y1 < y0")
    if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
        raise BadBox(f"box {values.tolist()} lies outside the {w} x {h} image")
