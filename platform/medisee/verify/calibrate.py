"""Calibration of the verifier on a validation split of true and false queries.

Fits the three thresholds of the decision rule and a fallback for the uncertain case: a logistic
combination of the similarity-map scores and the training-free decoder-side signals (mean mask
probability inside the mask, SAM's predicted IoU, mask area; see FINDINGS.md). The objective is
balanced accuracy of the whole rule (present / absent, uncertain resolved by the fallback).
The result is a small JSON document stored with the model version.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize

from medisee.metrics import balanced_accuracy
from medisee.verify.decision import Thresholds, Verdict, decide
from medisee.verify.scores import Scores

FEATURES = ("strength", "compactness", "purity", "mask_score", "iou_score", "area_fraction")


@dataclass(frozen=True)
class Evidence:
    """Everything the verifier may look at for one query (all training-free)."""

    scores: Scores
    mask_score: float = 0.0
    iou_score: float = 0.0
    area_fraction: float = 0.0

    def features(self) -> np.ndarray:
        s = self.scores
        return np.array(
            [s.strength, s.compactness, s.purity, self.mask_score, self.iou_score, self.area_fraction]
        )


@dataclass
class CalibratedVerifier:
    thresholds: Thresholds = field(default_factory=Thresholds)
    weights: list[float] = field(default_factory=lambda: [0.0] * len(FEATURES))
    bias: float = 0.0
    mean: list[float] = field(default_factory=lambda: [0.0] * len(FEATURES))
    std: list[float] = field(default_factory=lambda: [1.0] * len(FEATURES))
    fallback_threshold: float = 0.5
    balanced_accuracy: float | None = None

    def probability(self, evidence: Evidence) -> float:
        z = (evidence.features() - np.array(self.mean)) / np.array(self.std)
        return float(1.0 / (1.0 + np.exp(-(z @ np.array(self.weights) + self.bias))))

    def verdict(self, evidence: Evidence) -> tuple[Verdict, bool]:
        """(present/absent, whether the fallback decided)."""
        rule = decide(evidence.scores, self.thresholds)
        if rule is not Verdict.UNCERTAIN:
            return rule, False
        present = self.probability(evidence) >= self.fallback_threshold
        return (Verdict.PRESENT if present else Verdict.ABSENT), True

    def to_json(self) -> str:
        data = asdict(self)
        data["thresholds"] = asdict(self.thresholds)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> CalibratedVerifier:
        data = json.loads(text)
        data["thresholds"] = Thresholds(**data["thresholds"])
        return cls(**data)


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> tuple[np.ndarray, float]:
    def loss(theta):
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        return float(np.mean(np.logaddexp(0, z) - y * z) + l2 * (w @ w))

    def grad(theta):
        w, b = theta[:-1], theta[-1]
        p = 1 / (1 + np.exp(-(x @ w + b)))
        return np.concatenate([x.T @ (p - y) / len(y) + 2 * l2 * w, [np.mean(p - y)]])

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=grad, method="L-BFGS-B")
    return result.x[:-1], float(result.x[-1])


def calibrate(evidence: list[Evidence], present: list[bool], grid: int = 21) -> CalibratedVerifier:
    """Fit thresholds and the fallback to maximise balanced accuracy on (evidence, present).

    Among equally accurate thresholds, the ones that leave the fewest queries uncertain win
    (fewer fallback or judge decisions).
    """
    if len(set(present)) < 2:  # balanced accuracy (NaN with one class) is then always defined
        raise ValueError("calibration needs both true and false queries")
    y = np.asarray(present, bool)
    feats = np.stack([e.features() for e in evidence])
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    weights, bias = _fit_logistic((feats - mean) / std, y.astype(float))
    probs = 1 / (1 + np.exp(-(((feats - mean) / std) @ weights + bias)))
    candidates = np.unique(np.quantile(probs, np.linspace(0.02, 0.98, 49)))
    fallback = max(candidates, key=lambda t: balanced_accuracy(y, probs >= t))
    fallback_pred = probs >= fallback

    levels = [np.unique(np.quantile(feats[:, i], np.linspace(0.0, 1.0, grid))) for i in range(3)]
    best = ((-1.0, 0.0), Thresholds())
    above = [feats[:, i][None, :] >= levels[i][:, None] for i in range(3)]
    for a, b, c in itertools.product(range(len(levels[0])), range(len(levels[1])), range(len(levels[2]))):
        ups = np.stack([above[0][a], above[1][b], above[2][c]])
        decided = ups.all(0) | ~ups.any(0)
        pred = np.where(decided, ups.all(0), fallback_pred)
        score = (round(balanced_accuracy(y, pred), 9), float(decided.mean()))
        if score > best[0]:
            best = (score, Thresholds(float(levels[0][a]), float(levels[1][b]), float(levels[2][c])))
    return CalibratedVerifier(
        thresholds=best[1],
        weights=weights.tolist(),
        bias=bias,
        mean=mean.tolist(),
        std=std.tolist(),
        fallback_threshold=float(fallback),
        balanced_accuracy=best[0][0],
    )
