import io

import numpy as np
import pytest
from PIL import Image

from medisee.metrics import balanced_accuracy
from medisee.verify import Scores, Verdict
from medisee.verify.calibrate import CalibratedVerifier, Evidence, calibrate
from medisee.verify.heatmap import heatmap_on_image, overlay_png


def synthetic(n=400, seed=0):
    """True queries score above (0.6, 0.5, 0.8), false ones below, with a band of overlap in compactness."""
    rng = np.random.default_rng(seed)
    present = rng.random(n) < 0.5
    ev = []
    for p in present:
        if p:
            s = Scores(rng.uniform(0.62, 1.0), rng.uniform(0.45, 1.0), rng.uniform(0.82, 1.0))
        else:
            s = Scores(rng.uniform(0.0, 0.58), rng.uniform(0.0, 0.55), rng.uniform(0.0, 0.78))
        ev.append(Evidence(s, mask_score=rng.uniform(0.7, 1.0) if p else rng.uniform(0.3, 0.75)))
    return ev, present.tolist()


def test_calibration_recovers_thresholds_on_a_separable_set():
    evidence, present = synthetic()
    verifier = calibrate(evidence, present)
    t = verifier.thresholds
    # the separating bands are strength (0.58, 0.62] and purity (0.78, 0.82]; compactness overlaps.
    # Candidates come from a 21-level quantile grid, so allow one grid step above the band.
    assert 0.58 < t.strength <= 0.64 and 0.78 < t.purity <= 0.84 and 0.45 <= t.compactness <= 0.56
    assert verifier.balanced_accuracy > 0.97
    test_ev, test_present = synthetic(seed=1)
    predicted = [verifier.verdict(e)[0] is Verdict.PRESENT for e in test_ev]
    assert balanced_accuracy(np.array(test_present), np.array(predicted)) > 0.95


def test_calibration_round_trips_as_json_and_needs_both_classes():
    evidence, present = synthetic(n=100)
    verifier = calibrate(evidence, present)
    again = CalibratedVerifier.from_json(verifier.to_json())
    assert again == verifier
    with pytest.raises(ValueError, match="both"):
        calibrate(evidence[:5], [True] * 5)


def test_uncertain_cases_go_to_the_fallback():
    verifier = CalibratedVerifier(
        weights=[0, 0, 0, 5.0, 0, 0], mean=[0] * 6, std=[1] * 6, fallback_threshold=0.5
    )
    uncertain = Scores(0.9, 0.1, 0.9)
    assert verifier.verdict(Evidence(uncertain, mask_score=0.9)) == (Verdict.PRESENT, True)
    assert verifier.verdict(Evidence(uncertain, mask_score=-0.9)) == (Verdict.ABSENT, True)
    assert verifier.verdict(Evidence(Scores(0.9, 0.9, 0.9))) == (Verdict.PRESENT, False)


@pytest.mark.parametrize("hw", [(120, 120), (100, 200), (200, 100)])
def test_heatmap_undoes_the_clip_crop(hw):
    h, w = hw
    grid = np.zeros((8, 8))
    grid[0, 0] = 1.0  # top-left cell of the CLIP crop
    heat = heatmap_on_image(grid, h, w, clip_size=64)
    valid = ~np.isnan(heat)
    side = min(h, w)
    assert valid.sum() == pytest.approx(side * side, rel=0.02)  # the crop is the centred square
    ys, xs = np.nonzero(valid)
    assert abs(xs.min() - (w - side) / 2) <= 1 and abs(ys.min() - (h - side) / 2) <= 1
    peak = np.unravel_index(np.nanargmax(heat), heat.shape)
    assert peak[0] - ys.min() < side / 8 + 1 and peak[1] - xs.min() < side / 8 + 1


@pytest.mark.parametrize("hw", [(100, 200), (200, 100), (64, 64)])
def test_a_padded_frame_map_covers_the_image_from_the_top_left_corner(hw):
    """medisee-lite's map covers the SAM frame: a square of the image's longest side at the top-left
    (padding right / bottom), so every image pixel has a value and the cell (i, j) lands at
    (i, j) * longest side / grid."""
    h, w = hw
    side = max(h, w)
    grid = np.zeros((8, 8))
    grid[1, 2] = 1.0
    heat = heatmap_on_image(grid, h, w, clip_size=256, padded=True)
    assert not np.isnan(heat).any() and heat.shape == (h, w)
    cell = side / 8
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(peak[0] - 1.5 * cell) <= cell / 2 and abs(peak[1] - 2.5 * cell) <= cell / 2


def test_overlay_png_has_the_image_size():
    image = np.full((50, 80, 3), 100, np.uint8)
    png = overlay_png(image, np.random.default_rng(0).random((8, 8)), clip_size=64)
    out = np.asarray(Image.open(io.BytesIO(png)))
    assert out.shape == (50, 80, 3)
    assert (out[:, :15] == 100).all() and not (out[:, 20:60] == 100).all()  # outside the crop untouched
