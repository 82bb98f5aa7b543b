"""One optimiser step: what the recipe, the FSDP/DDP tests and the benchmarks all run.

The step never waits for the GPU: losses and the gradient norm stay device tensors, summed on the
device, and only become numbers where someone reads them (`as_numbers`, at log steps). fp16 needs a
loss scaler (`loss_scaler`), whose step checks for infinities on the host: the one sync left, and only
on GPUs without bf16.
"""

from __future__ import annotations

import torch

from medisee.data.batch import TrainingBatch
from medisee.model.precision import needs_loss_scaling
from medisee.train import parallel


def loss_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    if not needs_loss_scaling(precision):
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def train_step(
    model,
    module,
    optimizer,
    scheduler,
    micro_batches: list[TrainingBatch],
    grad_clip: float,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """Accumulate gradients over `micro_batches` (synchronised on the last one only), clip, step.

    `model` is what the strategy wrapped (DDP / FSDP / the module itself); `module` the plain MediSee.
    Returns the mean of each loss over the micro-batches, plus the gradient norm before clipping, as
    0-d float32 tensors on the device.
    """
    optimizer.zero_grad(set_to_none=True)
    count = len(micro_batches)
    totals: dict[str, torch.Tensor] = {}
    for m, batch in enumerate(micro_batches):
        with parallel.gradient_sync(model, enabled=m == count - 1):
            losses = model(batch)
            loss = losses["loss"] / count
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for key, value in losses.items():
            mean = value.detach().float() / count
            totals[key] = totals[key] + mean if key in totals else mean
    if scaler is not None:
        scaler.unscale_(optimizer)
    totals["grad_norm"] = parallel.clip_gradients(module, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return totals


def as_numbers(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Device scalars to Python floats in one transfer (one sync instead of one per value)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    numbers = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).cpu().tolist()
        numbers.update(zip(tensors, stacked, strict=True))
    return {k: numbers[k] for k in values}
