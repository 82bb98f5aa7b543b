"""MLflow helpers: one run per run name, flattened params, metrics, artifacts, registry aliases.

Only rank 0 of a distributed job calls these. Telemetry is always off.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medisee.storage import StorageSettings

MAX_PARAM_CHARS = 500


def resolve_tracking_uri(uri: str) -> str:
    """Make the default local SQLite store work from any working directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :]).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """`mlartifacts` next to a local SQLite store; None (the server decides) for anything else."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def resolve_artifact_location(tracking_cfg) -> str | None:
    """An absolute path or URI, fixed on the driver before any worker starts.

    MLflow's own default is `./mlruns` relative to the current directory, which inside a Ray Train
    worker is Ray's per-run temp folder: the files would vanish with the Ray session.
    """
    location = tracking_cfg.artifact_location
    if location:
        return location if "://" in location else str(Path(location).absolute())
    return default_artifact_location(resolve_tracking_uri(tracking_cfg.uri))


def is_transient_location(location: str) -> bool:
    """Under Ray's temp directory, or relative (to whatever directory a process happens to run in)."""
    path = location.removeprefix("file://")
    if "://" in path:
        return False
    ray_tmp = os.environ.get("RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "ray")
    return not os.path.isabs(path) or "/session_" in path or path.startswith(ray_tmp.rstrip("/") + "/")


def configure(tracking_cfg, settings: StorageSettings | None = None):
    """Point MLflow at the configured server and object storage; return an MlflowClient."""
    return client_for(tracking_cfg.uri, settings)


def client_for(uri: str | None = None, settings: StorageSettings | None = None):
    """An MlflowClient for `uri` (default: $MLFLOW_TRACKING_URI, else the platform's local store)."""
    import mlflow
    from mlflow import MlflowClient

    if settings and settings.endpoint:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.endpoint
    uri = resolve_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///.medisee/mlflow.db")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_or_create_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id; a new one stores its artifacts at `artifact_location` (absolute)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    if is_transient_location(exp.artifact_location):
        warnings.warn(
            f"MLflow experiment {name!r} keeps its artifacts at {exp.artifact_location}, which is "
            "relative or under Ray's temp directory: models logged there disappear with the Ray session. "
            "Use a new experiment (tracking.experiment) with tracking.artifact_location set.",
            stacklevel=2,
        )
    return exp.experiment_id


def find_run(client, experiment_id: str, run_name: str):
    """The newest run with this name, or None (a resumed job continues in it)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.runName` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def start_or_resume_run(client, tracking_cfg, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """Run id for `run_name`: the existing one if any, otherwise a new run."""
    exp_id = get_or_create_experiment(
        client, tracking_cfg.experiment, resolve_artifact_location(tracking_cfg)
    )
    existing = find_run(client, exp_id, run_name)
    if existing is not None:
        if existing.info.status != "RUNNING":
            client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
    return run.info.run_id


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log flattened params; values are stringified and truncated to MLflow's limit.

    Params are immutable in MLflow, so on a resumed run only new keys are logged.
    """
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    batch = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items() if key not in existing]
    for i in range(0, len(batch), 100):
        client.log_batch(run_id, params=batch[i : i + 100])


def log_system_info(client, run_id: str, world_size: int) -> None:
    """Versions and hardware of the run, as tags."""
    import platform as stdlib_platform
    import socket
    from importlib.metadata import version

    import torch

    tags = {
        "system.python": stdlib_platform.python_version(),
        "system.host": socket.gethostname(),
        "system.cpus": str(os.cpu_count()),
        "system.world_size": str(world_size),
        "system.cuda": str(torch.cuda.is_available()),
        "system.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    for pkg in ("torch", "ray", "transformers", "peft", "mlflow", "medisee"):
        tags[f"system.{pkg}"] = version(pkg)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    if batch:
        client.log_batch(run_id, metrics=batch)


def log_text(client, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def log_artifact_dir(client, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    client.log_artifacts(run_id, str(local_dir), artifact_path)


def log_uri(client, run_id: str, key: str, uri: str) -> None:
    """Record where something lives (a checkpoint on object storage) without copying it."""
    client.set_tag(run_id, key, uri)


def end_run(client, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status=status)


def register_model(client, run_id: str, artifact_path: str, name: str, alias: str | None = None) -> str:
    """Register `runs:/<run_id>/<artifact_path>` under `name`; optionally set an alias. Returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def model_version(client, model_uri: str):
    """The registry entry of `models:/name@alias` or `models:/name/N`."""
    ref = model_uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, number = ref.split("/", 1)
    return client.get_model_version(name, number)


def artifact_uri(client, model_uri: str) -> str:
    """Where the files of a `models:/...` or `runs:/...` reference live."""
    if model_uri.startswith("models:/"):
        version = model_version(client, model_uri)
        return client.get_model_version_download_uri(version.name, version.version)
    return model_uri


def download_model(client, model_uri: str, dst: str | Path | None = None, file: str | None = None) -> Path:
    """Download `models:/name@alias`, `models:/name/3` or `runs:/id/path` (or one `file` of it)."""
    import mlflow

    dst = Path(dst or tempfile.mkdtemp(prefix="medisee-model-"))
    source = artifact_uri(client, model_uri)
    if file is not None:
        source = f"{source.rstrip('/')}/{file}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))


def trained_run_id(client, model_uri: str) -> str | None:
    """The run that produced a `models:/name@alias`, `models:/name/N` or `runs:/id/...` URI."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/") :].split("/", 1)[0]
    return model_version(client, model_uri).run_id
