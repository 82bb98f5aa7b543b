"""The golden pair stored with every artifact: reproduced by the model as saved, refused otherwise."""

from __future__ import annotations

import pytest

from medisee.artifact.golden import GOLDEN_ANSWER, GoldenMismatch, check_golden
from medisee.artifact.model_dir import load_model_dir, save_model_dir
from medisee.config import load_config
from medisee.infer import Predictor
from medisee.model.build import build_from_config


def test_the_saved_model_reproduces_its_golden_answer_and_another_does_not(tmp_path):
    cfg = load_config("tiny")
    manifest = save_model_dir(build_from_config(cfg), cfg, tmp_path / "m")
    assert {"golden.png", GOLDEN_ANSWER} <= set(manifest["files"])
    loaded = load_model_dir(tmp_path / "m")
    report = check_golden(Predictor(loaded.model, loaded.calibration, early_reject=False), loaded.local_dir)
    assert report["ok"] and report["mask_iou"] == pytest.approx(1.0, abs=1e-6)  # I / (U + 1e-5)

    other = build_from_config(load_config("tiny", ["run.seed=7"])).eval()
    with pytest.raises(GoldenMismatch, match="golden pair mismatch"):
        check_golden(Predictor(other, early_reject=False), loaded.local_dir)


def test_an_artifact_without_golden_pair_is_refused(tmp_path):
    cfg = load_config("tiny")
    save_model_dir(build_from_config(cfg), cfg, tmp_path / "m", golden=False)
    loaded = load_model_dir(tmp_path / "m")
    assert not (loaded.local_dir / GOLDEN_ANSWER).exists()
    with pytest.raises(GoldenMismatch, match="no golden.json"):
        check_golden(Predictor(loaded.model, early_reject=False), loaded.local_dir)
