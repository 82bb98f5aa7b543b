"""One optimiser step: what the recipe, the FSDP/DDP tests and the benchmarks all run."""

from __future__ import annotations

from medisee.data.batch import TrainingBatch
from medisee.train import parallel


def train_step(
    model, module, optimizer, scheduler, micro_batches: list[TrainingBatch], grad_clip: float
) -> dict:
    """Accumulate gradients over `micro_batches` (synchronised on the last one only), clip, step.

    `model` is what the strategy wrapped (DDP / FSDP / the module itself); `module` the plain MediSee.
    Returns the mean of each loss over the micro-batches, plus the gradient norm before clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    count = len(micro_batches)
    totals: dict[str, float] = {}
    for m, batch in enumerate(micro_batches):
        with parallel.gradient_sync(model, enabled=m == count - 1):
            losses = model(batch)
            (losses["loss"] / count).backward()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / count
    totals["grad_norm"] = parallel.clip_gradients(module, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return totals
