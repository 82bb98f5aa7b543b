"""Inference: the stage classes shared by the Predictor, batch scoring and serving.

Names are imported on first use: a process that needs only the torch-free parts (results,
verifier stage) does not pay for importing torch and the model code.
"""

from importlib import import_module

_HOMES = {
    "Decoded": "results",
    "QueryEncoding": "results",
    "QueryResult": "results",
    "Screening": "results",
    "DecoderStage": "decoder_stage",
    "MLLMStage": "mllm_stage",
    "Predictor": "predictor",
    "VerifierStage": "verifier_stage",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'medisee.infer' has no attribute {name!r}")
    return getattr(import_module(f"medisee.infer.{_HOMES[name]}"), name)
