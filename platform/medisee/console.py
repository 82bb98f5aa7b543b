"""Readable terminal output for the platform's commands.

Ray, Ray Train and MLflow print lines meant for their own developers: a Ray Train INFO line per
worker-group event, "Failed to query Ray Train Controller actor state" every few seconds on small
machines, C++ core-worker notices, Ray Data's execution plans. `quiet_logs()` drops those from the
terminal (they stay in Ray's log files under its session directory); warnings and errors of our
own code and the user's still come through.
"""

from __future__ import annotations

import logging
import os

RAY_NOISE = (
    r"Failed to query Ray Train Controller actor state",
    r"Requesting resources: ",
    r"Attempting to start training worker group",
    r"Started training worker group",
    r"Setting up process group for",
    r"Moving model to device",
    r"Wrapping provided model in",
    r"core_worker\.cc:\d+: Actor with class name",
    r"gcs_actor_scheduler\.cc:\d+: Failed to kill actor",
    r"Reporting training result",
    r"Checkpoint successfully created",
    r"Starting execution of Dataset",
    r"Execution plan of Dataset",
    r"Dataset .* execution finished in",
    r"world_rank=\d+, local_rank=\d+",
    r"ExecutionOptions\.exclude_resources|self\.exclude_resources = exclude_resources",
    r"Progress bars disabled",
)

QUIET_LOGGERS = ("ray.data", "ray.train", "ray.tune", "mlflow", "alembic")


def quiet_logs() -> None:
    """Call from an entry point before Ray is imported: Ray reads the skip pattern when it loads."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(RAY_NOISE))
    import ray.data  # noqa: F401  (Ray Data configures its loggers on import; override them after)

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
