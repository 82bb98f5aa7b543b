"""The MediSee fine-tuning recipe, run by every Ray Train worker.

Explicit steps, as in torchtune recipes:  setup -> load_checkpoint -> train (evaluate, save_checkpoint)
-> publish_model. What a checkpoint holds and which ones are kept: medisee.train.checkpoints.

An elastic run (trainer.min_workers) may resume on fewer or more workers than wrote the checkpoint:
each step keeps the global batch of `trainer.num_workers` workers (`micro_batches_per_worker`), so
the step count, learning-rate schedule and data position carry over unchanged.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch

from medisee import storage, tracking
from medisee.artifact.model_dir import MLFLOW_PATH as MODEL_ARTIFACT
from medisee.artifact.model_dir import save_model_dir, start_from
from medisee.config import MediSeeConfig, TrainerConfig, build_config, config_to_yaml, flatten
from medisee.data.batch import collate
from medisee.model.build import build_from_config, compile_language_model
from medisee.model.precision import resolve_precision
from medisee.storage import StorageSettings
from medisee.train import parallel
from medisee.train.checkpoints import (
    checkpoint_uri,
    gather_rng_states,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    restore_rng_state,
    run_dir,
    write_checkpoint,
)
from medisee.train.embedding_cache import ImageEmbeddingCache
from medisee.train.evaluate import evaluate_rows, load_eval_rows
from medisee.train.step import as_numbers, loss_scaler, train_step


@dataclass
class RecipeState:
    cfg: MediSeeConfig
    settings: StorageSettings
    rank: int
    world: int
    model: torch.nn.Module
    module: torch.nn.Module  # the unwrapped MediSee
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    eval_rows: list
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best: dict = field(default_factory=dict)  # step -> metric value
    mlflow_client: object = None
    mlflow_run_id: str | None = None
    last_validation: dict = field(default_factory=dict)
    scaler: torch.amp.GradScaler | None = None
    image_cache: ImageEmbeddingCache | None = None
    parent: dict | None = None  # the model stage two started from (medisee.artifact.model_dir.start_from)


def micro_batches_per_worker(t: TrainerConfig, world: int) -> int:
    """Micro-batches each of `world` workers accumulates per optimizer step: the global batch stays the
    one of `num_workers` workers (see TrainerConfig), so an elastic run that lost workers keeps its
    step schedule."""
    return math.ceil(t.grad_accum_steps * t.num_workers / world)


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def setup(cfg: MediSeeConfig, settings: StorageSettings, rank: int, world: int) -> RecipeState:
    import ray.train.torch

    torch.manual_seed(cfg.run.seed)
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.trainer.precision, device)
    module = build_from_config(cfg, settings, training=True, precision=precision, device=device)
    parent = None
    if cfg.model.init_from:  # a resume then replaces these weights with the run's checkpoint
        parent = start_from(
            module, cfg, cfg.model.init_from, settings=settings, tracking_uri=cfg.tracking.uri
        )
    if cfg.trainer.compile:
        compile_language_model(module)
    model = parallel.wrap(
        module,
        cfg.trainer.strategy,
        world,
        device,
        layer_dtype=getattr(torch, cfg.trainer.fsdp_layer_dtype),
    )
    params = [p for p in module.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # one kernel for the whole update; CPU keeps the foreach path
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.trainer.lr,
        betas=(0.9, 0.95),
        weight_decay=cfg.trainer.weight_decay,
        foreach=not fused,
        fused=fused,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.trainer.warmup_steps, cfg.trainer.max_steps)
    )
    val_uri = cfg.data.val_uri or next(iter(cfg.data.sources.values()))
    eval_rows = load_eval_rows(val_uri, "val", settings, cfg.trainer.eval_limit, rank, world)
    state = RecipeState(cfg, settings, rank, world, model, module, optimizer, scheduler, eval_rows)
    state.parent = parent
    state.scaler = loss_scaler(precision, device)
    if cfg.trainer.image_embedding_cache_gib:
        state.image_cache = ImageEmbeddingCache(cfg.trainer.image_embedding_cache_gib)
    if rank == 0:
        state.mlflow_client = tracking.configure(cfg.tracking, settings)
        state.mlflow_run_id = tracking.start_or_resume_run(state.mlflow_client, cfg.tracking, cfg.run.name)
        tracking.log_params(state.mlflow_client, state.mlflow_run_id, flatten(cfg))
        tracking.log_system_info(state.mlflow_client, state.mlflow_run_id, world)
        tracking.log_params(state.mlflow_client, state.mlflow_run_id, {"resolved.precision": precision})
        tracking.log_text(
            state.mlflow_client, state.mlflow_run_id, config_to_yaml(cfg), "config/resolved.yaml"
        )
        for key, value in (parent or {}).items():
            if value:
                tracking.log_uri(state.mlflow_client, state.mlflow_run_id, f"parent.{key}", str(value))
    return state


def load_checkpoint(state: RecipeState) -> bool:
    """Resume from the latest complete checkpoint of this run, if there is one."""
    found = list_checkpoints(state.cfg, state.settings)
    if not found:
        return False
    _, uri = found[-1]
    payload, weights, optimizer_state = read_checkpoint(uri, state.cfg, state.settings, state.model)
    parallel.load_trainable_state(state.module, state.optimizer, weights, optimizer_state, uri)
    state.scheduler.load_state_dict(payload["scheduler"])
    if state.scaler is not None and payload.get("loss_scaler"):
        state.scaler.load_state_dict(payload["loss_scaler"])
    state.step, state.epoch, state.step_in_epoch = payload["step"], payload["epoch"], payload["step_in_epoch"]
    state.best = {int(k): v for k, v in payload.get("best", {}).items()}
    restore_rng_state(payload["rng"], state.rank)
    if state.rank == 0:
        accumulation = micro_batches_per_worker(state.cfg.trainer, state.world)
        print(
            f"[medisee] resumed from {uri} at step {state.step} (epoch {state.epoch}, batch "
            f"{state.step_in_epoch}) on {state.world} workers x {accumulation} micro-batches"
        )
        # one point per resume: the run's history shows where each restart picked up
        tracking.log_metrics(
            state.mlflow_client, state.mlflow_run_id, {"resumed_from_step": state.step}, state.step
        )
        tracking.log_uri(state.mlflow_client, state.mlflow_run_id, "checkpoint.resumed_from", uri)
    return True


def save_checkpoint(state: RecipeState, metric: float | None = None) -> str | None:
    """Rank 0 writes one atomic file; keeps the best `trainer.keep_best` by metric plus the latest."""
    rngs = gather_rng_states(state.world)
    gathered = parallel.trainable_state(state.module, state.optimizer)  # every rank joins the gather
    if state.rank != 0:
        return None
    weights, optimizer_state = gathered
    if metric is not None:
        state.best[state.step] = float(metric)
    fields = {
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "model": weights,
        "optimizer": optimizer_state,  # keyed by parameter name
        "scheduler": state.scheduler.state_dict(),
        "loss_scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rngs,
        "best": state.best,
    }
    uri = write_checkpoint(state.cfg, state.settings, state.step, fields)
    best = prune_checkpoints(state.cfg, state.settings, state.best)
    tracking.log_uri(state.mlflow_client, state.mlflow_run_id, "checkpoint.latest", uri)
    if best is not None:
        tracking.log_uri(state.mlflow_client, state.mlflow_run_id, "checkpoint.best", best)
    return uri


def evaluate(state: RecipeState) -> dict[str, float]:
    with parallel.full_parameters(state.model):
        state.last_validation = evaluate_rows(state.module, state.eval_rows, reduce=state.world > 1)
    return state.last_validation


def _maybe_fail(state: RecipeState) -> None:
    """Testing hook: the last worker raises once at `trainer.fail_at_step`."""
    at = state.cfg.trainer.fail_at_step
    if at is None or state.step != at or state.rank != state.world - 1:
        return
    marker = storage.join(run_dir(state.cfg), "failure-injected")
    if storage.exists(marker, state.settings):
        return
    storage.write_bytes(marker, b"1", state.settings)
    raise RuntimeError(f"injected failure at step {at} on rank {state.rank}")


def batch_stream(state: RecipeState):
    """Training batches forever, from the current data position; the recipe decides where an epoch ends."""
    import ray.train

    cfg = state.cfg
    shard = ray.train.get_dataset_shard("train")
    device = next(state.module.parameters()).device

    def cycle():
        while True:
            # rows of one image sit next to each other in a shard: mix them across images
            yield from shard.iter_batches(
                batch_size=cfg.data.batch_size,
                batch_format="numpy",
                prefetch_batches=2,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer_rows or None,
                local_shuffle_seed=cfg.data.seed + state.epoch,
            )

    stream = cycle()
    # the same position after a resume, also on another number of workers (same global batch per step)
    for _ in range(state.step_in_epoch * micro_batches_per_worker(cfg.trainer, state.world)):
        next(stream)
    for raw in stream:
        yield collate(raw, state.module.text, device)


def train(state: RecipeState) -> None:
    t = state.cfg.trainer
    stream = batch_stream(state)
    progress = Progress(state)
    accumulation = micro_batches_per_worker(t, state.world)
    state.model.train()
    while state.step < t.max_steps:
        _maybe_fail(state)
        micro = [progress.next_batch(stream) for _ in range(accumulation)]
        if state.image_cache is not None:
            micro = [state.image_cache.attach(state.module, batch) for batch in micro]
        losses = train_step(
            state.model, state.module, state.optimizer, state.scheduler, micro, t.grad_clip, state.scaler
        )
        state.step += 1
        state.step_in_epoch += 1
        if state.step_in_epoch >= t.steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        val = evaluate(state) if state.step % t.eval_every == 0 or state.step == t.max_steps else None
        metrics = None
        if progress.due() or val is not None:  # otherwise the losses stay on the device, unread
            metrics = step_metrics(state, losses)
            progress.log(metrics)
        if val is not None:
            progress.log_validation(val)
        if val is not None or state.step % t.checkpoint_every == 0:
            save_checkpoint(state, None if val is None else val.get(t.best_metric))
        if metrics is not None:
            progress.report(metrics, val)


def step_metrics(state: RecipeState, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's numbers: one device-to-host transfer, so only at log and validation steps."""
    metrics = as_numbers({f"train/{k}": v for k, v in losses.items()})
    metrics |= {"lr": state.scheduler.get_last_lr()[0], "workers": state.world}
    if state.scaler is not None:
        metrics["loss_scale"] = state.scaler.get_scale()
    if state.image_cache is not None:
        metrics |= state.image_cache.stats()
    return metrics


class Progress:
    """Rank 0's progress lines and MLflow metrics; every rank's reports to Ray Train."""

    def __init__(self, state: RecipeState):
        self.state, self.started, self.samples, self.data_wait = state, time.time(), 0, 0.0

    def next_batch(self, stream):
        waited = time.perf_counter()
        batch = next(stream)
        self.data_wait += time.perf_counter() - waited
        self.samples += len(batch)
        return batch

    def due(self) -> bool:
        t = self.state.cfg.trainer
        return self.state.step % t.log_every == 0 or self.state.step == t.max_steps

    def log(self, metrics: dict) -> None:
        state = self.state
        if state.rank != 0 or not self.due():
            return
        t = state.cfg.trainer
        elapsed = max(1e-6, time.time() - self.started)
        rate = self.samples * state.world / elapsed
        done = self.samples / (state.cfg.data.batch_size * micro_batches_per_worker(t, state.world))
        eta = (t.max_steps - state.step) * elapsed / max(1.0, done)
        print(
            f"[medisee] step {state.step}/{t.max_steps} loss {metrics['train/loss']:.4f} "
            f"{rate:.1f} samples/s data-wait {self.data_wait / elapsed:.0%} ETA {eta:.0f}s",
            flush=True,
        )
        tracking.log_metrics(
            state.mlflow_client, state.mlflow_run_id, metrics | {"samples_per_s": rate}, state.step
        )

    def log_validation(self, val: dict) -> None:
        state = self.state
        if state.rank != 0:
            return
        tracking.log_metrics(
            state.mlflow_client, state.mlflow_run_id, {f"val/{k}": v for k, v in val.items()}, state.step
        )
        summary = {k: round(v, 4) for k, v in val.items() if "/" not in k}
        print(f"[medisee] step {state.step} validation {json.dumps(summary)}", flush=True)

    def report(self, metrics: dict, val: dict | None) -> None:
        """A report is a round trip to the controller: only at log and validation steps."""
        import ray.train

        if val is None and not self.due():
            return
        ray.train.report(
            {"step": self.state.step, **metrics, **({f"val/{k}": v for k, v in val.items()} if val else {})}
        )


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = build_config(config["cfg"])
    settings = StorageSettings(**config["settings"])
    torch.set_num_threads(cfg.trainer.torch_threads)
    ctx = ray.train.get_context()
    state = setup(cfg, settings, ctx.get_world_rank(), ctx.get_world_size())
    load_checkpoint(state)
    if state.step < cfg.trainer.max_steps:
        train(state)  # the last step always evaluates and saves
    publish_model(state)


def publish_model(state: RecipeState) -> None:
    """Rank 0 logs the model artifact (weights gathered from every rank) into the run."""
    import tempfile

    weights = parallel.trainable_weights(state.module)  # every rank joins the gather
    if state.rank != 0:
        return
    latest = checkpoint_uri(state.cfg, state.step)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(
            state.module,
            state.cfg,
            tmp,
            settings=state.settings,
            weights=weights,
            metrics=state.last_validation,
            source=latest,
            parent=state.parent,
        )
        tracking.log_artifact_dir(state.mlflow_client, state.mlflow_run_id, tmp, MODEL_ARTIFACT)
