"""Benchmark of rejection: how well the verifier tells true from false queries."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from medisee.metrics import confusion, rejection_metrics
from medisee.verify.calibrate import FEATURES, CalibratedVerifier, Evidence
from medisee.verify.decision import Verdict, decide


def auroc(values: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum statistic (ties get average ranks)."""
    labels = np.asarray(labels, bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(values)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def evaluate_verifier(
    verifier: CalibratedVerifier,
    evidence: list[Evidence],
    present: list[bool],
    verdicts: list[Verdict] | None = None,
) -> dict:
    """Rejection metrics (medisee.metrics: NaN where undefined, e.g. without false queries);
    `verdicts` overrides the calibrated rule's own (e.g. with a judge in the loop)."""
    y = np.asarray(present, bool)
    if verdicts is None:
        verdicts = [verifier.verdict(e)[0] for e in evidence]
    predicted = np.array([v is Verdict.PRESENT for v in verdicts])
    uncertain = np.array([decide(e.scores, verifier.thresholds) is Verdict.UNCERTAIN for e in evidence])
    rejection = rejection_metrics(confusion(actual=~y, predicted=~predicted))
    feats = np.stack([e.features() for e in evidence])
    report = {
        "queries": int(len(y)),
        "true_queries": int(y.sum()),
        "false_queries": int((~y).sum()),
        "accuracy": rejection["accuracy"],
        "balanced_accuracy": rejection["balanced_accuracy"],
        "rejection_precision": rejection["precision"],
        "rejection_recall": rejection["recall"],
        "rejection_f1": rejection["f1"],
        "share_uncertain": float(uncertain.mean()),
        "auroc_combined": auroc(np.array([verifier.probability(e) for e in evidence]), y),
    }
    for i, name in enumerate(FEATURES):
        report[f"auroc_{name}"] = auroc(feats[:, i], y)
    return report


def markdown_table(report: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key, value in report.items():
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def split_by_image(rows: list[dict], fraction: float = 0.5) -> tuple[list[int], list[int]]:
    """Indices of a calibration part and a held-out part, never splitting one image's rows."""
    from medisee.data.prompts import pick

    first, second = [], []
    for i, row in enumerate(rows):
        (first if pick(range(1000), row["image_id"] + "/verifier") < fraction * 1000 else second).append(i)
    return first, second
