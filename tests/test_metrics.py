"""medisee.metrics against hand computations, and the rule that it is the only home of each metric."""

from __future__ import annotations

import ast
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medisee
from medisee.metrics import (
    MetricSums,
    balanced_accuracy,
    box_hit,
    box_iou,
    confusion,
    mask_dice,
    mask_iou,
    rejection_metrics,
)

EMPTY = np.zeros((3, 3), bool)
PRED = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)  # 3 pixels
TRUE = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], bool)  # 4 pixels; I = 2, U = 5


def test_mask_iou_and_dice_by_hand():
    assert mask_iou(PRED, TRUE) == pytest.approx(2 / (5 + 1e-5), abs=1e-15)
    assert mask_dice(PRED, TRUE) == pytest.approx(2 * 2 / (3 + 4 + 1e-6), abs=1e-15)
    assert mask_iou(PRED, PRED) == pytest.approx(3 / (3 + 1e-5), abs=1e-15)  # the epsilon keeps it below 1
    assert mask_iou(PRED, PRED) < 1.0


def test_both_empty_scores_one_and_one_empty_side_scores_zero():
    assert mask_iou(EMPTY, EMPTY) == 1.0 and mask_dice(EMPTY, EMPTY) == 1.0
    for a, b in ((EMPTY, TRUE), (PRED, EMPTY)):
        assert mask_iou(a, b) == 0.0 and mask_dice(a, b) == 0.0


def test_giou_ciou_and_dice_accumulate_per_sample_values_and_raw_sums():
    sums = MetricSums()
    box = [0.0, 0.0, 3.0, 3.0]
    for pred, true in ((PRED, TRUE), (EMPTY, EMPTY), (TRUE, TRUE)):
        sums.add("referring", pred, true, box, box)
    out = sums.finalize()
    ious = [2 / (5 + 1e-5), 1.0, 4 / (4 + 1e-5)]
    dices = [4 / (7 + 1e-6), 1.0, 8 / (8 + 1e-6)]
    assert out["giou"] == pytest.approx(sum(ious) / 3, abs=1e-12)
    assert out["dice"] == pytest.approx(sum(dices) / 3, abs=1e-12)
    assert out["ciou"] == pytest.approx((2 + 0 + 4) / (5 + 0 + 4 + 1e-10), abs=1e-12)  # the empty pair adds 0
    assert out["count"] == out["count/referring"] == 3


def test_a_group_of_empty_pairs_has_giou_one_and_ciou_zero():
    sums = MetricSums()
    sums.add("reasoning_long", EMPTY, EMPTY, [0, 0, 1, 1], [0, 0, 1, 1])
    out = sums.finalize()
    assert out["giou/reasoning_long"] == 1.0 and out["dice/reasoning_long"] == 1.0
    assert out["ciou/reasoning_long"] == 0.0


def test_box_iou_by_hand():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)  # I = 1, U = 4 + 4 - 1
    assert box_iou([0, 0, 2, 2], [2, 2, 4, 4]) == 0.0
    assert box_iou([-2, 0, 2, 2], [0, 0, 2, 2]) == pytest.approx(0.5)  # scored unclipped, as given


def test_acc50_is_strictly_above_one_half():
    assert not box_hit(0.5) and box_hit(np.nextafter(0.5, 1.0)) and not box_hit(0.0)
    sums = MetricSums()
    pixel = np.ones((1, 1), bool)
    sums.add("referring", pixel, pixel, [0, 0, 2, 1], [0, 0, 2, 2])  # box IoU exactly 0.5
    sums.add("referring", pixel, pixel, [0, 0, 2, 1.5], [0, 0, 2, 2])  # 0.75
    out = sums.finalize()
    assert out["box_iou"] == pytest.approx((0.5 + 0.75) / 2) and out["acc50"] == 0.5


def test_confusion_counts_match_a_loop():
    rng = np.random.default_rng(3)
    actual, predicted = rng.random(50) > 0.4, rng.random(50) > 0.5
    want = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for a, p in zip(actual, predicted, strict=True):
        want[("t" if a == p else "f") + ("p" if p else "n")] += 1
    assert confusion(actual, predicted) == want


def test_rejection_metrics_by_hand():
    r = rejection_metrics({"tp": 3, "fp": 1, "fn": 2, "tn": 4})
    precision, recall = 3 / 4, 3 / 5
    assert r["precision"] == pytest.approx(precision) and r["recall"] == pytest.approx(recall)
    assert r["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert r["accuracy"] == pytest.approx(7 / 10)
    assert r["balanced_accuracy"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert (r["false_queries"], r["true_queries"]) == (5, 5)


def test_undefined_rejection_metrics_are_nan_and_defined_zeros_stay_zero():
    nothing_rejected = rejection_metrics({"tp": 0, "fp": 0, "fn": 2, "tn": 3})
    assert math.isnan(nothing_rejected["precision"]) and nothing_rejected["recall"] == 0.0
    assert nothing_rejected["f1"] == 0.0  # 2·0 / (0 + 0 + 2): every false query missed
    no_false_query = rejection_metrics({"tp": 0, "fp": 1, "fn": 0, "tn": 3})
    assert math.isnan(no_false_query["recall"]) and no_false_query["precision"] == 0.0
    assert math.isnan(no_false_query["balanced_accuracy"])
    neither = rejection_metrics({"tp": 0, "fp": 0, "fn": 0, "tn": 3})
    assert math.isnan(neither["precision"]) and math.isnan(neither["recall"]) and math.isnan(neither["f1"])
    assert neither["accuracy"] == 1.0
    assert math.isnan(rejection_metrics({"tp": 0, "fp": 0, "fn": 0, "tn": 0})["accuracy"])


def test_balanced_accuracy_is_symmetric_and_nan_with_one_class():
    actual = np.array([True, True, True, False, False])
    predicted = np.array([True, False, True, False, True])
    want = (2 / 3 + 1 / 2) / 2
    assert balanced_accuracy(actual, predicted) == pytest.approx(want)
    assert balanced_accuracy(~actual, ~predicted) == pytest.approx(want)
    assert math.isnan(balanced_accuracy([True, True], [True, False]))


def test_metrics_and_the_calibration_import_without_torch():
    """The verifier stage (torch-free processes) imports the calibration, which imports the metrics."""
    code = "import sys, medisee.metrics, medisee.verify.calibrate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


METRIC_NAME = re.compile(r"dice|iou|recall|precision|accuracy|rejection|confusion|(^|_)f1($|_)")
NOT_METRICS = {
    ("model/losses.py", "dice_loss"),  # a training loss on probabilities, not a reported metric
    ("model/precision.py", "resolve_precision"),  # numeric precision (bf16 / fp32)
}


def test_no_module_but_metrics_defines_a_metric():
    root = Path(medisee.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "metrics.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and METRIC_NAME.search(
                node.name.lower()
            ):
                if (rel, node.name) not in NOT_METRICS:
                    found.append(f"{rel}: def {node.name}")
            if isinstance(node, ast.ImportFrom) and node.module == "torchvision.ops":
                found += [f"{rel}: imports box_iou" for a in node.names if a.name == "box_iou"]
    assert found == [], "metrics belong in medisee.metrics"
