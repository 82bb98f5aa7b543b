"""The LM's linear layers in 4-bit NF4 (QLoRA): bitsandbytes' Linear4bit, double-quantized scales.

Only the decoder layers' projections are quantized (q/k/v/o, gate/up/down): ~96 % of the 7B LM's
weights. Embeddings, norms, the LM head, the CLIP tower and SAM stay in their own dtype. LoRA
adapters (peft) wrap the quantized layers as they wrap plain ones, so `configure_trainable` runs after.

bitsandbytes quantizes a weight when it is moved to a device (`.to(device)`), so the replaced layers
are moved at once: the caller's device is where the 4-bit weights live (CUDA, or CPU for tests).
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZE_MODES = ("none", "nf4")


def lm_linear_layers(llava) -> dict[str, nn.Linear]:
    """The plain linear layers inside the LM's decoder layers, by name under the LM's `layers`."""
    return {
        name: module
        for name, module in llava.model.language_model.layers.named_modules()
        if type(module) is nn.Linear
    }


def quantize_lm_nf4(llava, compute_dtype: torch.dtype, device: torch.device | str) -> int:
    """Replace the LM decoder layers' linear layers by NF4 ones on `device`; returns how many."""
    import bitsandbytes as bnb

    layers = llava.model.language_model.layers
    found = lm_linear_layers(llava)
    for name, linear in found.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(layers.get_submodule(parent_name), attr, _nf4_copy(bnb, linear, compute_dtype, device))
    return len(found)


def _nf4_copy(bnb, linear: nn.Linear, compute_dtype: torch.dtype, device) -> nn.Module:
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
    )
    # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks the weight for a faster kernel at the first
    # eval-mode forward and keeps it so; that kernel has no backward, so any training after an
    # evaluation would silently stop passing gradients through these layers (LoRA grads None).
    quantized.support_avx512bf16_for_cpu = False
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.detach().to(compute_dtype).contiguous(),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
    )
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return quantized.to(device)


def is_quantized(module: nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in module.modules())
