"""`make demo`: the platform's main job on embedded defaults, on data it generates itself.

prepare (phantom shards, Ray Data) -> train (tiny preset, 2 Ray Train workers, MLflow)
-> validation on held-out phantoms: untrained model vs. "mean mask of the class" vs. trained.
The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from medisee.raylib import apply_env_defaults

apply_env_defaults()


def main(workdir: str = ".medisee/demo", overrides: list[str] | None = None) -> dict:
    from medisee.config import load_config
    from medisee.data.prepare import prepare
    from medisee.model import build_model
    from medisee.model.checkpoint import read_torch
    from medisee.raylib import ensure_ray
    from medisee.storage import StorageSettings
    from medisee.train.evaluate import evaluate_rows, load_eval_rows, mean_mask_baseline
    from medisee.train.trainer import run_training
    from medisee.verify.calibrate import calibrate
    from medisee.verify.evaluate import collect_evidence, evaluate_verifier, split_by_image
    from medisee.verify.store import save_calibration

    root = Path(workdir).absolute()
    shards = str(root / "shards" / "phantom")
    run_name = f"demo-{int(time.time())}"
    cfg = load_config(
        "tiny",
        [
            "prepare.phantom_images=400",
            "prepare.val_fraction=0.15",
            f"run.name={run_name}",
            "trainer.max_steps=900",
            "trainer.eval_every=300",
            "trainer.checkpoint_every=300",
            f"run.storage_uri={root / 'runs'}",
            f"data.sources={{phantom: {shards}}}",
            *(overrides or []),
        ],
    )
    settings = StorageSettings.from_config(cfg.storage)
    ensure_ray()
    started = time.time()

    manifest = prepare("phantom", "-", shards, cfg.prepare, settings, progress=False)
    print(
        f"[demo] prepared {manifest['rows_written']} rows ({manifest['rows_by_split']}), "
        f"{manifest['rows_quarantined']} quarantined -> {shards}",
        flush=True,
    )

    eval_rows = load_eval_rows(shards, "val", settings, limit=cfg.trainer.eval_limit)
    train_rows = load_eval_rows(shards, "train", settings, limit=1500)
    untrained = build_model("tiny", seed=cfg.run.seed)
    before = evaluate_rows(untrained, eval_rows, reduce=False)
    baseline = mean_mask_baseline(train_rows, eval_rows)
    print(
        f"[demo] untrained dice {before['dice']:.3f}; mean-mask baseline dice {baseline['dice']:.3f}",
        flush=True,
    )

    result = run_training(cfg, register="medisee-demo", alias="candidate")
    trained = build_model("tiny", seed=cfg.run.seed, finetune=cfg.trainer.finetune)
    trained.load_trainable_state_dict(
        read_torch(result["checkpoint"], settings)["model"], source=result["checkpoint"]
    )
    after = evaluate_rows(trained, eval_rows, reduce=False)

    # MedVeriSeg on held-out phantoms: calibrate on half of the validation images, report on the rest
    # every false query of the validation split, and up to three true queries for each of them
    val_rows = load_eval_rows(shards, "val", settings, include_false=True)
    false_rows = [r for r in val_rows if r["query_kind"] == "false_query"]
    verifier_rows = (
        false_rows + [r for r in val_rows if r["query_kind"] != "false_query"][: 3 * len(false_rows)]
    )
    evidence, present, _ = collect_evidence(trained, verifier_rows)
    calibration_idx, held_out_idx = split_by_image(verifier_rows)
    verifier = calibrate([evidence[i] for i in calibration_idx], [present[i] for i in calibration_idx])
    verifier_report = evaluate_verifier(
        verifier, [evidence[i] for i in held_out_idx], [present[i] for i in held_out_idx]
    )
    save_calibration(cfg, settings, result["mlflow_run_id"], verifier, verifier_report)
    print(
        f"[demo] verifier on held-out phantoms: balanced accuracy {verifier_report['balanced_accuracy']:.3f} "
        f"({verifier_report['true_queries']} true / {verifier_report['false_queries']} false queries)"
    )

    print("[demo] held-out phantoms (validation split):")
    print(f"[demo]   {'':22s} {'dice':>6s} {'gIoU':>6s} {'cIoU':>6s} {'boxIoU':>7s} {'Acc@0.5':>8s}")
    for name, m in (("untrained", before), ("mean mask of class", baseline), ("trained", after)):
        print(
            f"[demo]   {name:22s} {m['dice']:6.3f} {m['giou']:6.3f} {m['ciou']:6.3f} {m['box_iou']:7.3f} {m['acc50']:8.3f}"
        )
    summary = {
        "dice_untrained": round(before["dice"], 4),
        "dice_mean_mask_baseline": round(baseline["dice"], 4),
        "dice_trained": round(after["dice"], 4),
        "giou_trained": round(after["giou"], 4),
        "ciou_trained": round(after["ciou"], 4),
        "box_iou_trained": round(after["box_iou"], 4),
        "acc50_trained": round(after["acc50"], 4),
        "verifier_balanced_accuracy": round(verifier_report["balanced_accuracy"], 4),
        "verifier_auroc_combined": round(verifier_report["auroc_combined"], 4),
        "verifier_auroc_strength": round(verifier_report["auroc_strength"], 4),
        "eval_targets": int(after["count"]),
        "train_steps": cfg.trainer.max_steps,
        "mlflow_run_id": result["mlflow_run_id"],
        "model_version": result.get("model_version"),
        "checkpoint": result["checkpoint"],
        "seconds": round(time.time() - started, 1),
    }
    import ray

    ray.shutdown()  # flush worker logs first, so that the JSON line really is the last line
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    import sys

    main(overrides=sys.argv[1:])
