"""Starting or joining Ray with the settings this platform needs."""

from __future__ import annotations

import os

RAY_ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # binds 127.0.0.1 for a local cluster
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train's print patch echoes a print twice once anything wraps sys.stdout (colorama does)
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # Serve's throughput mode: replicas call each other over gRPC (a handle call costs ~4-6 ms here
    # instead of ~7-10 ms). Read when a Serve process starts, so a cluster sets these in its
    # containers' env (the medisee-env ConfigMap in infra/k8s). Kept as without it: Serve's HTTP proxy (direct ingress
    # would bind a port range on every ingress replica) and the router's own loop (handles used
    # outside an event loop, as batch scoring through Serve does, need it).
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
}


# Only for a Ray this process starts itself (loopback, no other users). Joining RAY_ADDRESS, Ray's own
# rule applies: token authentication when the cluster uses it (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN),
# and a cloud node's instance role needs the metadata service.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "AWS_EC2_METADATA_DISABLED": "true"}

# Sent to a cluster's workers in the job's runtime env: settings only. Credentials never travel there
# (Ray stores a runtime env with the job and shows it in the dashboard and the jobs API); workers take
# them from their own environment: Kubernetes Secrets, instance roles, or the stack's env.
FORWARDED_SETTINGS = ("MEDISEE_S3_ENDPOINT", "AWS_DEFAULT_REGION")


def apply_env_defaults() -> None:
    defaults = RAY_ENV_DEFAULTS if os.environ.get("RAY_ADDRESS") else RAY_ENV_DEFAULTS | LOCAL_RAY_ENV
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS if set (a cluster, `ray job submit`), else start a local Ray."""
    apply_env_defaults()
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or "local",  # never another Ray that happens to run on this machine
        num_cpus=None if address else num_cpus,
        include_dashboard=False,
        ignore_reinit_error=True,
        logging_level="WARNING",
        # A local Ray's workers inherit this process's environment. A job runtime env there would
        # keep Ray from handing out the workers it prestarts (an actor waits ~1.5 s longer for its
        # own); a cluster's workers need the variables sent along.
        runtime_env={"env_vars": worker_env()} if address else None,
    )


def worker_env() -> dict[str, str]:
    """The environment a cluster's workers get from this job: our Ray defaults and non-secret settings."""
    names = [*RAY_ENV_DEFAULTS, *FORWARDED_SETTINGS]
    return {k: os.environ[k] for k in names if os.environ.get(k)}
