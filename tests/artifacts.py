"""The tiny model saved as an artifact, the one way tests make one."""

from __future__ import annotations

from pathlib import Path


def make_tiny_artifact(folder: Path, retrained: bool = False) -> str:
    """The tiny model; `retrained`: another version on the same base (its trained weights moved)."""
    import torch

    from medisee.artifact.model_dir import save_model_dir
    from medisee.config import load_config
    from medisee.model.build import build_from_config

    cfg = load_config("tiny")
    model = build_from_config(cfg)
    if retrained:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
    save_model_dir(model, cfg, folder)
    return str(folder)
