import numpy as np
import pytest

from medisee.metrics import MetricSums


def random_case(rng):
    true = rng.random((20, 20)) > 0.7
    pred = rng.random((20, 20)) > 0.6
    return pred, true, [2.0, 2.0, 12.0, 15.0], [3.0, 1.0, 14.0, 15.0]


def test_merged_worker_sums_equal_single_process_computation():
    rng = np.random.default_rng(0)
    cases = [("referring" if i % 3 else "reasoning_long", *random_case(rng)) for i in range(30)]
    whole, a, b = MetricSums(), MetricSums(), MetricSums()
    for i, case in enumerate(cases):
        whole.add(*case)
        (a if i % 2 == 0 else b).add(*case)
    merged = a.merge(b).finalize()
    single = whole.finalize()
    assert merged.keys() == single.keys()
    for key in single:
        assert merged[key] == pytest.approx(single[key])
    # cIoU is a ratio of sums, not a mean of per-worker cIoUs
    mean_of_means = (a.finalize()["ciou"] + b.finalize()["ciou"]) / 2
    inter = sum(np.logical_and(p, t).sum() for _, p, t, _, _ in cases)
    union = sum(np.logical_or(p, t).sum() for _, p, t, _, _ in cases)
    assert single["ciou"] == pytest.approx(inter / union)
    assert merged["ciou"] == pytest.approx(inter / union)
    assert mean_of_means != pytest.approx(inter / union, abs=1e-6)  # the two do differ on these cases


def test_metric_values_on_known_masks():
    sums = MetricSums()
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    sums.add("referring", mask, mask, [0, 0, 10, 5], [0, 0, 10, 5])
    half = np.zeros((10, 10), bool)
    half[:5, :5] = True
    sums.add("referring", half, mask, [0, 0, 5, 5], [0, 0, 10, 5])
    out = sums.finalize()
    assert out["giou"] == pytest.approx((50 / (50 + 1e-5) + 25 / (50 + 1e-5)) / 2, abs=1e-12)
    assert out["ciou"] == pytest.approx((50 + 25) / (50 + 50 + 1e-10), abs=1e-12)
    assert out["dice"] == pytest.approx((100 / (100 + 1e-6) + 50 / (75 + 1e-6)) / 2, abs=1e-12)
    assert out["box_iou"] == pytest.approx((1 + 0.5) / 2)
    assert out["acc50"] == pytest.approx(0.5)  # the second box has IoU exactly 0.5: not a hit
    assert out["count/referring"] == 2


def one(pred, true, pred_box=(0, 0, 4, 4), true_box=(0, 0, 4, 4)):
    sums = MetricSums()
    sums.add("referring", np.asarray(pred, bool), np.asarray(true, bool), list(pred_box), list(true_box))
    return sums.finalize()


EMPTY = np.zeros((4, 4), bool)
PIXEL = np.zeros((4, 4), bool)
PIXEL[1, 2] = True


def test_both_empty_scores_one_but_adds_nothing_to_ciou():
    out = one(EMPTY, EMPTY)
    assert out["giou"] == 1.0 and out["dice"] == 1.0
    assert out["ciou"] == 0.0  # ΣI / (ΣU + 1e-10) with every union 0


def test_one_empty_side_scores_zero():
    for pred, true in ((EMPTY, PIXEL), (PIXEL, EMPTY)):
        out = one(pred, true)
        assert out["giou"] == 0.0 and out["dice"] == 0.0 and out["ciou"] == 0.0


def test_single_pixel_match_uses_the_reference_epsilons():
    out = one(PIXEL, PIXEL)
    assert out["giou"] == pytest.approx(1 / (1 + 1e-5), abs=1e-15)
    assert out["dice"] == pytest.approx(2 / (2 + 1e-6), abs=1e-15)
    assert out["ciou"] == pytest.approx(1 / (1 + 1e-10), abs=1e-15)


def test_empty_pair_counts_in_giou_mean_but_not_in_ciou():
    sums = MetricSums()
    sums.add("referring", EMPTY, EMPTY, [0, 0, 4, 4], [0, 0, 4, 4])
    half = np.zeros((4, 4), bool)
    half[:2] = True
    sums.add("referring", half, half, [0, 0, 4, 4], [0, 0, 4, 4])
    out = sums.finalize()
    assert out["giou"] == pytest.approx((1.0 + 8 / (8 + 1e-5)) / 2, abs=1e-12)
    assert out["ciou"] == pytest.approx(8 / (8 + 1e-10), abs=1e-12)


def test_acc50_is_strictly_above_one_half_and_box_is_scored_as_passed():
    exactly_half = one(PIXEL, PIXEL, (0, 0, 10, 5), (0, 0, 10, 10))
    assert exactly_half["box_iou"] == pytest.approx(0.5) and exactly_half["acc50"] == 0.0
    above = one(PIXEL, PIXEL, (0, 0, 10, 5.1), (0, 0, 10, 10))
    assert above["acc50"] == 1.0
    # an unclipped box reaching outside the image is scored as it is: IoU 100 / 200
    outside = one(PIXEL, PIXEL, (-10, 0, 10, 10), (0, 0, 10, 10))
    assert outside["box_iou"] == pytest.approx(0.5) and outside["acc50"] == 0.0


def test_half_written_checkpoints_are_never_picked_up(tmp_path):
    from medisee.config import load_config
    from medisee.storage import StorageSettings
    from medisee.train.checkpoints import checkpoint_dir, list_checkpoints
    from medisee.train.recipe import lr_lambda

    cfg = load_config("tiny", [f"run.storage_uri={tmp_path}", "run.name=r"])
    folder = tmp_path / "r" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-00000003.pt").write_bytes(b"x")
    (folder / "step-00000006.pt.tmp-0123abcd").write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(cfg, StorageSettings())] == [3]
    assert checkpoint_dir(cfg).endswith("r/checkpoints")
    f = lr_lambda(10, 110)
    assert f(0) == 0.1 and f(9) == 1.0 and f(60) == 0.5 and f(110) == 0.0
