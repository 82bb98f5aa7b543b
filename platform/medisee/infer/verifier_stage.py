"""Verifier stage (MedVeriSeg): scores of the similarity map and the calibrated decision.

Two steps, so that batch scoring and serving can skip the decoder for rejected queries:
  screen(encodings)            the three scores and the rule's verdict (before decoding)
  decide(screening, decoded)   the final verdict: the rule, else the judge, else the calibrated
                               fallback on the scores plus the decoder-side signals
"""

from __future__ import annotations

import numpy as np

from medisee.infer.results import Decoded, QueryEncoding, Screening
from medisee.verify.calibrate import CalibratedVerifier, Evidence
from medisee.verify.decision import decide
from medisee.verify.scores import Scores, score_maps
from medisee.verify.verifier import verify


class VerifierStage:
    def __init__(
        self, calibration: CalibratedVerifier | None, judge, clip_size: int, padded_map: bool = False
    ):
        """`clip_size`: the model's CLIP input size (the judge's heatmap overlay is drawn at it);
        `padded_map`: the model's map covers the padded SAM frame instead (medisee-lite)."""
        self.calibration = calibration or CalibratedVerifier()
        self.judge, self.clip_size, self.padded_map = judge, clip_size, padded_map

    @classmethod
    def from_json(
        cls, calibration_json: str | None, clip_size: int, verifier_cfg=None, padded_map: bool = False
    ) -> VerifierStage:
        """The stage of an artifact's `verifier.json` text (None: uncalibrated defaults) and, when a
        `verifier` config section names a judge endpoint, that judge."""
        from medisee.verify.judge import judge_from_config

        calibration = CalibratedVerifier.from_json(calibration_json) if calibration_json else None
        judge = judge_from_config(verifier_cfg) if verifier_cfg is not None else None
        return cls(calibration, judge, clip_size, padded_map)

    def screen(self, encodings: list[QueryEncoding]) -> list[Screening | None]:
        """None for a query whose answer has no candidate tokens (there is no map to score)."""
        found = [i for i, e in enumerate(encodings) if e.found]
        out: list[Screening | None] = [None] * len(encodings)
        if not found:
            return out
        scores = score_maps(np.stack([encodings[i].similarity.reshape(-1) for i in found]))
        for i, s in zip(found, scores, strict=True):
            rule = decide(s, self.calibration.thresholds).value
            out[i] = Screening(s.strength, s.compactness, s.purity, rule)
        return out

    def decide(
        self,
        screening: Screening | None,
        decoded: Decoded | None = None,
        image: np.ndarray | None = None,
        encoding: QueryEncoding | None = None,
    ) -> tuple[str, str]:
        """(verdict, decided_by); the judge is asked only for uncertain cases and only with the image."""
        if (verdict := settled(screening)) is not None:
            return verdict
        scores = Scores(screening.strength, screening.compactness, screening.purity)
        evidence = Evidence(
            scores,
            decoded.mask_score if decoded else 0.0,
            decoded.iou_score if decoded else 0.0,
            decoded.area_fraction if decoded else 0.0,
        )
        decision = verify(
            evidence,
            self.calibration,
            self.judge,
            image=image,
            similarity=encoding.similarity if encoding else None,
            query=encoding.query if encoding else "",
            clip_size=self.clip_size,
            padded_map=self.padded_map,
        )
        return decision.verdict.value, decision.source


def settled(screening: Screening | None) -> tuple[str, str] | None:
    """The final (verdict, decided_by) when the screening alone decides it: no candidate tokens in
    the answer, or the rule said present or absent. None when the decoder's signals (and the judge)
    are needed. Lets a caller skip the decision step, e.g. a hop to the verifier deployment."""
    if screening is None:
        return "absent", "answer"
    if screening.rule != "uncertain":
        return screening.rule, "rule"
    return None
