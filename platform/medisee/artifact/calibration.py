"""Calibrations live with the model: `verifier.json` inside the run's model artifact.

The artifact's manifest lists the file with its sha256, so a registered version that points at
the run's `model` folder loads the calibration together with the weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from medisee import storage, tracking
from medisee.artifact.model_dir import CALIBRATION, MANIFEST
from medisee.artifact.model_dir import MLFLOW_PATH as MODEL_ARTIFACT
from medisee.verify.calibrate import CalibratedVerifier


def save_calibration(
    cfg, settings, run_id: str, verifier: CalibratedVerifier, report: dict | None = None
) -> None:
    import mlflow

    client = tracking.configure(cfg.tracking, settings)
    text = verifier.to_json()
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{MODEL_ARTIFACT}/{MANIFEST}", dst_path=tmp
        )
        manifest = json.loads(Path(local).read_text())
        manifest["files"][CALIBRATION] = storage.sha256(text.encode())
        client.log_text(run_id, text, f"{MODEL_ARTIFACT}/{CALIBRATION}")
        client.log_text(run_id, json.dumps(manifest, indent=2), f"{MODEL_ARTIFACT}/{MANIFEST}")
    if report:
        client.log_text(run_id, json.dumps(report, indent=2), "verifier/report.json")
        tracking.log_metrics(
            client,
            run_id,
            {f"verifier/{k}": v for k, v in report.items() if isinstance(v, float) and v == v},
            step=0,
        )
