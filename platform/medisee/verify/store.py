"""Calibrations live with the model version: `model/verifier.json` in the run that produced it."""

from __future__ import annotations

import json
from pathlib import Path

from medisee import tracking
from medisee.verify.calibrate import CalibratedVerifier

ARTIFACT = "model/verifier.json"


def save_calibration(
    cfg, settings, run_id: str, verifier: CalibratedVerifier, report: dict | None = None
) -> None:
    client = tracking.configure(cfg.tracking, settings)
    client.log_text(run_id, verifier.to_json(), ARTIFACT)
    if report:
        client.log_text(run_id, json.dumps(report, indent=2), "verifier/report.json")
        tracking.log_metrics(
            client,
            run_id,
            {f"verifier/{k}": v for k, v in report.items() if isinstance(v, float) and v == v},
            step=0,
        )


def load_calibration(model_dir: str | Path) -> CalibratedVerifier:
    """The calibrated verifier stored with a downloaded model, or the release's defaults."""
    path = Path(model_dir) / "verifier.json"
    return CalibratedVerifier.from_json(path.read_text()) if path.exists() else CalibratedVerifier()
