"""Validation: predictions on held-out shard rows, scored with medisee.metrics."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from medisee import storage
from medisee.data.codec import mask_box, row_mask
from medisee.data.reader import shard_files
from medisee.infer.rows import predict_rows
from medisee.metrics import MetricSums, all_reduce


def load_eval_rows(
    uri: str,
    split: str,
    settings,
    limit: int | None = None,
    rank: int = 0,
    world: int = 1,
    include_false: bool = False,
) -> list[dict]:
    """Positive rows of a split (and false queries when asked), strided by rank so that every worker
    gets an equal, disjoint share."""
    rows: list[dict] = []
    index = 0
    for shard in shard_files(uri, split, settings):
        fs, path = storage.filesystem(shard, settings)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        for row in table.to_pylist():
            is_false = row["query_kind"] == "false_query"
            if row["query_kind"] == "image_only" or (is_false and not include_false):
                continue
            if not is_false and row["box"] is None:
                continue
            if limit is not None and index >= limit:
                return rows
            if index % world == rank:
                rows.append(row)
            index += 1
    return rows


def evaluate_rows(model, rows: list[dict], batch_size: int = 16, reduce: bool = True) -> dict[str, float]:
    """Segmentation and box metrics for positive rows, teacher-forced with the fixed answer for every
    query kind (as the reference evaluates). Box IoU uses the unclipped predicted box."""
    sums = MetricSums()
    for row, pred in zip(rows, predict_rows(model, rows, batch_size=batch_size), strict=True):
        sums.add(row["query_kind"], pred.mask, row_mask(row), list(pred.box_unclipped), list(row["box"]))
    if reduce:
        sums = all_reduce(sums)
    return sums.finalize()


def generate_report(model, rows: list[dict], batch_size: int = 16, max_new_tokens: int = 48) -> dict:
    """Generate mode: the share of answers that hold the candidate tokens, and the metrics on those."""
    from medisee.infer.predictor import Predictor

    predictor = Predictor(model, early_reject=False, mode="generate", max_new_tokens=max_new_tokens)
    preds = predict_rows(predictor, rows, batch_size=batch_size)
    sums = MetricSums()
    for row, pred in zip(rows, preds, strict=True):
        if pred.found:
            sums.add(row["query_kind"], pred.mask, row_mask(row), list(pred.box_unclipped), list(row["box"]))
    found = sum(p.found for p in preds)
    metrics = sums.finalize()
    return {"queries": len(preds), "with_tokens": found, "share_with_tokens": found / max(1, len(preds))} | {
        f"{k}_on_found": v for k, v in metrics.items() if "/" not in k
    }


def mean_mask_baseline(
    train_rows: list[dict], eval_rows: list[dict], size: int = 64, threshold: float = 0.5
) -> dict:
    """Predict, for each class, the mean training mask (in normalised image coordinates)."""
    from PIL import Image

    def norm(mask: np.ndarray) -> np.ndarray:
        return (
            np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR))
            / 255.0
        )

    totals: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for row in train_rows:
        name = row["class_name"]
        totals[name] = totals.get(name, 0) + norm(row_mask(row))
        counts[name] = counts.get(name, 0) + 1
    sums = MetricSums()
    for row in eval_rows:
        true = row_mask(row)
        h, w = true.shape
        mean = totals.get(row["class_name"])
        if mean is None:
            pred = np.zeros_like(true)
        else:
            mean = mean / counts[row["class_name"]]
            pred = (
                np.asarray(Image.fromarray((mean * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
                / 255
                >= threshold
            )
        box = mask_box(pred) if pred.any() else [0.0, 0.0, 0.0, 0.0]
        sums.add(row["query_kind"], pred, true, box, list(row["box"]))
    return sums.finalize()
