"""The dtype a model computes in, chosen from the device unless the configuration names one.

auto -> bf16 on a GPU that supports it (Ampere and newer), fp16 on older GPUs (training then
        scales the loss, see medisee.train.step), fp32 on CPU.
"""

from __future__ import annotations

import torch

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(requested: str, device: torch.device | str) -> str:
    if requested != "auto":
        if requested not in PRECISION_DTYPES:
            raise ValueError(
                f"precision must be auto or one of {', '.join(PRECISION_DTYPES)}, not {requested!r}"
            )
        return requested
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def needs_loss_scaling(precision: str) -> bool:
    """fp16 gradients underflow without it; bf16 has fp32's exponent range."""
    return precision == "fp16"
