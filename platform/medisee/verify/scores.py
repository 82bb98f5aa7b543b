"""Strength, compactness and purity of a [SEG]-to-image similarity map, as the MedVeriSeg release
defines them, vectorised over a batch of maps.

    strength     sigmoid((r - 1.2) / 0.6), r = (top-5% mean - q50) / (q95 - q50), clipped at 0
    compactness  exp(-spread / 0.18): the score-weighted mean distance of the active set from its
                 weighted centre, over the grid diagonal
    purity       energy of the strongest 8-connected active component / total active energy

The score map is ReLU((map - q50) / (q95 - q50)), 3×3 average-smoothed with zero padding counted;
the active set is score ≥ max(80th percentile of the positive scores, 0.40).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ScoreParams:
    topk_ratio: float = 0.05
    active_quantile: float = 0.80
    active_abs_floor: float = 0.40
    smooth_kernel: int = 3
    strength_tau: float = 1.20
    strength_temp: float = 0.60
    compactness_tau: float = 0.18
    eps: float = 1e-6


@dataclass(frozen=True)
class Scores:
    strength: float
    compactness: float
    purity: float
    active_count: int = 0
    valid: bool = True  # False when the map had no finite value


def _as_batch(similarity: np.ndarray) -> tuple[np.ndarray, int]:
    batch = np.asarray(similarity, dtype=np.float64)
    if batch.ndim == 1:
        batch = batch[None]
    elif batch.ndim == 3 and batch.shape[1] == batch.shape[2]:
        batch = batch.reshape(batch.shape[0], -1)
    elif batch.ndim != 2:
        raise ValueError(f"similarity maps must be (B, N) or (B, side, side), got shape {batch.shape}")
    n = batch.shape[1]
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"similarity map length must be a square number, got N={n}")
    return batch, side


def score_map(similarity: np.ndarray, params: ScoreParams = ScoreParams()) -> Scores:
    """Scores of one map: flat length N = side², or side×side (any shape that squeezes to those)."""
    x = np.squeeze(np.asarray(similarity))
    if x.ndim == 2:
        if x.shape[0] != x.shape[1]:
            raise ValueError(f"similarity map must be square, got shape {x.shape}")
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"similarity map must flatten to 1-D, got shape {np.shape(similarity)}")
    return score_maps(x[None], params)[0]


def score_maps(batch: np.ndarray, params: ScoreParams = ScoreParams()) -> list[Scores]:
    """Scores of a batch of maps (B, N) or (B, side, side)."""
    maps, side = _as_batch(batch)
    finite = np.isfinite(maps)
    valid = finite.any(1)
    # non-finite cells (NaN, inf) count as the weakest response of their map
    floor = np.where(
        valid, np.nanmin(np.where(finite, maps, np.nan), axis=1, initial=np.inf, where=finite), 0.0
    )
    maps = np.where(finite, maps, floor[:, None])
    b, n = maps.shape
    eps = params.eps

    q50 = np.quantile(maps, 0.50, axis=1)
    q95 = np.quantile(maps, 0.95, axis=1)
    k = max(1, int(n * params.topk_ratio))
    topk_mean = -np.sort(-maps, axis=1)[:, :k].mean(1)
    raw = np.maximum((topk_mean - q50) / (q95 - q50 + eps), 0.0)
    strength = 1.0 / (1.0 + np.exp(-(raw - params.strength_tau) / params.strength_temp))

    score = np.maximum((maps - q50[:, None]) / (q95 - q50 + eps)[:, None], 0.0).reshape(b, side, side)
    if params.smooth_kernel > 1:
        score = ndimage.uniform_filter(
            score, size=(1, params.smooth_kernel, params.smooth_kernel), mode="constant", cval=0.0
        )

    compactness = np.zeros(b)
    purity = np.zeros(b)
    active_count = np.zeros(b, int)
    active = np.zeros_like(score, dtype=bool)
    for i in range(b):
        positive = score[i][score[i] > 0]
        if positive.size == 0:
            continue
        threshold = max(float(np.quantile(positive, params.active_quantile)), params.active_abs_floor)
        active[i] = score[i] >= threshold
    ys_grid, xs_grid = np.mgrid[0:side, 0:side]
    diag = math.sqrt(2 * (side - 1) ** 2) + eps
    weights = np.where(active, score, 0.0)
    totals = weights.sum((1, 2))
    has_active = active.any((1, 2))
    cy = (weights * ys_grid).sum((1, 2)) / (totals + eps)
    cx = (weights * xs_grid).sum((1, 2)) / (totals + eps)
    dist = np.sqrt((ys_grid[None] - cy[:, None, None]) ** 2 + (xs_grid[None] - cx[:, None, None]) ** 2)
    spread = (weights * dist).sum((1, 2)) / (totals * diag + eps)
    compactness = np.where(has_active, np.clip(np.exp(-spread / params.compactness_tau), 0.0, 1.0), 0.0)
    active_count = active.sum((1, 2))

    # 8-connected components per map: a 3-D structure with no links between batch entries
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    labels, count = ndimage.label(active, structure=structure)
    if count:
        energy = ndimage.sum(score, labels, index=np.arange(1, count + 1))
        owner = ndimage.maximum(
            np.broadcast_to(np.arange(b)[:, None, None], labels.shape), labels, np.arange(1, count + 1)
        )
        best = np.zeros(b)
        np.maximum.at(best, owner.astype(int), energy)
        purity = np.where(has_active, np.clip(best / (totals + eps), 0.0, 1.0), 0.0)
    return [
        Scores(
            float(strength[i]) if valid[i] else 0.0,
            float(compactness[i]) if valid[i] else 0.0,
            float(purity[i]) if valid[i] else 0.0,
            int(active_count[i]),
            bool(valid[i]),
        )
        for i in range(b)
    ]
