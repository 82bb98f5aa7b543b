"""MedVeriSeg: training-free verification that the queried target is present."""

from medisee.verify.decision import Thresholds, Verdict, decide
from medisee.verify.scores import ScoreParams, Scores, score_map, score_maps

__all__ = ["ScoreParams", "Scores", "Thresholds", "Verdict", "decide", "score_map", "score_maps"]
