"""2-worker CPU training runs through Ray Train, tracked in a real MLflow server, on shards and
checkpoints in the moto S3. One run, trained twice under one name: first under DDP, where one worker
fails once mid-run and Ray Train resumes it; then a re-run that resumes it under FSDP (a full
fine-tune, bf16 layers), where a worker fails again and resumes from the sharded run's checkpoint, and
that registers the model. (Each Ray Train start costs far more than the steps: the two strategies'
failures share the runs.)"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medisee import storage
from medisee.artifact.model_dir import load_predictor
from medisee.config import load_config
from medisee.train.checkpoints import list_checkpoints
from medisee.train.trainer import run_training
from tests.train.batches import prepare_phantom

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(ray_local, s3_server, mlflow_server, tmp_path_factory) -> dict:
    """The DDP run (steps 1-4: rank 1 fails after step 3, the retry resumes from step 2 and redoes 3),
    then its re-run under FSDP (steps 5-7, resumed from the DDP checkpoint at 4: rank 1 fails after step
    6, the retry resumes from the sharded run's checkpoint at 5 and redoes 6), registered as
    medisee-it@candidate."""
    import uuid

    from medisee.storage import StorageSettings, boto3_client

    settings = StorageSettings(endpoint=s3_server, region="us-east-1")
    root = f"s3://train-{uuid.uuid4().hex[:12]}"
    boto3_client(settings).create_bucket(Bucket=root.removeprefix("s3://"))
    tmp_path = tmp_path_factory.mktemp("train")
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
        "trainer.finetune=full",
        "trainer.log_every=1",
        "trainer.eval_limit=6",
        "trainer.warmup_steps=2",
    ]
    ddp = ["trainer.image_embedding_cache_gib=0.05"]  # the cache needs whole SAM weights: DDP only
    ddp_steps = [
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=2",
        "trainer.fail_at_step=3",
    ]
    first = run_training(load_config("tiny", [*overrides, *ddp, *ddp_steps]))
    marker = f"{root}/runs/it-run/failure-injected"
    failed_under_ddp = storage.exists(marker, settings)
    storage.delete(marker, settings)  # the hook fails once per run folder: arm it again

    fsdp = ["trainer.strategy=fsdp", "trainer.fsdp_layer_dtype=bfloat16"]  # the 7B full preset's setting
    fsdp_steps = [
        "trainer.max_steps=7",
        "trainer.eval_every=7",
        "trainer.checkpoint_every=5",
        "trainer.fail_at_step=6",
    ]
    cfg = load_config("tiny", [*overrides, *fsdp, *fsdp_steps])
    second = run_training(cfg, register="medisee-it", alias="candidate")
    return {
        "settings": settings,
        "root": root,
        "tmp_path": tmp_path,
        "tracking_uri": tracking_uri,
        "overrides": overrides,
        "cfg": cfg,
        "first": first,
        "second": second,
        "failed": (failed_under_ddp, storage.exists(marker, settings)),
    }


def test_train_fail_resume_register(trained, images_for_predict):
    settings, root, tracking_uri = trained["settings"], trained["root"], trained["tracking_uri"]
    first, second, cfg2 = trained["first"], trained["second"], trained["cfg"]
    assert first["checkpoint"].endswith("step-00000004.pt")
    assert trained["failed"][0]  # the failure really happened

    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # one run, not two
    steps = [s for s, _ in list_checkpoints(cfg2, settings)]
    assert steps[-1] == 7 and len(steps) <= 1 + cfg2.trainer.keep_best

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(first["mlflow_run_id"], "val/dice")
    assert sorted({m.step for m in history}) == [2, 4, 7]
    assert [m.step for m in history].count(7) == 1 and [m.step for m in history].count(2) == 1
    resumes = client.get_metric_history(first["mlflow_run_id"], "resumed_from_step")
    assert [m.value for m in sorted(resumes, key=lambda m: m.timestamp)][:2] == [2, 4]  # retry, re-run
    losses = losses_by_step(client, first["mlflow_run_id"])
    assert max(losses) == 7 and [len(losses[s]) for s in range(1, 5)] == [1, 1, 2, 1]
    # step 3 ran twice (the retry redid it); its two losses need not be equal: Ray Data's streaming
    # split hands blocks to whichever worker asks first, so a redone step may see other rows
    hit_rates = client.get_metric_history(first["mlflow_run_id"], "image_cache/hit_rate")
    assert hit_rates and all(0.0 <= m.value <= 1.0 for m in hit_rates)  # the recipe ran with the cache
    assert client.get_run(first["mlflow_run_id"]).data.params["resolved.precision"] == "fp32"  # CPU
    tags = client.get_run(first["mlflow_run_id"]).data.tags
    assert tags["checkpoint.latest"].endswith("step-00000007.pt") and tags["system.world_size"] == "2"

    assert second["model_uri"] == "models:/medisee-it@candidate"
    predictor = load_predictor(second["model_uri"], settings=settings, tracking_uri=tracking_uri)
    assert predictor.artifact.run_id == first["mlflow_run_id"]
    assert predictor.artifact.manifest["source"].endswith("step-00000007.pt")
    assert predictor.artifact.manifest["metrics"]["dice"] >= 0.0
    result = predictor.predict(images_for_predict[0], "Can you segment the liver in this image?")[0]
    assert result.found and result.verdict in ("present", "absent")

    # the verifier is calibrated and evaluated against the registered version, and stored with it
    from typer.testing import CliRunner

    from medisee.cli import app

    overrides = trained["overrides"]
    model_args = ["--model", "models:/medisee-it@candidate", "--data", f"{root}/shards", "--limit", "40"]
    result = CliRunner().invoke(app, ["calibrate", *model_args, "--split", "val", "-c", "tiny", *overrides])
    assert result.exit_code == 0, result.output
    table = trained["tmp_path"] / "verifier.md"
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
    calibrated = load_predictor(second["model_uri"], settings=settings, tracking_uri=tracking_uri)
    assert calibrated.artifact.calibration.balanced_accuracy is not None  # the stored calibration loads


@pytest.fixture()
def images_for_predict():
    import numpy as np

    return [np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)]


def test_fsdp_full_finetune_fails_resumes_and_checkpoints_whole_weights(trained):
    """The FSDP strategy through Ray Train: a worker failure resumes from a sharded run's checkpoint,
    and the checkpoint holds whole (gathered) weights that load into an unsharded model."""
    import yaml

    from medisee.model import build_model
    from medisee.model.checkpoint import read_torch

    result, cfg, settings = trained["second"], trained["cfg"], trained["settings"]
    assert result["checkpoint"].endswith("step-00000007.pt")
    assert trained["failed"][1]  # the failure under FSDP really happened
    payload = read_torch(result["checkpoint"], settings)
    assert yaml.safe_load(payload["config"])["trainer"]["strategy"] == "fsdp"  # written by the sharded run
    plain = build_model("tiny", finetune="full", seed=cfg.run.seed)
    trainable = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    assert payload["model"].keys() == trainable.keys()
    assert all(payload["model"][n].shape == p.shape for n, p in trainable.items())  # gathered, not shards
    # bfloat16 is only what the layers compute in: the master weights stay float32
    assert {v.dtype for v in payload["model"].values()} == {torch.float32}
    assert payload["optimizer"]["state"].keys() <= trainable.keys()
    assert payload["step"] == 7 and len(payload["rng"]) == 2
    initial = {n: p.detach().clone() for n, p in trainable.items()}
    plain.load_trainable_state_dict(payload["model"])
    changed = [n for n, p in trainable.items() if not torch.equal(p, initial[n])]
    assert changed  # the loaded weights are the trained ones, not the initial ones

    from mlflow import MlflowClient

    client = MlflowClient(trained["tracking_uri"])
    run_id = result["mlflow_run_id"]
    # the retry under FSDP resumed from the checkpoint the sharded run wrote at step 5, and redid step 6
    resumes = client.get_metric_history(run_id, "resumed_from_step")
    assert [m.value for m in sorted(resumes, key=lambda m: m.timestamp)] == [2, 4, 5]
    assert client.get_run(run_id).data.tags["checkpoint.resumed_from"].endswith("step-00000005.pt")
    losses = losses_by_step(client, run_id)
    assert [len(losses[s]) for s in (5, 6, 7)] == [1, 2, 1]
    assert all(math.isfinite(v) for s in (5, 6, 7) for v in losses[s])


def test_stage_two_trains_from_the_registered_model_and_names_it_as_parent(trained):
    """Stage two from `models:/medisee-it@candidate` (stage one: the run above): its weights, a fresh
    run (own optimiser, steps from 1), the lineage in the run's tags and in the new artifact."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from medisee.artifact.model_dir import load_model_dir
    from tests.train.runs import phantom_run_config

    tracking_uri, parent_ref = trained["tracking_uri"], "models:/medisee-it@candidate"
    short = ["trainer.num_workers=1", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2",
             "trainer.eval_limit=2", "trainer.warmup_steps=1", "trainer.log_every=1"]  # fmt: skip
    cfg = phantom_run_config(
        trained["tmp_path"] / "stage-two", tracking_uri, "stage-two", "stage-two",
        [*short, f"model.init_from={parent_ref}", "model.similarity_loss_weight=1.0"],
    )  # fmt: skip
    second = run_training(cfg, register="medisee-it-stage-two", alias="candidate")

    parent = load_model_dir(parent_ref, settings=trained["settings"], tracking_uri=tracking_uri)
    child = load_model_dir("models:/medisee-it-stage-two@candidate", tracking_uri=tracking_uri)
    assert child.manifest["parent"] == {
        "ref": parent_ref,
        "name": "medisee-it",
        "version": parent_version(tracking_uri),
        "run_id": trained["first"]["mlflow_run_id"],
        "sha256": parent.sha256,
    }
    client = MlflowClient(tracking_uri)
    tags = client.get_run(second["mlflow_run_id"]).data.tags
    assert tags["parent.ref"] == parent_ref and tags["parent.run_id"] == trained["first"]["mlflow_run_id"]
    assert sorted(losses_by_step(client, second["mlflow_run_id"])) == [1, 2]
    a, b = (load_file(str(m.local_dir / "weights.safetensors")) for m in (parent, child))
    assert a and a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # trained on from it


def parent_version(tracking_uri: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri).get_model_version_by_alias("medisee-it", "candidate").version)


def losses_by_step(client, run_id: str) -> dict[int, list[float]]:
    """train/loss of each step, in the order logged (a step redone after a failure logs again)."""
    by_step: dict[int, list[float]] = {}
    for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp):
        by_step.setdefault(m.step, []).append(m.value)
    return by_step


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
    predictor = load_predictor("models:/durable@candidate", tracking_uri=tracking_uri)
    image = (np.arange(80 * 96) % 251).astype(np.uint8).reshape(80, 96)
    assert predictor.predict(image, "Can you segment and locate the liver in this image?")[0].found
