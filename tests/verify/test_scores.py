"""The three MedVeriSeg scores on hand-made maps with known answers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from medisee.verify import Thresholds, Verdict, decide, score_map, score_maps
from medisee.verify.scores import Scores, box_mean


def blob(side=24, cy=8, cx=10, r=1.5, peak=10.0):
    yy, xx = np.mgrid[0:side, 0:side]
    return peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))


def noisy(m, seed=0, scale=0.05):
    return m + np.random.default_rng(seed).normal(0, scale, m.shape)


def test_single_compact_blob_is_strong_compact_and_pure():
    s = score_map(noisy(blob()).ravel())
    assert s.strength > 0.9 and s.compactness > 0.6 and s.purity > 0.99
    assert decide(s) is Verdict.PRESENT


def test_two_equal_blobs_halve_purity_and_lower_compactness():
    one = score_map(noisy(blob()))
    two = score_map(noisy(blob(cy=5, cx=5) + blob(cy=18, cx=18)))
    assert two.purity == pytest.approx(0.5, abs=0.02)
    assert two.compactness < one.compactness
    assert decide(two) is not Verdict.PRESENT


def test_uniform_noise_is_weak_and_scattered():
    # Gaussian noise: top-5 % mean ≈ 2.06σ, q95 ≈ 1.64σ -> r ≈ 1.25, strength ≈ sigmoid(0.08) ≈ 0.52
    for seed in range(5):
        s = score_map(np.random.default_rng(seed).normal(0, 1, 576))
        assert 0.45 < s.strength < 0.6 and s.compactness < 0.4 and s.purity < 0.6
        assert decide(s) is not Verdict.PRESENT


@pytest.mark.parametrize("value", [0.0, 3.7])
def test_constant_and_all_zero_maps_have_no_evidence(value):
    s = score_map(np.full(576, value))
    assert s.strength == pytest.approx(1 / (1 + np.exp(1.2 / 0.6)))  # raw ratio 0
    assert s.compactness == 0.0 and s.purity == 0.0 and s.active_count == 0
    assert decide(s) is Verdict.ABSENT


def test_nan_cells_count_as_the_weakest_response_and_all_nan_is_invalid():
    m = noisy(blob())
    with_nan = m.copy()
    with_nan[0, :5] = np.nan
    a, b = score_map(m), score_map(with_nan)
    assert np.isfinite([b.strength, b.compactness, b.purity]).all()
    assert b.purity == pytest.approx(a.purity, abs=1e-6) and b.strength == pytest.approx(a.strength, abs=0.05)
    empty = score_map(np.full(576, np.nan))
    assert not empty.valid and (empty.strength, empty.compactness, empty.purity) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("side", [24, 16, 7])
def test_non_default_sizes_and_shapes(side):
    m = noisy(blob(side=side, cy=side // 3, cx=side // 2, r=max(1.0, side / 10)))
    assert score_map(m) == score_map(m.ravel()) == score_map(m.ravel()[None, :, None])


def test_non_square_input_is_an_error():
    with pytest.raises(ValueError, match="square"):
        score_map(np.zeros(575))
    with pytest.raises(ValueError, match="square"):
        score_map(np.zeros((4, 6)))
    with pytest.raises(ValueError, match="square"):
        score_maps(np.zeros((2, 10)))


def test_batch_equals_single_maps():
    rng = np.random.default_rng(5)
    maps = np.stack(
        [noisy(blob(cy=c, cx=20 - c), seed=c).ravel() for c in range(4, 12)]
        + [rng.normal(0, 1, 576), np.zeros(576)]
    )
    batch = score_maps(maps)
    for i, m in enumerate(maps):
        single = score_map(m)
        assert batch[i].strength == pytest.approx(single.strength, abs=1e-12)
        assert batch[i].compactness == pytest.approx(single.compactness, abs=1e-12)
        assert batch[i].purity == pytest.approx(single.purity, abs=1e-12)


def test_decision_rule():
    t = Thresholds()
    assert decide(Scores(0.9, 0.9, 0.9), t) is Verdict.PRESENT
    assert decide(Scores(0.1, 0.1, 0.1), t) is Verdict.ABSENT
    assert decide(Scores(0.9, 0.1, 0.9), t) is Verdict.UNCERTAIN
    assert decide(Scores(0.475, 0.40, 0.70), t) is Verdict.PRESENT


# ---- an independent re-derivation of presence_judge.py, one map at a time ----------------------


def avg_pool_3x3(score: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(score)[None, None]
    return F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=True)[0, 0].numpy()


def uniform_3x3(score: np.ndarray) -> np.ndarray:
    return ndimage.uniform_filter(score, 3, mode="constant", cval=0.0)


def rederived(flat: np.ndarray, smooth=avg_pool_3x3) -> tuple[float, float, float, int]:
    """(strength, compactness, purity, active count) with plain loops over one map."""
    eps, side = 1e-6, int(round(math.sqrt(flat.size)))
    raw = flat.reshape(side, side).astype(np.float64)
    q50, q95 = np.quantile(raw, 0.50), np.quantile(raw, 0.95)
    topk = np.sort(raw.ravel())[::-1][: max(1, int(flat.size * 0.05))].mean()
    ratio = max((topk - q50) / (q95 - q50 + eps), 0.0)
    strength = 1 / (1 + math.exp(-(ratio - 1.2) / 0.6))
    score = smooth(np.maximum((raw - q50) / (q95 - q50 + eps), 0.0))
    positive = score[score > 0]
    if positive.size == 0:
        return strength, 0.0, 0.0, 0
    active = score >= max(float(np.quantile(positive, 0.8)), 0.4)
    if not active.any():
        return strength, 0.0, 0.0, 0
    ys, xs = np.nonzero(active)
    w = score[ys, xs]
    cy, cx = (w * ys).sum() / (w.sum() + eps), (w * xs).sum() / (w.sum() + eps)
    spread = (w * np.hypot(ys - cy, xs - cx)).sum() / (w.sum() * (math.hypot(side - 1, side - 1) + eps) + eps)
    compactness = min(max(math.exp(-spread / 0.18), 0.0), 1.0)
    labels, count = ndimage.label(active, structure=np.ones((3, 3), bool))
    best = max(score[labels == j].sum() for j in range(1, count + 1))
    purity = min(best / (score[active].sum() + eps), 1.0)
    return strength, compactness, purity, int(active.sum())


def residue_map(seed: int = 0) -> np.ndarray:
    """Large responses next to zeros, and a few tiny isolated ones: a running-sum filter leaves
    ±1e-17 residues around the large values that join the positive set and move the threshold."""
    rng = np.random.default_rng(seed)
    m = np.zeros((24, 24))
    m[3:8, 3:10] = rng.random((5, 7)) * 1e3 + 1
    m[14:17, 15:18] = rng.random((3, 3)) * 1e3 + 1
    cells = rng.integers(0, 24, (30, 2))
    m[cells[:, 0], cells[:, 1]] = rng.random(30) * 1e-3
    return m


def varied_maps(side: int) -> list[np.ndarray]:
    rng = np.random.default_rng(side)
    c = side / 24
    maps = [
        noisy(blob(side, int(8 * c), int(10 * c), 1.5 * c)),
        noisy(blob(side, int(5 * c), int(5 * c)) + blob(side, int(18 * c), int(18 * c)), seed=1),
        rng.normal(0, 1, (side, side)),
        np.full((side, side), 2.5),
        noisy(blob(side, 0, 0, 2.0) + 0.5 * blob(side, side - 1, side // 2, 1.5), seed=2),  # border blobs
        rng.exponential(1.0, (side, side)) * (rng.random((side, side)) > 0.7),  # sparse, many exact zeros
    ]
    return [*maps, residue_map()] if side == 24 else maps


@pytest.mark.parametrize("side", [24, 16])
def test_score_maps_equal_an_independent_rederivation(side):
    maps = varied_maps(side)
    batch = score_maps(np.stack([m.ravel() for m in maps]))
    for m, got in zip(maps, batch, strict=True):
        strength, compactness, purity, count = rederived(m.ravel())
        assert got.active_count == count
        assert got.strength == pytest.approx(strength, abs=1e-6)
        assert got.compactness == pytest.approx(compactness, abs=1e-6)
        assert got.purity == pytest.approx(purity, abs=1e-6)
        assert got == score_map(m)


def test_smoothing_is_exact_where_a_running_sum_filter_leaves_residues():
    m = residue_map()
    pooled = rederived(m.ravel(), avg_pool_3x3)
    running = rederived(m.ravel(), uniform_3x3)
    assert running[3] != pooled[3]  # the map really exercises the residues
    got = score_map(m)
    assert got.active_count == pooled[3]
    assert got.purity == pytest.approx(pooled[2], abs=1e-9)
    assert got.compactness == pytest.approx(pooled[1], abs=1e-9)


def test_box_mean_is_avg_pool2d_exactly():
    rng = np.random.default_rng(3)
    maps = rng.random((3, 16, 16)) * (rng.random((3, 16, 16)) > 0.8) * 1e3
    expected = F.avg_pool2d(torch.from_numpy(maps)[:, None], 3, 1, 1, count_include_pad=True)[:, 0].numpy()
    got = box_mean(maps, 3)
    assert np.abs(got - expected).max() < 1e-12
    assert np.array_equal(got > 0, expected > 0)
