"""Real images, real figures: medisee-lite (SmolLM2 + LiteMedSAM) trained on a real CT volume, scored on
the CT slices of other patients, beside LiteMedSAM alone and the tiny preset trained the same way.

Data (../shared/data, Apache-2.0): training on 25 of the 30 axial slices of TotalSegmentator's
`example_ct_sm.nii.gz` with its label map (every slice x class pair a class-name query; the label map
is TotalSegmentator's model output, so these are reference masks, not manual ground truth; every 6th
slice held out and scored in-domain); scoring on
the 30 CT masks of `sam_med2d_demo` (4 slices of other patients) with class queries, and, for the
verifier, on false queries: TotalSegmentator classes absent from the slice (8 per slice by default).

Side by side in one run, all through the platform's own code (prepare -> Ray Train recipe -> registered
artifact -> Predictor; the box-prompt rows through DecoderStage.segment_boxes):
  - trained medisee-lite: Dice / gIoU / box IoU, and its own mask decoder prompted with the
    ground-truth boxes (is the decoder still LiteMedSAM's after training?);
  - LiteMedSAM prompted with each mask's ground-truth box (an upper bound for the decoder);
  - LiteMedSAM prompted with the whole-image box (the baseline a box-free user would get);
  - the tiny preset trained on the same shards for the same wall-clock order of steps;
  - both trained models on the held-out slices of the training volume (in-domain);
  - MedVeriSeg's verifier on the trained lite model: calibrated on the training volume's true and
    false queries, reported on the scoring slices (AUROC of each signal, balanced accuracy).
JSON lines; the last is the headline:
  {"name": "lite_verifier_balanced_accuracy", ...}
  {"name": "lite_dice_margin_over_best_baseline", "value": ..., "unit": "dice", "target": 0.10}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HELD_OUT_EVERY = 6  # every 6th slice of the training volume is held out (5 of 30)


def log(message: str) -> None:
    print(f"[real_data] {message}", flush=True)


def emit(name: str, value, unit: str, target=None, **extra) -> None:
    print(json.dumps({"name": name, "value": value, "unit": unit, "target": target, **extra}), flush=True)


def prepare_shards(shared: Path, root: Path, settings) -> tuple[str, str]:
    """Training shards from the TotalSegmentator CT volume; scoring shards from sam_med2d_demo."""
    from medisee.config import PrepareConfig
    from medisee.data.prepare import prepare

    ts = shared / "totalsegmentator_ref"
    index_dir = root / "ts-index"
    index_dir.mkdir(parents=True, exist_ok=True)
    volume = {
        "image": str(ts / "example_ct_sm.nii.gz"),
        "label": str(ts / "example_seg.nii.gz"),
        "modality": "ct",
        "classes": f"{ts / 'class_map_total_and_total_mr.json'}#total",
    }
    (index_dir / "index.json").write_text(json.dumps({"volumes": [volume]}))
    train_shards, score_shards = str(root / "shards" / "ts"), str(root / "shards" / "demo")
    written = prepare("nifti", str(index_dir), train_shards, PrepareConfig(val_fraction=0.1), settings)
    log(f"training shards: {written['rows_written']} rows {written['rows_by_split']}")
    train_shards = hold_out_slices(train_shards, root / "shards" / "ts-split", HELD_OUT_EVERY)
    written = prepare(
        "sam-med2d-demo", str(shared / "sam_med2d_demo"), score_shards, PrepareConfig(), settings
    )
    log(f"scoring shards: {written['rows_written']} rows {written['rows_by_split']}")
    return train_shards, score_shards


def hold_out_slices(shards: str, out: Path, every: int) -> str:
    """The volume's shards split by slice: every `every`-th slice to "val" (held out from training,
    scored in-domain), the others to "train"; plain split folders (no manifest), as the reader lists them."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(p) for p in sorted(Path(shards, "train").glob("*.parquet")))
    slices = sorted(set(table.column("image_id").to_pylist()))
    held = pa.array(slices[::every])
    for split, rows in (("val", pc.is_in(table.column("image_id"), held)),
                        ("train", pc.invert(pc.is_in(table.column("image_id"), held)))):  # fmt: skip
        (out / split).mkdir(parents=True, exist_ok=True)
        part = (
            table.filter(rows)
            .drop(["split"])
            .append_column("split", pa.array([split] * int(pc.sum(rows).as_py()), pa.string()))
        )
        pq.write_table(part, out / split / "part-00000.parquet")
    log(f"held out {len(held)} of {len(slices)} slices ({slices[::every]}) for in-domain scoring")
    return str(out)


def all_rows(shards: str, settings, include_false: bool) -> list[dict]:
    from medisee.train.evaluate import load_eval_rows

    rows = []
    for split in ("train", "val", "test"):
        rows += load_eval_rows(shards, split, settings, include_false=include_false)
    return rows


def train(preset: str, shards: str, root: Path, steps: int, name: str, overrides: tuple[str, ...] = ()):
    """Train `preset` through the platform's recipe and load the registered artifact."""
    from medisee.artifact.model_dir import load_model_dir
    from medisee.config import load_config
    from medisee.storage import StorageSettings
    from medisee.train.trainer import run_training

    cfg = load_config(
        preset,
        [
            f"run.name={name}-{int(time.time())}",
            f"run.storage_uri={root / 'runs'}",
            f"data.sources={{nifti: {shards}}}",
            f"trainer.max_steps={steps}",
            f"trainer.eval_every={steps}",
            f"trainer.checkpoint_every={steps}",
            "trainer.eval_limit=40",
            f"trainer.warmup_steps={max(1, steps // 10)}",
            *overrides,
        ],
    )
    started = time.time()
    run_training(cfg, register=name, alias="benchmark")
    loaded = load_model_dir(
        f"models:/{name}@benchmark",
        settings=StorageSettings.from_config(cfg.storage),
        tracking_uri=cfg.tracking.uri,
    )
    log(f"{preset}: {steps} steps trained and registered in {time.time() - started:.0f} s")
    return loaded.model


def model_metrics(model, rows: list[dict]) -> dict[str, float]:
    from medisee.train.evaluate import evaluate_rows

    return evaluate_rows(model, rows)


def box_prompt_metrics(rows: list[dict], whole_image: bool, model=None) -> dict[str, float]:
    """A mask decoder alone (LiteMedSAM's, or `model`'s), each row's image prompted with its mask's
    box or the whole image."""
    from medisee.data.codec import decode_image, row_mask
    from medisee.infer.decoder_stage import DecoderStage
    from medisee.metrics import MetricSums
    from medisee.model.build import build_box_prompt_model

    stage = DecoderStage(model if model is not None else build_box_prompt_model())
    sums = MetricSums()
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    for image_rows in by_image.values():  # each image encoded once for all its boxes
        image = decode_image(image_rows[0]["image_png"])
        truths = [row_mask(row) for row in image_rows]
        true_boxes = [inclusive_box(t) for t in truths]
        h, w = truths[0].shape
        boxes = [[0, 0, w - 1, h - 1] if whole_image else b for b in true_boxes]
        decoded = stage.segment_boxes([image], [0] * len(boxes), np.array(boxes, dtype=np.float64))
        for row, d, truth, true_box in zip(image_rows, decoded, truths, true_boxes, strict=True):
            sums.add(row["query_kind"], d.mask, truth, list(d.box), true_box)
    return sums.finalize()


def inclusive_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def absent_class_queries(rows: list[dict], shared: Path, per_image: int) -> list[dict]:
    """False queries for the verifier: per scored image, TotalSegmentator classes absent from it,
    asked with the evaluation referring query (spread over the class list, the same for every run)."""
    from medisee.data.prompts import EVAL_REFERRING_QUERY

    class_map = json.loads(
        (shared / "totalsegmentator_ref" / "class_map_total_and_total_mr.json").read_text()
    )
    names = sorted({name.replace("_", " ") for name in class_map["total"].values()})
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    false_rows = []
    for image_id, image_rows in sorted(by_image.items()):
        present = {r["class_name"] for r in image_rows}
        absent = [n for n in names if n not in present]
        step = max(1, len(absent) // per_image)
        offset = sum(map(ord, image_id)) % step
        for name in absent[offset::step][:per_image]:
            false_rows.append(
                {**image_rows[0], "query": EVAL_REFERRING_QUERY.format(name=name), "class_name": name,
                 "query_kind": "false_query", "mask_png": None, "mask_rle": None, "box": None}
            )  # fmt: skip
    return false_rows


def balanced(rows: list[dict], limit: int) -> list[dict]:
    """Up to `limit` false queries and as many true ones, spread over the images."""
    false = [r for r in rows if r["query_kind"] == "false_query"][:limit]
    true = [r for r in rows if r["query_kind"] != "false_query"]
    step = max(1, len(true) // max(1, len(false)))
    return false + true[::step][: len(false)]


def verifier_report(model, calibration_rows: list[dict], scored_rows: list[dict]) -> dict:
    from medisee.infer.rows import collect_evidence
    from medisee.verify.calibrate import calibrate
    from medisee.verify.evaluate import evaluate_verifier

    evidence, present, _ = collect_evidence(model, calibration_rows)
    verifier = calibrate(evidence, present)
    evidence, present, _ = collect_evidence(model, scored_rows)
    return evaluate_verifier(verifier, evidence, present)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--workdir", default=str(REPO / ".medisee" / "bench-real-data"))
    parser.add_argument("--lite-steps", type=int, default=150)
    parser.add_argument("--tiny-steps", type=int, default=600)
    parser.add_argument("--calibration-rows", type=int, default=60, help="false queries (and as many true)")
    parser.add_argument(
        "--false-per-image", type=int, default=8, help="absent-class queries per scored image"
    )
    parser.add_argument("--lite-set", nargs="*", default=[], help="config overrides for the lite run, a.b=c")
    args = parser.parse_args()

    from medisee.console import quiet_logs
    from medisee.raylib import apply_env_defaults, ensure_ray
    from medisee.storage import StorageSettings
    from medisee.train.evaluate import load_eval_rows

    shared, root = Path(args.shared), Path(args.workdir).absolute()
    if not (shared / "totalsegmentator_ref").is_dir() or not (shared / "sam_med2d_demo").is_dir():
        raise SystemExit(f"needs totalsegmentator_ref/ and sam_med2d_demo/ under {shared}")
    apply_env_defaults()
    quiet_logs()
    ensure_ray()
    started = time.time()
    settings = StorageSettings()
    train_shards, score_shards = prepare_shards(shared, root, settings)
    scored = all_rows(score_shards, settings, include_false=False)
    scored_with_false = scored + absent_class_queries(scored, shared, args.false_per_image)
    calibration = balanced(all_rows(train_shards, settings, include_false=True), args.calibration_rows)
    held_out = load_eval_rows(train_shards, "val", settings)  # slices of the training volume not trained on

    figures = {
        "litemedsam_gt_box": box_prompt_metrics(scored, whole_image=False),
        "litemedsam_whole_image_box": box_prompt_metrics(scored, whole_image=True),
    }
    lite = train("medisee-lite", train_shards, root, args.lite_steps, "real-data-lite", tuple(args.lite_set))
    figures["lite_trained"] = model_metrics(lite, scored)
    held = {"lite_trained": model_metrics(lite, held_out)}
    figures["lite_trained_decoder_gt_box"] = box_prompt_metrics(scored, whole_image=False, model=lite)
    verifier = verifier_report(lite, calibration, scored_with_false)
    tiny = train("tiny", train_shards, root, args.tiny_steps, "real-data-tiny")
    figures["tiny_trained"] = model_metrics(tiny, scored)
    held["tiny_trained"] = model_metrics(tiny, held_out)

    log(
        f"{len(scored)} scored masks; {verifier['false_queries']} false queries; {time.time() - started:.0f} s"
    )
    print("| model | Dice | gIoU | box IoU |\n|---|---|---|---|")
    for name, m in figures.items():
        print(f"| {name} | {m['dice']:.3f} | {m['giou']:.3f} | {m['box_iou']:.3f} |")
    for name, m in held.items():
        print(
            f"| {name}, held-out slices of the training volume | {m['dice']:.3f} | {m['giou']:.3f} | {m['box_iou']:.3f} |"
        )
    named = [(f"{n}_held_out_slices_dice", m, {"rows": len(held_out)}) for n, m in held.items()]
    named += [(f"{n}_dice", m, {}) for n, m in figures.items()]
    for name, m, extra in named:
        emit(
            name,
            round(m["dice"], 4),
            "dice",
            giou=round(m["giou"], 4),
            box_iou=round(m["box_iou"], 4),
            **extra,
        )
    for key in ("auroc_strength", "auroc_compactness", "auroc_purity", "auroc_combined"):
        if key in verifier:
            emit(f"lite_verifier_{key}", round(verifier[key], 4), "auroc")
    decoder_signals = {k: round(v, 4) for k, v in verifier.items() if k.startswith("auroc_")}
    emit(
        "lite_verifier_balanced_accuracy",
        round(verifier["balanced_accuracy"], 4),
        "balanced_accuracy",
        0.80,
        true_queries=verifier["true_queries"],
        false_queries=verifier["false_queries"],
        aurocs=decoder_signals,
    )
    best_baseline = max(figures["litemedsam_whole_image_box"]["dice"], figures["tiny_trained"]["dice"])
    emit(
        "lite_dice_margin_over_best_baseline",
        round(figures["lite_trained"]["dice"] - best_baseline, 4),
        "dice",
        0.10,
        lite_steps=args.lite_steps,
        lite_set=args.lite_set,
        tiny_steps=args.tiny_steps,
        seconds=round(time.time() - started, 1),
    )


if __name__ == "__main__":
    main()
