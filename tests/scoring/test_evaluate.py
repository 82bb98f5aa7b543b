"""Evaluation: metrics on hand-built cases equal hand-computed values; `medisee evaluate` end to end."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from medisee.data.codec import mask_to_rle
from medisee.scoring.evaluate import Accumulator


def png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def truth(record_id, kind, mask=None, box=None, class_name="liver"):
    return {"record_id": record_id, "query_kind": kind, "class_name": class_name,
            "mask_png": png(mask) if mask is not None else None, "mask_rle": None, "box": box}  # fmt: skip


def result(mask, verdict="present", box=None, found=True):
    return {"mask_rle": mask_to_rle(mask) if mask is not None else None, "verdict": verdict,
            "box_unclipped": box, "found": found}  # fmt: skip


def test_accumulator_equals_hand_computed_values():
    gt = np.zeros((8, 8), bool)
    gt[0:4, 0:4] = True  # 16 pixels, box [0, 0, 4, 4]
    half = np.zeros((8, 8), bool)
    half[0:2, 0:4] = True  # 8 pixels inside the target
    acc = Accumulator()
    acc.add(truth("a", "referring", gt, [0, 0, 4, 4]), result(gt, box=[0, 0, 4, 4]), keep_worst=2)
    acc.add(
        truth("b", "reasoning_short", gt, [0, 0, 4, 4], "spleen"),
        result(half, box=[0, 0, 4, 2]),
        keep_worst=2,
    )
    acc.add(truth("c", "false_query"), result(half, verdict="absent"), keep_worst=2)  # rejected: correct
    acc.add(
        truth("d", "false_query"), result(half, verdict="present"), keep_worst=2
    )  # a mask: false positive
    acc.add(
        truth("e", "referring", gt, [0, 0, 4, 4]),
        result(gt, verdict="absent", box=[0, 0, 4, 4]),
        keep_worst=2,
    )
    t = acc.tables()
    seg = t["segmentation"]
    # a and e are perfect segmentations (e is rejected, but segmentation is scored on the mask);
    # b: I = 8, U = 16, Dice = 16 / 24, box IoU = 8 / 16 = 0.5 (not > 0.5)
    assert seg["count"] == 3
    assert seg["dice"] == pytest.approx((1 + 1 + 16 / 24) / 3, abs=1e-6)
    assert seg["giou"] == pytest.approx((16 / (16 + 1e-5) * 2 + 8 / (16 + 1e-5)) / 3, abs=1e-6)
    assert seg["ciou"] == pytest.approx((16 + 8 + 16) / (16 + 16 + 16), abs=1e-6)
    assert seg["box_iou"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-6)
    assert seg["acc50"] == pytest.approx(2 / 3)
    assert seg["dice/reasoning_short"] == pytest.approx(16 / 24, abs=1e-6)
    assert t["per_class"]["spleen"]["dice"] == pytest.approx(16 / 24, abs=1e-6)
    assert t["per_class"]["liver"]["count"] == 2
    r = t["rejection"]  # positives = false queries: c rejected (tp), d accepted (fn); e wrongly rejected (fp)
    assert (r["false_queries"], r["true_queries"]) == (2, 3)
    assert r["precision"] == pytest.approx(1 / 2) and r["recall"] == pytest.approx(1 / 2)
    assert r["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    p = t["presence_aware"]  # a: 1, b: 16/24, c: 1, d: 0, e: rejected true query -> empty mask: 0
    assert (p["tp"], p["fn"], p["fp"], p["tn"]) == (2, 1, 1, 1)
    assert p["dice"] == pytest.approx((1 + 16 / 24 + 1 + 0 + 0) / 5, abs=1e-6)
    worst = sorted(acc.worst, key=lambda c: -c[0])  # lowest Dice first
    assert len(worst) == 2 and worst[0][1] == "b" and worst[0][2]["dice"] == pytest.approx(16 / 24, abs=1e-6)


@pytest.mark.slow
@pytest.mark.integration
def test_evaluate_command_reports_refuses_a_broken_model_and_logs_to_mlflow(ray_local, tmp_path, monkeypatch):
    """`medisee evaluate` in this process, where it joins the session's Ray (starting a Ray of its own
    would cost more than the scoring does)."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from medisee import storage
    from medisee.artifact.model_dir import save_model_dir
    from medisee.cli import app
    from medisee.config import PrepareConfig, load_config
    from medisee.console import RAY_NOISE
    from medisee.data.prepare import prepare
    from medisee.model.build import build_from_config

    # the command sets this for its process: here the test undoes it afterwards
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(RAY_NOISE))

    cfg = load_config("tiny")
    save_model_dir(build_from_config(cfg), cfg, tmp_path / "model")
    shards = tmp_path / "shards"
    prepare("phantom", "-", str(shards), PrepareConfig(phantom_images=6, val_fraction=0.5), executor="local")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = ["evaluate", "--model", str(tmp_path / "model"), "--data", str(shards), "--split", "val",
           "--output", str(tmp_path / "report"), f"tracking.uri={tracking}",
           f"tracking.artifact_location={tmp_path}/artifacts"]  # fmt: skip
    done = CliRunner().invoke(app, cmd)
    assert done.exit_code == 0, (done.stderr[-3000:], done.exception)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert "## Per class" in (tmp_path / "report" / "report.md").read_text()
    assert report["scoring"]["reconciled"] and report["segmentation"]["dice"] == summary["dice"]
    assert report["rejection"]["false_queries"] > 0
    assert list((tmp_path / "report" / "worst").glob("*.png"))

    # the segmentation Dice again, independently, from the prediction files and the shards
    import pyarrow.parquet as pq

    preds = {
        r["record_id"]: r for r in pq.read_table(tmp_path / "report" / "predictions" / "results").to_pylist()
    }
    dices = []
    for shard in (shards / "val").glob("*.parquet"):
        for row in pq.read_table(shard).to_pylist():
            if row["query_kind"] in ("false_query", "image_only"):
                continue
            gt = np.asarray(Image.open(io.BytesIO(row["mask_png"]))) > 0
            from medisee.data.codec import rle_to_mask

            pred = rle_to_mask(preds[row["record_id"]]["mask_rle"])
            dices.append(
                2 * (pred & gt).sum() / (pred.sum() + gt.sum() + 1e-6) if pred.sum() + gt.sum() else 1.0
            )
    assert report["segmentation"]["dice"] == pytest.approx(float(np.mean(dices)), abs=1e-6)

    from medisee import tracking as tr

    run = tr.client_for(tracking).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["segmentation/dice"] == pytest.approx(summary["dice"])
    assert run.data.tags["split_sha256"] == report["split_sha256"]

    # a model missing one trained weight is refused before anything is scored
    weights = load_file(str(tmp_path / "model" / "weights.safetensors"))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(tmp_path / "model" / "weights.safetensors"))
    manifest = json.loads((tmp_path / "model" / "medisee.json").read_text())
    manifest["files"]["weights.safetensors"] = storage.sha256(
        (tmp_path / "model" / "weights.safetensors").read_bytes()
    )
    (tmp_path / "model" / "medisee.json").write_text(json.dumps(manifest))
    cmd[cmd.index("--output") + 1] = str(tmp_path / "report2")
    refused = CliRunner().invoke(app, cmd)
    assert refused.exit_code == 2 and "refused" in refused.stderr and "missing" in refused.stderr
    assert not (tmp_path / "report2" / "predictions").exists()
