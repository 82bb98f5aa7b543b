"""MLflow helpers: one run per run name, flattened params, metrics, artifacts, registry aliases.

Only rank 0 of a distributed job calls these. Telemetry is always off.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medisee.storage import StorageSettings

MAX_PARAM_CHARS = 500


DEFAULT_TRACKING_URI = "sqlite:///.medisee/mlflow.db"
# Ray names a session folder session_<date>_<time>_<microseconds>_<pid>
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: "C:" is a drive
RAY_SESSION_DIR = re.compile(r"/session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(_\d+)+(/|$)")


class TrackingStoreError(ValueError):
    """A tracking store or artifact root that cannot work where this process runs; says what to pass."""


class ModelReferenceError(ValueError):
    """A `models:/` reference that names no alias or version."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative unless it starts with `sqlite:////`)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def absolute_tracking_uri(uri: str, setting: str = "tracking.uri") -> str:
    """A local SQLite store as an absolute path, relative ones against this process's directory.

    That directory must be the submitting side's: in a Ray job's unpacked working dir (or anywhere
    under Ray's temp directory) the store would be a new, empty one: TrackingStoreError.
    """
    path = sqlite_path(uri)
    if path is None:
        return uri
    reason = unusable_here(path.absolute(), relative=not path.is_absolute())
    if reason:
        raise TrackingStoreError(f"{setting} {uri} {reason}: {store_advice(setting)}")
    return f"sqlite:///{path.absolute()}"


def resolve_tracking_uri(uri: str, setting: str = "tracking.uri") -> str:
    """`absolute_tracking_uri`, creating the folder of a relative local store (the default one)."""
    resolved = absolute_tracking_uri(uri, setting)
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        sqlite_path(resolved).parent.mkdir(parents=True, exist_ok=True)
    return resolved


def existing_store(uri: str, setting: str = "tracking.uri") -> str:
    """`uri` made absolute; a local SQLite store must exist already: a model reference read from a
    new, empty one can only be "not found", and would leave that empty database behind."""
    resolved = absolute_tracking_uri(uri, setting)
    path = sqlite_path(resolved)
    if path is not None and not path.is_file():
        raise TrackingStoreError(f"{setting} {uri}: no MLflow database at {path}; {store_advice(setting)}")
    return resolved


def store_advice(setting: str = "tracking.uri") -> str:
    return (
        f"pass {setting}=http://HOST:5000 (an MLflow server the job can reach) "
        f"or {setting}=sqlite:////absolute/path/mlflow.db on a disk it shares"
    )


def ray_job_working_dir() -> str | None:
    """The working_dir of the Ray job whose entrypoint this process is; None outside one."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("working_dir") if raw else None
    except (ValueError, AttributeError):
        return None


def unusable_here(path: Path, relative: bool) -> str | None:
    """Why a local store or artifact root at `path` (absolute) would not outlive this Ray session."""
    if relative and ray_job_working_dir():
        return (
            f"is relative to this Ray job's working dir {Path.cwd()}, which Ray unpacks without "
            "git-ignored files such as .medisee/ and deletes with the job"
        )
    if in_ray_temp(str(path)):
        return f"resolves to {path}, under Ray's temp directory: empty there and gone with the Ray session"
    return None


def in_ray_temp(path: str) -> bool:
    ray_tmp = os.environ.get("RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "ray")
    return bool(RAY_SESSION_DIR.search(path)) or path.startswith(ray_tmp.rstrip("/") + "/")


def default_artifact_location(tracking_uri: str) -> str | None:
    """`mlartifacts` next to a local SQLite store; None (the server decides) for anything else."""
    path = sqlite_path(tracking_uri)
    return str(path.parent / "mlartifacts") if path is not None else None


def resolve_artifact_location(tracking_cfg) -> str | None:
    """An absolute path or URI, fixed on the driver before any worker starts.

    MLflow's own default is `./mlruns` relative to the current directory, which inside a Ray Train
    worker is Ray's per-run temp folder: the files would vanish with the Ray session.
    """
    location = tracking_cfg.artifact_location
    if not location:
        return default_artifact_location(resolve_tracking_uri(tracking_cfg.uri))
    if is_remote(location):
        return location
    path = Path(location.removeprefix("file://"))
    reason = unusable_here(path.absolute(), relative=not path.is_absolute())
    if reason:
        raise TrackingStoreError(
            f"tracking.artifact_location {location} {reason}: pass an s3:// URI or an absolute path "
            "that every node shares"
        )
    return str(path.absolute())


def is_remote(location: str) -> bool:
    """A URI of a store (`s3://b/a`, `mlflow-artifacts:/1`, `http://...`), not a local path."""
    return bool(URI_SCHEME.match(location)) and not location.startswith("file:")


def is_transient_location(location: str) -> bool:
    """Under Ray's temp directory, or relative (to whatever directory a process happens to run in)."""
    if is_remote(location):
        return False
    path = location.removeprefix("file://")
    return not os.path.isabs(path) or in_ray_temp(path)


def configure(tracking_cfg, settings: StorageSettings | None = None):
    """Point MLflow at the configured server and object storage; return an MlflowClient."""
    return client_for(tracking_cfg.uri, settings)


def client_for(uri: str | None = None, settings: StorageSettings | None = None):
    """An MlflowClient for `uri` (default: $MLFLOW_TRACKING_URI, else the platform's local store)."""
    import mlflow
    from mlflow import MlflowClient

    if settings and settings.endpoint:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.endpoint
    uri = resolve_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def reader_for(uri: str | None = None, settings: StorageSettings | None = None):
    """`client_for` a store that must hold something already (reading a `models:/` or `runs:/` reference)."""
    return client_for(
        existing_store(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI), settings
    )


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
    name, _, number = ref.partition("/")
    if not (name and number.isdigit()):
        raise ModelReferenceError(f"{model_uri}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, number)


def artifact_uri(client, model_uri: str) -> str:
    """Where the files of a `models:/...` or `runs:/...` reference live."""
    if model_uri.startswith("models:/"):
        version = model_version(client, model_uri)
        return client.get_model_version_download_uri(version.name, version.version)
    return model_uri


def download_model(client, model_uri: str, dst: str | Path, file: str | None = None) -> Path:
    """Download `models:/name@alias`, `models:/name/3` or `runs:/id/path` (or one `file` of it) into
    the folder `dst`, which the caller owns (and removes); returns where the files are inside it."""
    import mlflow

    from medisee import storage

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    source = artifact_uri(client, model_uri)
    if file is not None:
        source = f"{source.rstrip('/')}/{file}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))
    if not local.resolve().is_relative_to(dst.resolve()):  # MLflow checks each file, not the root
        raise storage.UnsafeKey(f"{model_uri} names {local}, outside the download folder {dst}")
    return local


def trained_run_id(client, model_uri: str) -> str | None:
    """The run that produced a `models:/name@alias`, `models:/name/N` or `runs:/id/...` URI."""
    if model_uri.startswith("runs:/"):
        return client.get_run(model_uri[len("runs:/") :].split("/", 1)[0]).info.run_id  # unknown: raises
    return model_version(client, model_uri).run_id
