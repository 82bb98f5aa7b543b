"""MLflow helpers against a real `mlflow server` with artifacts on the moto S3."""

import pytest

from medisee import tracking
from medisee.config import TrackingConfig, flatten, load_config
from medisee.storage import StorageSettings, boto3_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_run_params_metrics_artifacts_registry(mlflow_server, s3_server, tmp_path):
    uri, bucket = mlflow_server
    settings = StorageSettings(endpoint=s3_server)
    cfg = TrackingConfig(uri=uri, experiment="tracking-test")
    client = tracking.configure(cfg, settings)
    run_id = tracking.start_or_resume_run(client, cfg, "run-a")
    params = flatten(load_config("tiny"))
    tracking.log_params(client, run_id, params)
    tracking.log_metrics(client, run_id, {"loss": 1.5, "dice": 0.2}, step=1)
    tracking.log_metrics(client, run_id, {"loss": 0.5}, step=2)
    tracking.log_text(client, run_id, "a: 1\n", "config/resolved.yaml")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"\x00" * 64)
    tracking.log_artifact_dir(client, run_id, model_dir, "model")
    tracking.log_uri(client, run_id, "checkpoint.latest", "s3://ckpt/run-a/step-2")

    # same run name -> same run, params not duplicated
    assert tracking.start_or_resume_run(client, cfg, "run-a") == run_id
    tracking.log_params(client, run_id, params)
    run = client.get_run(run_id)
    assert run.data.params["trainer.num_workers"] == "2"
    assert run.data.metrics["loss"] == 0.5
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.5, 0.5]
    assert run.data.tags["checkpoint.latest"] == "s3://ckpt/run-a/step-2"

    # artifacts really went to the S3 bucket through the server
    keys = [o["Key"] for o in boto3_client(settings).list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("model/weights.bin") for k in keys)
    assert any(k.endswith("config/resolved.yaml") for k in keys)

    version = tracking.register_model(client, run_id, "model", "medisee-test", alias="champion")
    assert client.get_model_version_by_alias("medisee-test", "champion").version == version
    local = tracking.download_model(client, "models:/medisee-test@champion", tmp_path / "dl")
    assert (local / "weights.bin").read_bytes() == b"\x00" * 64
    version2 = tracking.register_model(client, run_id, "model", "medisee-test", alias="champion")
    assert int(version2) == int(version) + 1
    tracking.end_run(client, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_default_sqlite_store_in_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = tracking.configure(TrackingConfig())
    run_id = tracking.start_or_resume_run(client, TrackingConfig(), "local")
    tracking.log_metrics(client, run_id, {"x": 1.0}, 0)
    assert (tmp_path / ".medisee" / "mlflow.db").exists()
