"""Driver side: build the Ray Train TorchTrainer for the recipe, run it, register the result."""

from __future__ import annotations

import tempfile
from pathlib import Path

from medisee import storage, tracking
from medisee.config import MediSeeConfig, config_to_yaml
from medisee.model.checkpoint import TRAINABLE_FORMAT, read_torch, write_torch
from medisee.storage import StorageSettings
from medisee.train.recipe import build_from_config, list_checkpoints, run_dir, train_loop_per_worker


def build_trainer(cfg: MediSeeConfig, settings: StorageSettings):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medisee.data.reader import shard_dataset

    t = cfg.trainer
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {})
    fs, path = storage.filesystem(storage.join(cfg.run.storage_uri, "ray"), settings)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "settings": {"endpoint": settings.endpoint, "region": settings.region},
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
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


def run_training(cfg: MediSeeConfig, register: str | None = None, alias: str | None = None) -> dict:
    """Train (or resume) `cfg.run.name`; returns the final metrics, checkpoint and MLflow run id."""
    from medisee.raylib import ensure_ray

    settings = StorageSettings.from_config(cfg.storage)
    cfg = with_absolute_paths(cfg)
    ensure_ray()
    result = build_trainer(cfg, settings).fit()
    if result.error:
        raise result.error
    client = tracking.configure(cfg.tracking, settings)
    exp_id = tracking.get_or_create_experiment(
        client, cfg.tracking.experiment, cfg.tracking.artifact_location
    )
    run = tracking.find_run(client, exp_id, cfg.run.name)
    checkpoints = list_checkpoints(cfg, settings)
    final = checkpoints[-1][1] if checkpoints else None
    out = {
        "mlflow_run_id": run.info.run_id if run else None,
        "checkpoint": final,
        "run_dir": run_dir(cfg),
        "metrics": dict(result.metrics or {}),
    }
    if run and final:
        publish_model(client, run.info.run_id, cfg, final, settings)
        if register:
            out["model_version"] = tracking.register_model(client, run.info.run_id, "model", register, alias)
        tracking.end_run(client, run.info.run_id)
    return out


def with_absolute_paths(cfg: MediSeeConfig) -> MediSeeConfig:
    """Workers run in other directories: pin relative local paths to the driver's working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    if not storage.is_s3(cfg.run.storage_uri):
        cfg.run.storage_uri = str(Path(cfg.run.storage_uri.removeprefix("file://")).absolute())
    cfg.data.sources = {
        k: v if storage.is_s3(v) else str(Path(v).absolute()) for k, v in cfg.data.sources.items()
    }
    if cfg.data.val_uri and not storage.is_s3(cfg.data.val_uri):
        cfg.data.val_uri = str(Path(cfg.data.val_uri).absolute())
    return cfg


def publish_model(
    client, run_id: str, cfg: MediSeeConfig, checkpoint_uri: str, settings: StorageSettings
) -> None:
    """Log what batch scoring and serving need: trainable weights, resolved config, base-model reference."""
    payload = read_torch(checkpoint_uri, settings)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        write_torch(
            {
                "format": TRAINABLE_FORMAT,
                "preset": cfg.model.preset,
                "state_dict": payload["model"],
                "step": payload["step"],
            },
            str(folder / "trainable.pt"),
        )
        (folder / "config.yaml").write_text(config_to_yaml(cfg))
        (folder / "base_model.yaml").write_text(
            f"preset: {cfg.model.preset}\nllava_path: {cfg.model.llava_path}\nsam_checkpoint: {cfg.model.sam_checkpoint}\n"
            f"finetune: {cfg.trainer.finetune}\nnum_candidate_tokens: {cfg.model.num_candidate_tokens}\n"
            f"source_checkpoint: {checkpoint_uri}\n"
        )
        tracking.log_artifact_dir(client, run_id, folder, "model")


def load_registered_model(model_uri: str, cfg: MediSeeConfig):
    """Build the model a registered version (or run artifact) describes."""
    import yaml

    from medisee.config import build_config

    settings = StorageSettings.from_config(cfg.storage)
    client = tracking.configure(cfg.tracking, settings)
    local = tracking.download_model(client, model_uri)
    trained = build_config(yaml.safe_load((local / "config.yaml").read_text()))
    model = build_from_config(trained, settings, str(local / "trainable.pt"), training=False)
    model.eval()
    model.source_dir = local  # where the version's files (config, verifier calibration) were downloaded
    model.source_run_id = trained_run_id(client, model_uri)
    return model


def trained_run_id(client, model_uri: str) -> str | None:
    """The run that produced a `models:/name@alias`, `models:/name/N` or `runs:/id/...` URI."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/") :].split("/", 1)[0]
    ref = model_uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    name, number = ref.split("/", 1)
    return client.get_model_version(name, number).run_id
