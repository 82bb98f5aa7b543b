"""Inference: the stage classes shared by the Predictor, batch scoring and serving."""

from medisee.infer.decoder_stage import DecoderStage
from medisee.infer.mllm_stage import MLLMStage
from medisee.infer.predictor import Predictor
from medisee.infer.results import Decoded, QueryEncoding, QueryResult, Screening
from medisee.infer.verifier_stage import VerifierStage

__all__ = [
    "Decoded",
    "DecoderStage",
    "MLLMStage",
    "Predictor",
    "QueryEncoding",
    "QueryResult",
    "Screening",
    "VerifierStage",
]
