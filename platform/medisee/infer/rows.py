"""Predictions for prepared shard rows (evaluation and verifier calibration).

Rows of one image in a chunk share one encoding. The decoder runs for every query, whatever the
verifier says (early rejection off), so that metrics and calibration see every mask.
"""

from __future__ import annotations

import numpy as np

from medisee.data.codec import decode_image
from medisee.infer.predictor import Predictor
from medisee.infer.results import QueryResult
from medisee.verify.calibrate import Evidence
from medisee.verify.scores import score_maps


def predict_rows(
    model, rows: list[dict], mode: str = "teacher_forced", batch_size: int = 16
) -> list[QueryResult]:
    """One result per row, in order. `model` is a MediSee (or a Predictor to reuse its settings)."""
    predictor = model if isinstance(model, Predictor) else Predictor(model, early_reject=False)
    was_training = predictor.model.training
    predictor.model.eval()
    out: list[QueryResult] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        order: dict[str, int] = {}
        images, queries, slots = [], [], []
        for row in chunk:
            if row["image_id"] not in order:
                order[row["image_id"]] = len(images)
                images.append(decode_image(row["image_png"]))
                queries.append([])
            i = order[row["image_id"]]
            slots.append((i, len(queries[i])))
            queries[i].append(row["query"])
        results = predictor.predict_batch(images, queries, mode)
        out.extend(results[i][j] for i, j in slots)
    predictor.model.train(was_training)
    return out


def collect_evidence(
    model, rows: list[dict], batch_size: int = 16
) -> tuple[list[Evidence], list[bool], list]:
    """Run the model on true and false queries; return evidence, presence labels and predictions."""
    preds = predict_rows(model, rows, batch_size=batch_size)
    scores = score_maps(np.stack([p.similarity.reshape(-1) for p in preds])) if preds else []
    evidence = [
        Evidence(s, p.mask_score, p.iou_score, p.area_fraction) for s, p in zip(scores, preds, strict=True)
    ]
    present = [r["query_kind"] != "false_query" for r in rows]
    return evidence, present, preds
