"""2-worker CPU training runs through Ray Train, tracked in a real MLflow server: DDP on shards and
checkpoints in the moto S3 (one worker fails once mid-run; a re-run with the same name resumes), and
the FSDP strategy (fails, resumes, checkpoints whole weights)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medisee import storage
from medisee.config import load_config
from medisee.infer import Predictor
from medisee.train.recipe import list_checkpoints
from medisee.train.trainer import run_training
from tests.train.batches import prepare_phantom
from tests.train.runs import phantom_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_train_fail_resume_register(ray_local, s3_bucket, mlflow_server, tmp_path, images_for_predict):
    settings, root = s3_bucket
    tracking_uri, _ = mlflow_server
    local = prepare_phantom(tmp_path, images=24, val_fraction=0.25)
    storage.upload_dir(local, storage.join(root, "shards"), settings)
    overrides = [
        f"storage.endpoint={settings.endpoint}",
        f"tracking.uri={tracking_uri}",
        "tracking.experiment=train-test",
        f"run.storage_uri={root}/runs",
        "run.name=it-run",
        f"data.sources={{phantom: {root}/shards}}",
        "data.batch_size=2",
        "data.preprocess_concurrency=1",
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.checkpoint_every=3",
        "trainer.log_every=1",
        "trainer.eval_limit=6",
        "trainer.fail_at_step=4",
        "trainer.warmup_steps=2",
        "trainer.image_embedding_cache_gib=0.05",
    ]
    first = run_training(load_config("tiny", overrides))
    assert first["checkpoint"].endswith("step-00000006.pt")
    assert storage.exists(f"{root}/runs/it-run/failure-injected", settings)  # the failure really happened

    cfg2 = load_config("tiny", [*overrides, "trainer.max_steps=9"])
    second = run_training(cfg2, register="medisee-it", alias="candidate")
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # one run, not two
    steps = [s for s, _ in list_checkpoints(cfg2, settings)]
    assert steps[-1] == 9 and len(steps) <= 1 + cfg2.trainer.keep_best

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(first["mlflow_run_id"], "val/dice")
    assert sorted({m.step for m in history}) == [3, 6, 9]
    assert [m.step for m in history].count(9) == 1 and [m.step for m in history].count(3) == 1
    losses = client.get_metric_history(first["mlflow_run_id"], "train/loss")
    assert max(m.step for m in losses) == 9
    hit_rates = client.get_metric_history(first["mlflow_run_id"], "image_cache/hit_rate")
    assert hit_rates and all(0.0 <= m.value <= 1.0 for m in hit_rates)  # the recipe ran with the cache
    assert client.get_run(first["mlflow_run_id"]).data.params["resolved.precision"] == "fp32"  # CPU
    tags = client.get_run(first["mlflow_run_id"]).data.tags
    assert tags["checkpoint.latest"].endswith("step-00000009.pt") and tags["system.world_size"] == "2"

    assert second["model_uri"] == "models:/medisee-it@candidate"
    predictor = Predictor.from_artifact(second["model_uri"], settings=settings, tracking_uri=tracking_uri)
    assert predictor.artifact.run_id == first["mlflow_run_id"]
    assert predictor.artifact.manifest["source"].endswith("step-00000009.pt")
    assert predictor.artifact.manifest["metrics"]["dice"] >= 0.0
    result = predictor.predict(images_for_predict[0], "Can you segment the liver in this image?")[0]
    assert result.found and result.verdict in ("present", "absent")

    # the verifier is calibrated and evaluated against the registered version, and stored with it
    from typer.testing import CliRunner

    from medisee.cli import app

    model_args = ["--model", "models:/medisee-it@candidate", "--data", f"{root}/shards", "--limit", "40"]
    result = CliRunner().invoke(app, ["calibrate", *model_args, "--split", "val", "-c", "tiny", *overrides])
    assert result.exit_code == 0, result.output
    table = tmp_path / "verifier.md"
    result = CliRunner().invoke(
        app,
        [
            "evaluate-verifier",
            *model_args,
            "--split",
            "val",
            "--output",
            str(table),
            "-c",
            "tiny",
            *overrides,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| balanced_accuracy |" in table.read_text()
    artifacts = {a.path for a in client.list_artifacts(first["mlflow_run_id"], "model")}
    assert {"model/verifier.json", "model/weights.safetensors", "model/medisee.json"} <= artifacts
    calibrated = Predictor.from_artifact(second["model_uri"], settings=settings, tracking_uri=tracking_uri)
    assert calibrated.artifact.calibration.balanced_accuracy is not None  # the stored calibration loads


@pytest.fixture()
def images_for_predict():
    import numpy as np

    return [np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)]


def test_fsdp_full_finetune_fails_resumes_and_checkpoints_whole_weights(ray_local, mlflow_server, tmp_path):
    """The FSDP strategy through Ray Train: a worker failure resumes from a sharded run's checkpoint,
    and the checkpoint holds whole (gathered) weights that load into an unsharded model."""
    from medisee.model import build_model
    from medisee.model.checkpoint import read_torch

    tracking_uri, _ = mlflow_server
    cfg = phantom_run_config(
        tmp_path,
        tracking_uri,
        "train-fsdp",
        "fsdp-run",
        [
            "trainer.finetune=full",
            "trainer.strategy=fsdp",
            "trainer.fsdp_layer_dtype=bfloat16",  # the 7B preset's setting
            "trainer.max_steps=4",
            "trainer.eval_every=2",
            "trainer.checkpoint_every=2",
            "trainer.eval_limit=4",
            "trainer.fail_at_step=3",
            "trainer.warmup_steps=1",
        ],
    )
    result = run_training(cfg)
    assert result["checkpoint"].endswith("step-00000004.pt")
    assert (tmp_path / "runs/fsdp-run/failure-injected").exists()
    payload = read_torch(result["checkpoint"])
    plain = build_model("tiny", finetune="full", seed=cfg.run.seed)
    trainable = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    assert payload["model"].keys() == trainable.keys()
    assert all(payload["model"][n].shape == p.shape for n, p in trainable.items())  # gathered, not shards
    # bfloat16 is only what the layers compute in: the master weights stay float32
    assert {v.dtype for v in payload["model"].values()} == {torch.float32}
    assert payload["optimizer"]["state"].keys() <= trainable.keys()
    assert payload["step"] == 4 and len(payload["rng"]) == 2
    initial = {n: p.detach().clone() for n, p in trainable.items()}
    plain.load_trainable_state_dict(payload["model"])
    changed = [n for n, p in trainable.items() if not torch.equal(p, initial[n])]
    assert changed  # the loaded weights are the trained ones, not the initial ones

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    assert sorted(m.step for m in client.get_metric_history(result["mlflow_run_id"], "val/dice")) == [2, 4]
    losses = client.get_metric_history(result["mlflow_run_id"], "train/loss")
    assert losses and all(math.isfinite(m.value) for m in losses)


def test_a_registered_model_outlives_the_ray_session_that_trained_it(tmp_path):
    """`medisee train --register` with the default local MLflow store, in its own process and Ray
    (its temp directory under our control); then Ray's directory is deleted and the model loads."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from medisee import tracking

    project = tmp_path / "project"
    project.mkdir()
    shards = prepare_phantom(project, images=8, val_fraction=0.25)
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    cmd = [
        sys.executable, "-m", "medisee.cli", "train", "-c", "tiny", "--register", "durable", "--alias", "candidate",
        f"data.sources={{phantom: {shards}}}", "run.name=durable", "data.batch_size=2",
        "data.preprocess_concurrency=1", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.eval_limit=2",
        "trainer.warmup_steps=1", "trainer.num_workers=1",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(Path(ray_tmp).rglob("session_*"))  # Ray really kept its session there
    shutil.rmtree(ray_tmp)

    tracking_uri = f"sqlite:///{project}/.medisee/mlflow.db"
    client = tracking.client_for(tracking_uri)
    version = client.get_model_version_by_alias("durable", "candidate")
    location = client.get_run(version.run_id).info.artifact_uri
    assert location.startswith(str(project / ".medisee" / "mlartifacts")) and ray_tmp not in location
    predictor = Predictor.from_artifact("models:/durable@candidate", tracking_uri=tracking_uri)
    image = (np.arange(80 * 96) % 251).astype(np.uint8).reshape(80, 96)
    assert predictor.predict(image, "Can you segment and locate the liver in this image?")[0].found
