"""Benchmark of rejection: how well the verifier tells true from false queries."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from medisee.verify.calibrate import FEATURES, CalibratedVerifier, Evidence, balanced_accuracy
from medisee.verify.decision import Verdict, decide
from medisee.verify.scores import score_maps


def collect_evidence(
    model, rows: list[dict], batch_size: int = 16
) -> tuple[list[Evidence], list[bool], list]:
    """Run the model on true and false queries; return evidence, presence labels and predictions."""
    from medisee.infer.rows import predict_rows

    preds = predict_rows(model, rows, batch_size=batch_size)
    scores = score_maps(np.stack([p.similarity.reshape(-1) for p in preds])) if preds else []
    evidence = [
        Evidence(s, p.mask_score, p.iou_score, p.area_fraction) for s, p in zip(scores, preds, strict=True)
    ]
    present = [r["query_kind"] != "false_query" for r in rows]
    return evidence, present, preds


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
    """Rejection metrics; `verdicts` overrides the calibrated rule's own (e.g. with a judge in the loop)."""
    y = np.asarray(present, bool)
    if verdicts is None:
        verdicts = [verifier.verdict(e)[0] for e in evidence]
    predicted = np.array([v is Verdict.PRESENT for v in verdicts])
    uncertain = np.array([decide(e.scores, verifier.thresholds) is Verdict.UNCERTAIN for e in evidence])
    rejected, absent = ~predicted, ~y
    tp = float((rejected & absent).sum())
    precision = tp / max(1.0, float(rejected.sum()))
    recall = tp / max(1.0, float(absent.sum()))
    feats = np.stack([e.features() for e in evidence])
    report = {
        "queries": int(len(y)),
        "true_queries": int(y.sum()),
        "false_queries": int((~y).sum()),
        "accuracy": float((predicted == y).mean()),
        "balanced_accuracy": balanced_accuracy(y, predicted),
        "rejection_precision": precision,
        "rejection_recall": recall,
        "rejection_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
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
