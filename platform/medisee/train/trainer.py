"""Driver side: build the Ray Train TorchTrainer for the recipe, run it, register the result."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from medisee import storage, tracking
from medisee.artifact.model_dir import MLFLOW_PATH as MODEL_ARTIFACT
from medisee.config import MediSeeConfig, TrainerConfig
from medisee.storage import StorageSettings
from medisee.train.checkpoints import list_checkpoints, run_dir
from medisee.train.recipe import train_loop_per_worker

WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def build_trainer(cfg: MediSeeConfig, settings: StorageSettings):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medisee.data.reader import shard_dataset

    t = cfg.trainer
    fs, path = storage.filesystem(storage.join(cfg.run.storage_uri, "ray"), settings)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "settings": {"endpoint": settings.endpoint, "region": settings.region},
        },
        scaling_config=ScalingConfig(
            num_workers=worker_range(t),
            use_gpu=t.use_gpu,
            resources_per_worker=worker_resources(t),
            elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": shard_dataset(cfg.data, settings, split="train")},
    )


def worker_range(t: TrainerConfig) -> int | tuple[int, int]:
    """Ray Train's `num_workers`: a fixed count, or the (min, max) range of an elastic run."""
    return t.num_workers if t.min_workers is None else (t.min_workers, t.num_workers)


def worker_resources(t: TrainerConfig) -> dict[str, float]:
    return {"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {}) | t.resources_per_worker


@contextlib.contextmanager
def worker_start_timeout(seconds: float | None):
    """Ray Train reads how long a worker group waits for its resources from the environment of the
    driver (it passes it on to its controller) when `fit` starts."""
    if seconds is None:
        yield
        return
    previous = os.environ.get(WORKER_START_TIMEOUT_ENV)
    os.environ[WORKER_START_TIMEOUT_ENV] = str(seconds)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(WORKER_START_TIMEOUT_ENV, None)
        else:
            os.environ[WORKER_START_TIMEOUT_ENV] = previous


def run_training(cfg: MediSeeConfig, register: str | None = None, alias: str | None = None) -> dict:
    """Train (or resume) `cfg.run.name`; returns the final metrics, checkpoint, MLflow run and model URI.

    Rank 0 publishes the model artifact (medisee.artifact.model_dir) into the run at the end; the driver
    registers it. The artifact location is fixed here, before any worker starts.
    """
    from medisee.raylib import ensure_ray

    settings = StorageSettings.from_config(cfg.storage)
    cfg = with_absolute_paths(cfg)
    client = tracking.configure(cfg.tracking, settings)
    exp_id = tracking.get_or_create_experiment(
        client, cfg.tracking.experiment, cfg.tracking.artifact_location
    )
    ensure_ray()
    with worker_start_timeout(cfg.trainer.worker_start_timeout_s):
        result = build_trainer(cfg, settings).fit()
    if result.error:
        raise result.error
    run = tracking.find_run(client, exp_id, cfg.run.name)
    checkpoints = list_checkpoints(cfg, settings)
    out = {
        "mlflow_run_id": run.info.run_id if run else None,
        "checkpoint": checkpoints[-1][1] if checkpoints else None,
        "run_dir": run_dir(cfg),
        "model_uri": f"runs:/{run.info.run_id}/{MODEL_ARTIFACT}" if run else None,
        "metrics": dict(result.metrics or {}),
    }
    if run:
        if register:
            out["model_version"] = tracking.register_model(
                client, run.info.run_id, MODEL_ARTIFACT, register, alias
            )
            out["model_uri"] = (
                f"models:/{register}@{alias}" if alias else f"models:/{register}/{out['model_version']}"
            )
        tracking.end_run(client, run.info.run_id)
    return out


def with_absolute_paths(cfg: MediSeeConfig) -> MediSeeConfig:
    """Workers run in other directories: pin relative local paths (and MLflow's artifact root) here."""
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    cfg.tracking.artifact_location = tracking.resolve_artifact_location(cfg.tracking)
    if not storage.is_s3(cfg.run.storage_uri):
        cfg.run.storage_uri = str(Path(cfg.run.storage_uri.removeprefix("file://")).absolute())
    cfg.data.sources = {
        k: v if storage.is_s3(v) else str(Path(v).absolute()) for k, v in cfg.data.sources.items()
    }
    if cfg.data.val_uri and not storage.is_s3(cfg.data.val_uri):
        cfg.data.val_uri = str(Path(cfg.data.val_uri).absolute())
    return cfg
