"""`make demo`: the platform's main job on embedded defaults, on data it generates itself.

prepare (phantom shards, Ray Data) -> train (tiny preset, or `--preset lite`: medisee-lite on real
weights; Ray Train workers, MLflow, registered as
`medisee-demo@candidate`) -> evaluation of the registered model on held-out phantoms (untrained model
and "mean mask of the class" baseline beside it) -> verifier calibration and rejection benchmark on
phantoms of another seed -> the registered model answers a query in a fresh process.
The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

MODEL_NAME, ALIAS = "medisee-demo", "candidate"


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


# The demo's presets: the YAML preset it starts from and what the demo changes in it.
DEMO_PRESETS = {
    "tiny": (
        "tiny",
        ["prepare.phantom_images=400", "trainer.max_steps=1200", "trainer.eval_every=400",
         "trainer.checkpoint_every=400"],
    ),
    # real weights (SmolLM2 + LiteMedSAM): phantoms at LiteMedSAM's 256 px; a step costs ~30x tiny's
    "lite": (
        "medisee-lite",
        ["prepare.phantom_images=200", "prepare.phantom_size=256", "trainer.max_steps=150",
         "trainer.eval_every=150", "trainer.checkpoint_every=150", "trainer.eval_limit=60"],
    ),
}  # fmt: skip
# phantoms of another seed for the verifier benchmark: medisee-lite's image encoder is ~40x tiny's
VERIFIER_IMAGES = {"tiny": 150, "lite": 40}


def demo_config(root: Path, overrides: list[str], preset: str = "tiny"):
    from medisee.config import load_config

    if preset not in DEMO_PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(DEMO_PRESETS)}, not {preset!r}")
    base, changes = DEMO_PRESETS[preset]
    shards = root / "shards" / "phantom"
    return load_config(
        base,
        [
            *changes,
            "prepare.val_fraction=0.15",
            f"run.name=demo-{preset}-{int(time.time())}",
            f"run.storage_uri={root / 'runs'}",
            f"data.sources={{phantom: {shards}}}",
            *overrides,
        ],
    )


def prepare_data(cfg, root: Path, settings, verifier_images: int = 150) -> tuple[str, str]:
    """Training shards, and verifier shards from another seed (every image held out, two false queries each)."""
    from medisee.data.prepare import prepare

    shards = cfg.data.sources["phantom"]
    manifest = prepare("phantom", "-", shards, cfg.prepare, settings)
    log(
        f"prepared {manifest['rows_written']} rows ({manifest['rows_by_split']}), "
        f"{manifest['rows_quarantined']} quarantined -> {shards}"
    )
    verifier_shards = str(root / "shards" / "verifier")
    verifier_prepare = cfg.prepare.model_copy(
        update={
            "seed": cfg.prepare.seed + 1,
            "phantom_images": verifier_images,
            "val_fraction": 0.999,
            "false_queries_per_image": 2,
        }
    )
    manifest = prepare("phantom", "-", verifier_shards, verifier_prepare, settings)
    log(
        f"prepared {manifest['rows_written']} verifier rows (seed {verifier_prepare.seed}) -> {verifier_shards}"
    )
    return shards, verifier_shards


def verifier_benchmark(model, rows: list[dict]) -> tuple[object, dict]:
    """Calibrate on half of the images, report on the other half."""
    from medisee.infer.rows import collect_evidence
    from medisee.verify.calibrate import calibrate
    from medisee.verify.evaluate import evaluate_verifier, split_by_image

    false_rows = [r for r in rows if r["query_kind"] == "false_query"]
    rows = false_rows + [r for r in rows if r["query_kind"] != "false_query"][: 2 * len(false_rows)]
    evidence, present, _ = collect_evidence(model, rows)
    calibration_idx, held_out_idx = split_by_image(rows)
    verifier = calibrate([evidence[i] for i in calibration_idx], [present[i] for i in calibration_idx])
    report = evaluate_verifier(
        verifier, [evidence[i] for i in held_out_idx], [present[i] for i in held_out_idx]
    )
    return verifier, report


def answer_in_fresh_process(model_uri: str, tracking_uri: str, workdir: Path) -> dict:
    """`medisee predict` in a new Python process: the registered model loads from MLflow alone."""
    from PIL import Image

    from medisee.data import phantom

    image, masks = phantom.generate(seed=99, index=0, size=128)
    path = workdir / "query-image.png"
    Image.fromarray(image).save(path)
    organ = sorted(masks)[0]
    cmd = [
        sys.executable, "-m", "medisee.cli", "predict", "--model", model_uri, "--image", str(path),
        "--query", f"Can you segment and locate the {organ.replace('_', ' ')} in this image?",
        f"tracking.uri={tracking_uri}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[tuple[str, dict]]) -> None:
    log("held-out phantoms (validation split, every query teacher-forced with the fixed answer):")
    log(f"  {'':22s} {'dice':>6s} {'gIoU':>6s} {'cIoU':>6s} {'boxIoU':>7s} {'Acc@0.5':>8s}")
    for name, m in rows:
        log(
            f"  {name:22s} {m['dice']:6.3f} {m['giou']:6.3f} {m['ciou']:6.3f} {m['box_iou']:7.3f} {m['acc50']:8.3f}"
        )


def main(workdir: str = ".medisee/demo", overrides: list[str] | None = None, preset: str = "tiny") -> dict:
    from medisee.console import quiet_logs
    from medisee.raylib import apply_env_defaults, ensure_ray

    apply_env_defaults()
    quiet_logs()
    from medisee.artifact.calibration import save_calibration
    from medisee.artifact.model_dir import load_model_dir
    from medisee.model.build import build_from_config
    from medisee.storage import StorageSettings
    from medisee.train.evaluate import evaluate_rows, generate_report, load_eval_rows, mean_mask_baseline
    from medisee.train.trainer import run_training

    root = Path(workdir).absolute()
    cfg = demo_config(root, overrides or [], preset)
    settings = StorageSettings.from_config(cfg.storage)
    ensure_ray()
    started = time.time()
    shards, verifier_shards = prepare_data(cfg, root, settings, VERIFIER_IMAGES[preset])

    eval_rows = load_eval_rows(shards, "val", settings, limit=cfg.trainer.eval_limit)
    before = evaluate_rows(build_from_config(cfg), eval_rows, reduce=False)
    baseline = mean_mask_baseline(load_eval_rows(shards, "train", settings, limit=1500), eval_rows)
    log(f"untrained dice {before['dice']:.3f}; mean-mask baseline dice {baseline['dice']:.3f}")

    result = run_training(cfg, register=MODEL_NAME, alias=ALIAS)
    model_uri = f"models:/{MODEL_NAME}@{ALIAS}"
    trained = load_model_dir(model_uri, settings=settings, tracking_uri=cfg.tracking.uri)
    log(f"loaded {model_uri} (version {result['model_version']}) from {trained.local_dir}")
    after = evaluate_rows(trained.model, eval_rows, reduce=False)
    reasoning = [r for r in eval_rows if r["query_kind"].startswith("reasoning")]
    generated = generate_report(trained.model, reasoning)
    log(
        f"generate mode on {generated['queries']} reasoning queries: {generated['share_with_tokens']:.0%} "
        f"answers hold [SEG] and [BBOX]; dice on those {generated.get('dice_on_found', float('nan')):.3f}"
    )

    verifier_rows = load_eval_rows(verifier_shards, "val", settings, include_false=True)
    verifier, report = verifier_benchmark(trained.model, verifier_rows)
    save_calibration(cfg, settings, result["mlflow_run_id"], verifier, report)
    log(
        f"verifier on held-out phantoms: balanced accuracy {report['balanced_accuracy']:.3f} "
        f"({report['true_queries']} true / {report['false_queries']} false queries)"
    )
    answer = answer_in_fresh_process(model_uri, cfg.tracking.uri, root)
    log(
        f"fresh process, {model_uri}: {answer['query']!r} -> {answer['answer']!r}, verdict {answer['verdict']} "
        f"({answer['decided_by']}), box {[round(v, 1) for v in answer['box']] if answer['box'] else None}"
    )
    print_table([("untrained", before), ("mean mask of class", baseline), ("trained", after)])
    summary = {
        "dice_untrained": round(before["dice"], 4),
        "dice_mean_mask_baseline": round(baseline["dice"], 4),
        "dice_trained": round(after["dice"], 4),
        "giou_trained": round(after["giou"], 4),
        "ciou_trained": round(after["ciou"], 4),
        "box_iou_trained": round(after["box_iou"], 4),
        "acc50_trained": round(after["acc50"], 4),
        "generate_share_with_tokens": round(generated["share_with_tokens"], 4),
        "verifier_balanced_accuracy": round(report["balanced_accuracy"], 4),
        "verifier_auroc_combined": round(report["auroc_combined"], 4),
        "verifier_false_queries": report["false_queries"],
        "eval_targets": int(after["count"]),
        "train_steps": cfg.trainer.max_steps,
        "mlflow_run_id": result["mlflow_run_id"],
        "model_uri": model_uri,
        "model_version": result.get("model_version"),
        "seconds": round(time.time() - started, 1),
    }
    import ray

    ray.shutdown()  # flush worker logs first, so that the JSON line really is the last line
    print(json.dumps(summary), flush=True)
    return summary


def parse_args(argv: list[str]) -> dict:
    """`[--preset tiny|lite] [--workdir DIR] [a.b=c ...]`"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medisee.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(DEMO_PRESETS))
    parser.add_argument("--workdir", default=None, help="default: .medisee/demo (tiny), .medisee/demo-lite")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.max_steps=200")
    args = parser.parse_args(argv)
    workdir = args.workdir or (".medisee/demo" if args.preset == "tiny" else f".medisee/demo-{args.preset}")
    return {"workdir": workdir, "overrides": args.overrides, "preset": args.preset}


if __name__ == "__main__":
    main(**parse_args(sys.argv[1:]))
