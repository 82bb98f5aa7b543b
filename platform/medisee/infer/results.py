"""What the stages hand each other (small: states, maps and masks, never image features)."""

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
    mask: np.ndarray  # bool H×W of the original image
    mask_score: float  # mean foreground probability inside the mask
    iou_score: float  # SAM's predicted IoU
    area_fraction: float


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
    similarity: np.ndarray | None = None
    mask_score: float | None = None
    iou_score: float | None = None
    area_fraction: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, shared by the call
