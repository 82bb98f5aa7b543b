"""Strength, compactness and purity of a [SEG]-to-image similarity map, as the MedVeriSeg release
defines them, vectorised over a batch of maps.

    strength     sigmoid((r - 1.2) / 0.6), r = (top-5% mean - q50) / (q95 - q50), clipped at 0
    compactness  exp(-spread / 0.18): the score-weighted mean distance of the active set from its
                 weighted centre, over the grid diagonal
    purity       energy of the strongest 8-connected active component / total active energy

The score map is ReLU((map - q50) / (q95 - q50)), 3×3 average-smoothed with zero padding counted
(the release's `avg_pool2d(k=3, stride=1, padding=1)`); the active set is
score ≥ max(80th percentile of the positive scores, 0.40), "positive" meaning > 0 after smoothing.
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


def box_mean(maps: np.ndarray, kernel: int) -> np.ndarray:
    """k×k mean over (B, side, side) with zero padding counted, as avg_pool2d(k, 1, k // 2).

    Summed window by window from shifted slices (no running sum), so a cell with no positive
    neighbour is exactly 0: scipy's uniform_filter leaves ±1e-17 there, which changes the active set.
    """
    if kernel % 2 == 0:
        raise ValueError(f"smooth_kernel must be odd, got {kernel}")
    pad = kernel // 2
    side_y, side_x = maps.shape[1:]
    padded = np.pad(maps, ((0, 0), (pad, pad), (pad, pad)))
    total = np.zeros_like(maps)
    for dy in range(kernel):
        for dx in range(kernel):
            total += padded[:, dy : dy + side_y, dx : dx + side_x]
    return total / (kernel * kernel)


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
    maps, valid = _fill_non_finite(maps)
    strength, score = _strength_and_score(maps, params)
    score = score.reshape(len(maps), side, side)
    if params.smooth_kernel > 1:
        score = box_mean(score, params.smooth_kernel)
    active = _active_sets(score, params)
    weights = np.where(active, score, 0.0)
    compactness = _compactness(weights, params)
    purity = _purity(weights, active, params.eps)
    has_active = active.any((1, 2))
    return [
        Scores(
            float(strength[i]) if valid[i] else 0.0,
            float(compactness[i]) if valid[i] and has_active[i] else 0.0,
            float(purity[i]) if valid[i] and has_active[i] else 0.0,
            int(active[i].sum()),
            bool(valid[i]),
        )
        for i in range(len(maps))
    ]


def _fill_non_finite(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-finite cells (NaN, inf) count as the weakest response of their map; (maps, valid rows)."""
    finite = np.isfinite(maps)
    valid = finite.any(1)
    floor = np.where(
        valid, np.nanmin(np.where(finite, maps, np.nan), axis=1, initial=np.inf, where=finite), 0.0
    )
    return np.where(finite, maps, floor[:, None]), valid


def _strength_and_score(maps: np.ndarray, params: ScoreParams) -> tuple[np.ndarray, np.ndarray]:
    """Strength (B,) and the unsmoothed score maps ReLU((map - q50) / (q95 - q50)) (B, N)."""
    q50 = np.quantile(maps, 0.50, axis=1)
    q95 = np.quantile(maps, 0.95, axis=1)
    spread = (q95 - q50 + params.eps)[:, None]
    k = max(1, int(maps.shape[1] * params.topk_ratio))
    topk_mean = -np.sort(-maps, axis=1)[:, :k].mean(1)
    raw = np.maximum((topk_mean - q50) / spread[:, 0], 0.0)
    strength = 1.0 / (1.0 + np.exp(-(raw - params.strength_tau) / params.strength_temp))
    return strength, np.maximum((maps - q50[:, None]) / spread, 0.0)


def _active_sets(score: np.ndarray, params: ScoreParams) -> np.ndarray:
    """score ≥ max(quantile of the map's positive scores, floor); empty where no score is positive."""
    active = np.zeros_like(score, dtype=bool)
    for i, one in enumerate(score):
        positive = one[one > 0]
        if positive.size:
            threshold = max(float(np.quantile(positive, params.active_quantile)), params.active_abs_floor)
            active[i] = one >= threshold
    return active


def _compactness(weights: np.ndarray, params: ScoreParams) -> np.ndarray:
    """exp(-spread / tau): weighted mean distance from the weighted centre, over the grid diagonal."""
    side, eps = weights.shape[1], params.eps
    ys, xs = np.mgrid[0:side, 0:side]
    totals = weights.sum((1, 2))
    cy = (weights * ys).sum((1, 2)) / (totals + eps)
    cx = (weights * xs).sum((1, 2)) / (totals + eps)
    dist = np.sqrt((ys[None] - cy[:, None, None]) ** 2 + (xs[None] - cx[:, None, None]) ** 2)
    diag = math.sqrt(2 * (side - 1) ** 2) + eps
    spread = (weights * dist).sum((1, 2)) / (totals * diag + eps)
    return np.clip(np.exp(-spread / params.compactness_tau), 0.0, 1.0)


def _purity(weights: np.ndarray, active: np.ndarray, eps: float) -> np.ndarray:
    """Energy of the strongest 8-connected active component / (total active energy + eps)."""
    b = len(weights)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # 8-connectivity within a map, no links between maps of the batch
    labels, count = ndimage.label(active, structure=structure)
    best = np.zeros(b)
    if count:
        index = np.arange(1, count + 1)
        energy = ndimage.sum(weights, labels, index=index)
        owner = ndimage.maximum(np.broadcast_to(np.arange(b)[:, None, None], labels.shape), labels, index)
        np.maximum.at(best, owner.astype(int), energy)
    return np.clip(best / (weights.sum((1, 2)) + eps), 0.0, 1.0)
