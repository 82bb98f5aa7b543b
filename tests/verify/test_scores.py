"""The three MedVeriSeg scores on hand-made maps with known answers."""

import numpy as np
import pytest

from medisee.verify import Thresholds, Verdict, decide, score_map, score_maps
from medisee.verify.scores import Scores


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
