"""How the recipe spreads MediSee over its workers.

- `ddp`: every worker holds the whole model; gradients are all-reduced. Right for LoRA, and for a
  full fine-tune that fits one device.
- `fsdp`: PyTorch's FSDP2 (`fully_shard`). Each LM decoder layer is its own shard group and the
  rest of the trainable model (embeddings, LM head, mask decoder, heads) is the root group, so
  parameters, gradients and AdamW state are split across workers: the 7B full fine-tune needs
  ~16 bytes per trained parameter, which no single 80 GB device holds. The frozen towers (CLIP,
  projector, SAM image and prompt encoders) are left out of sharding and stay whole on every worker:
  they have no gradients or optimiser state to split, and keeping them whole saves their all-gathers.

Everything in the recipe that depends on the strategy lives here: wrapping, switching gradient
sync off between accumulation micro-batches, full state dicts for checkpoints (the same files
either way, so a run can switch strategy at a resume) and evaluation on full parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

STRATEGIES = ("ddp", "fsdp")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap(
    module: nn.Module,
    strategy: str,
    world: int,
    device: torch.device,
    layer_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The model the training loop calls; `module` stays the plain MediSee for everything else."""
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    module.to(device)
    if world == 1:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # a rank whose batch has no target skips the decoder side: DDP must look for unused parameters
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    return shard(module, device, layer_dtype)


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    return list(module.llava.model.language_model.layers)


def shard(module: nn.Module, device: torch.device, layer_dtype: torch.dtype = torch.float32) -> nn.Module:
    """FSDP2 over the default process group: one group per LM layer, the rest of the trainable model at the root.

    `layer_dtype` applies to the LM layers only (the bulk of the parameters): the root group runs the
    box and mask side, whose inputs (pixel boxes up to 1024) must not be rounded to bfloat16.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    in_layers = {id(p) for layer in decoder_layers(module) for p in layer.parameters()}
    frozen_towers = {p for p in module.parameters() if not p.requires_grad and id(p) not in in_layers}
    layer_policy = MixedPrecisionPolicy(param_dtype=layer_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy)
    fully_shard(module, mesh=mesh, ignored_params=frozen_towers)
    # Only ranks whose batch has a target run the decoder side; the others must still join its
    # reduce-scatter (with zero gradients), as DDP's find_unused_parameters does.
    module.set_reduce_scatter_unused_params(True)
    return module


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter on all but the last accumulation micro-batch."""
    if enabled:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Hold every parameter unsharded, so that each rank can run any number of forward passes
    (evaluation strides differ per rank; generation lengths differ per row) without collectives.
    Every rank must enter together. Costs the full model's memory per rank for the duration."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    # a rank-local forward of a layer must not make that layer the FSDP root
    model._get_fsdp_state()._lazy_init()
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
            # FSDP's own defaults: the root keeps its parameters through to backward, layers free theirs
            m.set_reshard_after_forward(m is not model, recurse=False)


def clip_gradients(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip in place; returns the norm before clipping as a device tensor (reading it would sync)."""
    params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm


FULL_ON_CPU = {"full_state_dict": True, "cpu_offload": True, "ignore_frozen_params": True}


def trainable_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """Full (unsharded) trainable weights and AdamW state keyed by parameter name, on CPU; the same
    layout under either strategy, so a checkpoint resumes under the other one too.

    Every rank must call it (under FSDP it gathers); rank 0 gets the dicts, other ranks None.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = trainable_weights(module)
    optim = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(**FULL_ON_CPU))
    if _rank() != 0:
        return None
    if not is_sharded(module):
        optim = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), optim)
    return weights, optim


def trainable_weights(module: nn.Module) -> dict | None:
    """Full trainable weights only, on CPU (what a model artifact holds: the AdamW state, twice the
    size of the weights, is not gathered). Every rank calls it; rank 0 gets the dict, others None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(module, options=StateDictOptions(**FULL_ON_CPU))
    if _rank() != 0:
        return None
    if not is_sharded(module):  # whole CPU tensors come back as the live ones: take a snapshot
        weights = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), weights)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in weights.items() if k in trainable}


def reads_checkpoint(model: nn.Module) -> bool:
    """Whether this rank must read the checkpoint file: a whole model loads its own copy; a sharded
    one gets its shards from rank 0, so that no other rank ever holds the whole checkpoint (the 7B
    full fine-tune's weights and AdamW moments are ~87 GB)."""
    return not is_sharded(model) or _rank() == 0


def load_trainable_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    weights: dict | None,
    optim: dict | None,
    source: str,
) -> None:
    """The inverse of `trainable_state`, on every rank together. Ranks that `reads_checkpoint` pass
    the full dicts, the others None. The optimiser may keep the tensors it is given as its state:
    hand over dicts that nothing else uses."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sharded = is_sharded(module)
    if weights is None and reads_checkpoint(module):
        raise ValueError(f"{source}: this rank must pass the checkpoint's weights")
    if weights is not None:
        module.check_trainable_state_dict(weights, source)
    # sharded: rank 0 broadcasts each full tensor and every rank keeps its shard of it
    options = StateDictOptions(full_state_dict=sharded, broadcast_from_rank0=sharded, strict=False)
    # both setters rewrite the dicts they are given in place: hand them copies of the containers
    set_model_state_dict(module, dict(weights or {}), options=options)
    if optimizer is None or (optim is None and not sharded):
        return
    if optim is not None:
        optim = {
            "state": {k: dict(v) for k, v in optim["state"].items()},
            "param_groups": [dict(g) for g in optim["param_groups"]],
        }
    set_optimizer_state_dict(module, optimizer, optim or {}, options=options)


def broadcast_object(obj, model: nn.Module):
    """Rank 0's `obj` on every rank when the model is sharded (only rank 0 read the checkpoint)."""
    if not is_sharded(model):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
