"""The MediSee model: LLaVA MLLM + routers + box decoder + SAM mask decoder."""

from medisee.model.build import build_model, preset_names
from medisee.model.medisee import MediSee, Prediction

__all__ = ["MediSee", "Prediction", "build_model", "preset_names"]
