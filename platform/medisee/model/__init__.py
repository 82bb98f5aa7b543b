"""The MediSee model: LLaVA MLLM + routers + box decoder + SAM mask decoder."""

from medisee.model.build import build_model, preset_names
from medisee.model.medisee import MediSee

__all__ = ["MediSee", "build_model", "preset_names"]
