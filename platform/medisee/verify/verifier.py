"""One verdict per prediction: the calibrated rule, the judge for uncertain cases when configured,
and the calibrated fallback otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medisee.verify.calibrate import CalibratedVerifier, Evidence
from medisee.verify.decision import Verdict, decide
from medisee.verify.judge import Judge, JudgeAnswer


@dataclass(frozen=True)
class Decision:
    verdict: Verdict  # present or absent
    source: str  # "rule", "judge" or "fallback"
    judge_answer: JudgeAnswer | None = None


def verify(
    evidence: Evidence,
    verifier: CalibratedVerifier,
    judge: Judge | None = None,
    image: np.ndarray | None = None,
    similarity: np.ndarray | None = None,
    query: str = "",
    clip_size: int = 336,
    padded_map: bool = False,
) -> Decision:
    """`clip_size`, `padded_map`: where the similarity map lies in the image (medisee.verify.heatmap),
    for the judge's overlay."""
    rule = decide(evidence.scores, verifier.thresholds)
    if rule is not Verdict.UNCERTAIN:
        return Decision(rule, "rule")
    answer = None
    if judge is not None and image is not None and similarity is not None:
        answer = judge.judge(image, similarity, evidence.scores, query, clip_size, padded_map)
        if answer is not None and answer.verdict is not Verdict.UNCERTAIN:
            return Decision(answer.verdict, "judge", answer)
    verdict, _ = verifier.verdict(evidence)
    return Decision(verdict, "fallback", answer)
