"""`medisee evaluate`: the paper's tables on a labelled split, scored by the batch pipeline.

1. The model must load completely (strict key check) and answer its golden pair as stored.
2. The split goes through `score_archive` (teacher-forced, early rejection off, so every query
   keeps its mask and the verifier's verdict is scored separately).
3. Each result partition is joined with its shard's ground truth, one shard at a time:
   Dice / gIoU / cIoU / box IoU / Acc@0.5 by query kind and per class (medisee.metrics), the
   verifier's rejection of false queries, and a presence-aware table in which a rejected false
   query is correct and a mask for it is a false positive.
4. A Markdown report with overlays of the worst cases, and everything logged to MLflow against
   the model version.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medisee import storage
from medisee.data.codec import rle_to_mask, row_mask
from medisee.metrics import MetricSums, mask_dice, mask_iou, rejection_metrics

KINDS = ("referring", "reasoning_short", "reasoning_long")


@dataclass
class Accumulator:
    by_kind: MetricSums = field(default_factory=MetricSums)
    by_class: dict[str, MetricSums] = field(default_factory=dict)
    rejection: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
    presence: dict[str, float] = field(default_factory=lambda: {"dice_sum": 0.0, "iou_sum": 0.0, "count": 0})
    presence_counts: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fn": 0, "fp": 0, "tn": 0})
    not_found: int = 0
    worst: list = field(default_factory=list)  # heap of (-dice, record_id, case)

    def add(self, truth: dict, result: dict, keep_worst: int) -> None:
        is_false = truth["query_kind"] == "false_query"
        rejected = result["verdict"] == "absent"
        pred = rle_to_mask(result["mask_rle"]) if result["mask_rle"] else None
        self.not_found += not result["found"]
        key = ("tp" if rejected else "fn") if is_false else ("fp" if rejected else "tn")
        self.rejection[key] += 1
        true_mask = None if is_false else row_mask(truth)
        self._presence(pred if not rejected else None, true_mask, is_false)
        if is_false:
            return
        pred_mask = pred if pred is not None else np.zeros_like(true_mask)
        box = result["box_unclipped"] or [0.0, 0.0, 0.0, 0.0]
        self.by_kind.add(truth["query_kind"], pred_mask, true_mask, list(box), list(truth["box"]))
        sums = self.by_class.setdefault(truth["class_name"], MetricSums(kinds=(truth["class_name"],)))
        sums.add(truth["class_name"], pred_mask, true_mask, list(box), list(truth["box"]))
        dice = mask_dice(pred_mask, true_mask)
        case = (-dice, truth["record_id"], {"truth": truth, "result": result, "dice": dice})
        if len(self.worst) < keep_worst:
            heapq.heappush(self.worst, case)
        elif keep_worst and -dice > self.worst[0][0]:
            heapq.heapreplace(self.worst, case)

    def _presence(self, shown: np.ndarray | None, true_mask: np.ndarray | None, is_false: bool) -> None:
        shown_any = shown is not None and shown.any()
        if is_false:
            score = 0.0 if shown_any else 1.0
            self.presence_counts["fp" if shown_any else "tn"] += 1
            dice = iou = score
        else:
            self.presence_counts["tp" if shown_any else "fn"] += 1
            shown = shown if shown is not None else np.zeros_like(true_mask)
            dice, iou = mask_dice(shown, true_mask), mask_iou(shown, true_mask)
        self.presence["dice_sum"] += dice
        self.presence["iou_sum"] += iou
        self.presence["count"] += 1

    def tables(self) -> dict:
        per_class = {name: s.finalize() for name, s in sorted(self.by_class.items())}
        return {
            "segmentation": self.by_kind.finalize(),
            "per_class": {
                name: {k.split("/")[0]: v for k, v in m.items() if "/" not in k}
                for name, m in per_class.items()
            },
            "rejection": rejection_metrics(self.rejection),
            "presence_aware": {
                "dice": self.presence["dice_sum"] / max(self.presence["count"], 1),
                "iou": self.presence["iou_sum"] / max(self.presence["count"], 1),
                **{k: int(v) for k, v in self.presence_counts.items()},
                "queries": int(self.presence["count"]),
            },
            "answers_without_tokens": self.not_found,
        }


def split_digest(data_uri: str, split: str | None, settings) -> str:
    """The split's identity: its shard list from the prepare manifest (paths, rows, sizes)."""
    uri = storage.join(data_uri, "manifest.json")
    if storage.exists(uri, settings):
        shards = json.loads(storage.read_text(uri, settings))["shards"]
        chosen = sorted((s for s in shards if split is None or s["split"] == split), key=lambda s: s["path"])
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()
    from medisee.data.reader import shard_files

    listing = sorted((u, storage.filesystem(u, settings)[0].get_file_info(storage.filesystem(u, settings)[1]).size)
                     for u in shard_files(data_uri, split, settings))  # fmt: skip
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def read_parquet(uri: str, settings, columns=None) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri, settings)), columns=columns).to_pylist()


def accumulate(scored_output: str, partitions: list[dict], settings, keep_worst: int) -> Accumulator:
    acc = Accumulator()
    for partition in partitions:
        results_uri = storage.join(scored_output, "results", f"{partition['key']}.parquet")
        if not storage.exists(results_uri, settings):
            continue
        results = {r["record_id"]: r for r in read_parquet(results_uri, settings)}
        for truth in read_parquet(partition["uri"], settings):
            result = results.get(truth["record_id"])
            if result is None or truth["query_kind"] == "image_only":
                continue
            if truth["query_kind"] != "false_query" and truth["box"] is None:
                continue
            acc.add(truth, result, keep_worst)
    return acc


# ----- the command -------------------------------------------------------------------------------
def evaluate_model(
    cfg, settings, data_uri: str, split: str, output: str, keep_worst: int = 8, log=print
) -> dict:
    """cfg.scoring.model is the model; returns the report dict (also written under `output`)."""
    from medisee.artifact.golden import check_golden
    from medisee.artifact.model_dir import load_predictor
    from medisee.scoring.pipeline import score_archive
    from medisee.scoring.plan import plan_partitions

    predictor = load_predictor(cfg.scoring.model, settings=settings, tracking_uri=cfg.tracking.uri)
    golden = check_golden(predictor, predictor.artifact.local_dir)
    log(
        f"{cfg.scoring.model}: loaded completely (strict), golden pair reproduced (mask IoU {golden['mask_iou']:.4f})"
    )
    scoring_cfg = cfg.model_copy(deep=True)
    for key, value in {
        "input": data_uri, "output": storage.join(output, "predictions"), "split": split,
        "queries": "records", "early_reject": False,
    }.items():  # fmt: skip
        setattr(scoring_cfg.scoring, key, value)
    summary = score_archive(scoring_cfg, settings, log=log)
    partitions = plan_partitions(data_uri, settings, split=split)
    acc = accumulate(scoring_cfg.scoring.output, partitions, settings, keep_worst)
    from medisee.artifact.model_dir import describe_model

    model = describe_model(cfg.scoring.model, settings=settings, tracking_uri=cfg.tracking.uri)
    report = {
        "model": {k: model[k] for k in ("ref", "name", "version", "sha256", "run_id")},
        "data": data_uri,
        "split": split,
        "split_sha256": split_digest(data_uri, split, settings),
        "mode": cfg.scoring.mode,
        "golden": golden,
        "scoring": {k: summary[k] for k in ("inputs", "results", "errors", "reconciled", "error_reasons")},
        **acc.tables(),
    }
    overlays = worst_case_overlays(acc, output, settings)
    markdown = render_markdown(report, overlays)
    storage.write_bytes(storage.join(output, "report.md"), markdown.encode(), settings)
    storage.write_bytes(
        storage.join(output, "metrics.json"), json.dumps(report, indent=2, default=float).encode(), settings
    )
    report["mlflow_run_id"] = log_to_mlflow(cfg, settings, report, markdown, output)
    return report


def worst_case_overlays(acc: Accumulator, output: str, settings) -> list[tuple[str, str, float]]:
    """(file, record_id, dice) of the worst positive queries, image | truth | prediction."""
    from PIL import Image

    from medisee.data.codec import decode_image
    from medisee.scoring.plan import unique_name

    out = []
    for _, record_id, case in sorted(acc.worst, key=lambda c: -c[0]):
        image = decode_image(case["truth"]["image_png"])
        truth = row_mask(case["truth"])
        pred = rle_to_mask(case["result"]["mask_rle"]) if case["result"]["mask_rle"] else np.zeros_like(truth)
        panels = [image, tint(image, truth, (60, 200, 60)), tint(image, pred, (230, 60, 60))]
        buffer = io.BytesIO()
        Image.fromarray(np.concatenate(panels, axis=1)).save(buffer, format="PNG")
        name = f"worst/{unique_name(record_id)}.png"
        storage.write_bytes(storage.join(output, name), buffer.getvalue(), settings)
        out.append((name, record_id, case["dice"]))
    return out


def tint(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def render_markdown(report: dict, overlays: list[tuple[str, str, float]]) -> str:
    m, seg = report["model"], report["segmentation"]
    lines = [
        f"# Evaluation of {m['name']} {('version ' + m['version']) if m['version'] else ''}".rstrip(),
        "",
        f"- model: `{m['ref']}`, weights sha256 `{m['sha256'][:16]}…`",
        f"- data: `{report['data']}`, split `{report['split']}` (manifest sha256 `{report['split_sha256'][:16]}…`)",
        f"- mode: {report['mode']} (every query kind with the fixed answer, as the reference evaluates)",
        f"- golden pair reproduced (mask IoU {report['golden']['mask_iou']:.4f}); scored {report['scoring']['results']} "
        f"queries, {report['scoring']['errors']} errors; answers without [SEG]/[BBOX]: {report['answers_without_tokens']}",
        "",
        "## Segmentation and boxes by query kind",
        "",
        "| kind | queries | Dice | gIoU | cIoU | box IoU | Acc@0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in (*KINDS, "all"):
        suffix = "" if kind == "all" else f"/{kind}"
        if f"count{suffix}" in seg:
            lines.append(metric_row(kind, seg, suffix))
    lines += [
        "",
        "## Per class",
        "",
        "| class | queries | Dice | gIoU | cIoU | box IoU | Acc@0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [metric_row(name, metrics, "") for name, metrics in report["per_class"].items()]
    r, p = report["rejection"], report["presence_aware"]
    lines += [
        "", "## Verifier: rejection of false queries", "",
        "| false queries | true queries | precision | recall | F1 | accuracy | balanced accuracy |",
        "|---|---|---|---|---|---|---|",
        f"| {r['false_queries']} | {r['true_queries']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} "
        f"| {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} |",
        "", "## Presence-aware (a rejected false query is correct; a mask for it is a false positive)", "",
        "| queries | Dice | IoU | true query, mask shown | true query, rejected | false query, mask shown | false query, rejected |",
        "|---|---|---|---|---|---|---|",
        f"| {p['queries']} | {p['dice']:.3f} | {p['iou']:.3f} | {p['tp']} | {p['fn']} | {p['fp']} | {p['tn']} |",
        "", "## Worst cases (image | ground truth | prediction)", "",
    ]  # fmt: skip
    lines += [f"- `{rid}` Dice {dice:.3f}\n\n  ![{rid}]({name})" for name, rid, dice in overlays]
    return "\n".join(lines) + "\n"


def metric_row(name: str, m: dict, suffix: str) -> str:
    return (
        f"| {name} | {int(m[f'count{suffix}'])} | {m[f'dice{suffix}']:.3f} | {m[f'giou{suffix}']:.3f} | "
        f"{m[f'ciou{suffix}']:.3f} | {m[f'box_iou{suffix}']:.3f} | {m[f'acc50{suffix}']:.3f} |"
    )


def log_to_mlflow(cfg, settings, report: dict, markdown: str, output: str) -> str:
    """A run in the experiment with the metrics and the report, tagged with (and tagging) the model version."""
    from medisee import tracking

    client = tracking.configure(cfg.tracking, settings)
    experiment = tracking.get_or_create_experiment(
        client, cfg.tracking.experiment, tracking.resolve_artifact_location(cfg.tracking)
    )
    m = report["model"]
    tags = {"medisee.kind": "evaluation", "model_ref": m["ref"], "model_sha256": m["sha256"], "split": report["split"],
            "split_sha256": report["split_sha256"], "model_name": m["name"], "model_version": m["version"]}  # fmt: skip
    run = client.create_run(
        experiment, run_name=f"evaluate-{m['name']}-{m['version'] or 'local'}-{report['split']}", tags=tags
    )
    run_id = run.info.run_id
    metrics = flat_metrics(report)
    tracking.log_metrics(client, run_id, metrics, step=0)
    client.log_text(run_id, markdown, "evaluation/report.md")
    client.log_text(run_id, json.dumps(report, indent=2, default=float), "evaluation/metrics.json")
    if not storage.is_s3(output) and (Path(output) / "worst").is_dir():
        client.log_artifacts(run_id, str(Path(output) / "worst"), "evaluation/worst")
    if m["version"]:
        for key in ("dice", "giou", "ciou", "box_iou", "acc50"):
            if f"segmentation/{key}" in metrics:
                client.set_model_version_tag(
                    m["name"],
                    m["version"],
                    f"eval.{report['split']}.{key}",
                    f"{metrics[f'segmentation/{key}']:.4f}",
                )
        client.set_model_version_tag(m["name"], m["version"], f"eval.{report['split']}.run_id", run_id)
    tracking.end_run(client, run_id)
    return run_id


def flat_metrics(report: dict) -> dict[str, float]:
    out = {f"segmentation/{k}": v for k, v in report["segmentation"].items()}
    out |= {f"rejection/{k}": float(v) for k, v in report["rejection"].items()}
    out |= {f"presence/{k}": float(v) for k, v in report["presence_aware"].items()}
    out |= {f"class/{c}/{k}": v for c, m in report["per_class"].items() for k, v in m.items()}
    return {k: v for k, v in out.items() if v == v}  # NaN (e.g. no false query in the split) is not logged
