import numpy as np
import pytest

from medisee.verify import Scores
from medisee.verify.calibrate import CalibratedVerifier, Evidence
from medisee.verify.evaluate import auroc, evaluate_verifier, markdown_table, split_by_image


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    values, labels = rng.random(60), rng.random(60) > 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in values[labels] for b in values[~labels]]
    assert auroc(values, labels) == pytest.approx(np.mean(pairs))
    assert auroc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))


def test_rejection_report():
    present = [True, True, False, False]
    evidence = [
        Evidence(Scores(0.9, 0.9, 0.9)),
        Evidence(Scores(0.1, 0.1, 0.1)),
        Evidence(Scores(0.1, 0.1, 0.1)),
        Evidence(Scores(0.2, 0.1, 0.1)),
    ]
    report = evaluate_verifier(CalibratedVerifier(), evidence, present)
    # one true query wrongly rejected; both false queries rejected
    assert report["accuracy"] == 0.75 and report["balanced_accuracy"] == 0.75
    assert report["rejection_recall"] == 1.0 and report["rejection_precision"] == pytest.approx(2 / 3)
    assert report["share_uncertain"] == 0.0 and report["auroc_strength"] == pytest.approx(0.625)
    assert "| balanced_accuracy | 0.7500 |" in markdown_table(report)


def test_rejection_metrics_without_false_queries_are_nan_not_zero():
    present = [True, True, True]
    evidence = [
        Evidence(Scores(0.9, 0.9, 0.9)),
        Evidence(Scores(0.9, 0.9, 0.9)),
        Evidence(Scores(0.1, 0.1, 0.1)),
    ]
    report = evaluate_verifier(CalibratedVerifier(), evidence, present)
    # one true query wrongly rejected: precision 0 / 1; recall and balanced accuracy undefined
    assert report["rejection_precision"] == 0.0 and report["rejection_f1"] == 0.0
    assert np.isnan(report["rejection_recall"]) and np.isnan(report["balanced_accuracy"])
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert "| rejection_recall | nan |" in markdown_table(report)


def test_split_by_image_keeps_images_together():
    rows = [{"image_id": f"img{i // 3}"} for i in range(60)]
    first, second = split_by_image(rows)
    assert sorted(first + second) == list(range(60)) and first and second
    assert not {rows[i]["image_id"] for i in first} & {rows[i]["image_id"] for i in second}
