"""A tiny-preset training config on phantom shards prepared in the test's folder."""

from __future__ import annotations

from pathlib import Path

from medisee.config import MediSeeConfig, load_config
from tests.train.batches import prepare_phantom


def phantom_run_config(
    tmp_path: Path, tracking_uri: str, experiment: str, run_name: str, overrides: list[str]
) -> MediSeeConfig:
    shards = prepare_phantom(tmp_path, images=16, val_fraction=0.25)
    return load_config(
        "tiny",
        [
            f"tracking.uri={tracking_uri}",
            f"tracking.experiment={experiment}",
            f"run.storage_uri={tmp_path}/runs",
            f"run.name={run_name}",
            f"data.sources={{phantom: {shards}}}",
            "data.batch_size=2",
            "data.preprocess_concurrency=1",
            *overrides,
        ],
    )
