"""The decision rule: all three scores above their thresholds -> present; all below -> absent;
otherwise uncertain (resolved by a judge or the calibrated fallback)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from medisee.verify.scores import Scores


class Verdict(str, Enum):  # noqa: UP042 (StrEnum would change what format() gives)
    PRESENT = "present"
    ABSENT = "absent"
    UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class Thresholds:
    """Defaults as in the MedVeriSeg release; `medisee calibrate` fits them per model version."""

    strength: float = 0.475
    compactness: float = 0.40
    purity: float = 0.70


def decide(scores: Scores, thresholds: Thresholds = Thresholds()) -> Verdict:
    above = (
        scores.strength >= thresholds.strength,
        scores.compactness >= thresholds.compactness,
        scores.purity >= thresholds.purity,
    )
    if all(above):
        return Verdict.PRESENT
    if not any(above):
        return Verdict.ABSENT
    return Verdict.UNCERTAIN
