"""Training checkpoints: where a run keeps them, what one file holds, which files are kept.

Checkpoints are single files `<run>/checkpoints/step-00000100.pt` written atomically through
medisee.storage by rank 0, holding only the trained parameters (whole, gathered from the shards
under FSDP; see medisee.train.parallel) plus optimiser, scheduler, RNG and data position. The latest
complete file is what a worker retry or a whole-job re-run resumes from.
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch

from medisee import storage
from medisee.config import MediSeeConfig, config_to_yaml, resume_differences, stored_config
from medisee.model.checkpoint import read_torch, write_torch
from medisee.storage import StorageSettings
from medisee.train import parallel

CHECKPOINT_NAME = re.compile(r"step-(\d{8})\.pt$")
CHECKPOINT_FORMAT = "medisee-train-checkpoint/2"  # /2: optimiser state keyed by parameter name


def run_dir(cfg: MediSeeConfig) -> str:
    return storage.join(cfg.run.storage_uri, cfg.run.name)


def checkpoint_dir(cfg: MediSeeConfig) -> str:
    return storage.join(run_dir(cfg), "checkpoints")


def checkpoint_uri(cfg: MediSeeConfig, step: int) -> str:
    return storage.join(checkpoint_dir(cfg), f"step-{step:08d}.pt")


def list_checkpoints(cfg: MediSeeConfig, settings: StorageSettings) -> list[tuple[int, str]]:
    found = []
    for uri in storage.list_files(checkpoint_dir(cfg), (".pt",), settings):
        match = CHECKPOINT_NAME.search(uri)
        if match:
            found.append((int(match[1]), uri))
    return sorted(found)


def write_checkpoint(cfg: MediSeeConfig, settings: StorageSettings, step: int, fields: dict) -> str:
    """One atomic file for `step`: `fields` (epoch, position, model, optimizer, ...) between the format
    and step in front and the configuration it resumes under at the end."""
    uri = checkpoint_uri(cfg, step)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        **fields,
        "config": config_to_yaml(cfg),
        "preset": cfg.model.preset,
    }
    write_torch(payload, uri, settings)
    return uri


def read_checkpoint(
    uri: str, cfg: MediSeeConfig, settings: StorageSettings, model: torch.nn.Module
) -> tuple[dict, dict | None, dict | None]:
    """(payload, weights, optimizer state) on every rank; the weights and optimizer state only on the
    ranks that `parallel.reads_checkpoint` (None elsewhere), the small rest broadcast to all."""
    payload = read_torch(uri, settings) if parallel.reads_checkpoint(model) else {}
    weights, optimizer_state = payload.pop("model", None), payload.pop("optimizer", None)
    payload = parallel.broadcast_object(payload, model)  # step, RNG, scheduler, ...: small
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{uri}: format {payload.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    check_resumable(payload["config"], cfg, uri)
    return payload, weights, optimizer_state


def check_resumable(saved_yaml: str, cfg: MediSeeConfig, uri: str) -> None:
    """A resume may change how long and where the run goes, never the model or the data."""

    changed = resume_differences(stored_config(saved_yaml), cfg)
    if changed:
        details = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        raise ValueError(
            f"cannot resume from {uri}: the configuration changed in keys that alter the model or the data "
            f"({details}). Use a new run.name for a different model or data."
        )


def prune_checkpoints(cfg: MediSeeConfig, settings: StorageSettings, best: dict) -> str | None:
    """Delete all but the latest file and the best `trainer.keep_best` by metric (`best`: step -> value);
    the best one's uri, None when no step is kept for its metric."""
    keep = {s for s, _ in sorted(best.items(), key=lambda kv: -kv[1])[: cfg.trainer.keep_best]}
    found = list_checkpoints(cfg, settings)
    for step, old in found[:-1]:
        if step not in keep:
            storage.delete(old, settings)
    if not keep:
        return None
    return checkpoint_uri(cfg, max(best, key=best.get))


def gather_rng_states(world: int) -> list[dict]:
    """Every rank's RNG states, in rank order."""
    state = _rng_state()
    if world > 1 and torch.distributed.is_initialized():
        out = [None] * world
        torch.distributed.all_gather_object(out, state)
        return out
    return [state]


def restore_rng_state(rngs: list[dict], rank: int) -> None:
    """This rank's saved RNG states; a rank beyond those that wrote them (an elastic run that grew)
    takes the last one's."""
    _set_rng_state(rngs[min(rank, len(rngs) - 1)])


def _rng_state() -> dict:
    """RNG states in types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((rng["python_version"], tuple(rng["python"]), None))
