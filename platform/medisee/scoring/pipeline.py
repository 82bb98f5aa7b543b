"""`medisee score`: score an archive on Ray Data, exactly once.

    plan (driver: list and group the inputs) -> decode (CPU tasks) -> MLLMStep (actor pool)
    -> screen_rows -> DecoderStep (actor pool) -> finish_rows -> PartitionWriter (1 actor)

Ray Data fuses screen_rows into the decoder actors and finish_rows into the writer. Only the two
model actors import torch (seconds per process on a small machine, most of a short job's start-up);
decode workers and the writer do not.

The driver only sees the plan and one small summary per finished partition.
"""

from __future__ import annotations

import json
import time

from medisee import storage
from medisee.config import MediSeeConfig
from medisee.scoring.decode import DecodeOptions, decode_batch
from medisee.scoring.plan import plan_digest, plan_partitions
from medisee.scoring.queries import QueryPlan, QuerySpecError, parse_query_spec
from medisee.scoring.reconcile import reconcile
from medisee.scoring.stages import DecoderStep, MLLMStep, ModelSpec, finish_rows, screen_rows
from medisee.scoring.via_serve import ServeStep
from medisee.scoring.writer import (
    PartitionWriter,
    WriterOptions,
    check_or_start_job,
    completed_partitions,
)
from medisee.storage import StorageSettings

# Options that change what is written: a rerun into the same output must keep them.
OUTPUT_OPTIONS = (
    "mode", "max_new_tokens", "early_reject", "mask_threshold", "images_per_partition", "split",
    "slice_axis", "resample_spacing", "keep_empty_slices", "max_file_bytes", "max_image_pixels",
    "max_dicom_bytes", "max_volume_bytes",
)  # fmt: skip


def job_identity(cfg: MediSeeConfig, model: dict, partitions: list[dict]) -> dict:
    sc = cfg.scoring
    return {
        "input": sc.input,
        "queries": sc.queries,
        "model_ref": model["ref"],
        "model_sha256": model["sha256"],
        "options": {k: getattr(sc, k) for k in OUTPUT_OPTIONS},
        "plan_sha256": plan_digest(partitions),
        "partitions": len(partitions),
    }


def check_job_names_the_model(cfg: MediSeeConfig, model: dict) -> None:
    """The model's facts (image sizes, tokens, template) come from its artifact. A job config that
    names a model section (`-c medisee-7b`, `model.preset=...`) must name the artifact's."""
    preset = model["manifest"]["preset"]
    if "model" in cfg.model_fields_set and cfg.model.preset != preset:
        raise QuerySpecError(
            f"model.preset={cfg.model.preset!r} contradicts the model {model['ref']}, a {preset!r} "
            f"artifact: leave out -c/--config (the artifact's own facts are used) or give -c {preset}"
        )


def score_archive(cfg: MediSeeConfig, settings: StorageSettings | None = None, log=print) -> dict:
    from medisee.artifact.model_dir import describe_model

    sc = cfg.scoring
    for key in ("input", "output") + (() if sc.via_serve else ("model",)):
        if not getattr(sc, key):
            raise QuerySpecError(f"scoring.{key} is required")
    started = time.time()
    queries = parse_query_spec(sc.queries, sc.input, settings)
    if sc.via_serve and queries.has_boxes():
        raise QuerySpecError(
            f"query manifest {sc.queries} has box prompts; the Serve application answers text queries "
            "only: score box prompts without --via-serve (the actor pools)"
        )
    partitions = plan_partitions(sc.input, settings, sc.images_per_partition, sc.split)
    if queries.kind == "records" and any(p["kind"] not in ("shard", "unreadable") for p in partitions):
        raise QuerySpecError(
            "scoring.queries=records takes the queries from parquet shards; this input has images, "
            "DICOM or NIfTI files: give a .jsonl manifest or a template"
        )
    if sc.via_serve:
        from medisee.raylib import ensure_ray
        from medisee.scoring.via_serve import served_version

        ensure_ray()
        sc.model = sc.model or served_version(sc.via_serve)
    model = describe_model(sc.model, settings=settings, tracking_uri=cfg.tracking.uri)
    check_job_names_the_model(cfg, model)
    resumed = check_or_start_job(sc.output, job_identity(cfg, model, partitions), settings)
    done = completed_partitions(sc.output, settings)
    todo = [p for p in partitions if p["key"] not in done]
    log(
        f"{len(partitions)} partitions planned from {sc.input}; "
        + (f"resuming: {len(done)} already done, " if resumed else "")
        + f"{len(todo)} to score with {model['ref']} ({model['sha256'][:12]})"
    )
    if todo:
        from medisee.raylib import ensure_ray

        ensure_ray()
        run_graph(cfg, todo, queries, model, settings, log)
    summary = summarize(sc.output, partitions, settings, time.time() - started, len(todo))
    if not summary["partitions_missing"]:
        # pieces a lost writer or a killed job staged for partitions that have since been committed
        storage.delete(storage.join(sc.output, "_staging"), settings)
    storage.write_bytes(
        storage.join(sc.output, "summary.json"), json.dumps(summary, indent=2).encode(), settings
    )
    return summary


def run_graph(cfg, todo: list[dict], queries: QueryPlan, model: dict, settings, log) -> None:
    import ray.data
    from ray.data import ActorPoolStrategy

    sc = cfg.scoring
    spec = ModelSpec(
        sc.model, cfg.tracking.uri, settings, model["name"], model["version"], model["sha256"],
        sc.dtype, sc.torch_threads, "cuda" if sc.mllm_num_gpus or sc.decoder_num_gpus else "cpu",
    )  # fmt: skip
    info = {"name": model["name"], "version": model["version"], "sha256": model["sha256"]}
    opts = DecodeOptions(
        settings, sc.max_file_bytes, sc.max_image_pixels, sc.slice_axis, sc.resample_spacing,
        sc.keep_empty_slices, tuple(cfg.prepare.ct_window), sc.max_dicom_bytes, sc.max_volume_bytes,
    )  # fmt: skip
    items = [{"partition": json.dumps(p)} for p in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        decode_batch, batch_size=1, batch_format="pyarrow", num_cpus=sc.decode_num_cpus,
        fn_kwargs={"queries": queries, "opts": opts},
    )  # fmt: skip
    if sc.via_serve:
        ds = ds.map_batches(
            ServeStep, batch_size=sc.mllm_batch_images, batch_format="pyarrow", num_cpus=sc.task_num_cpus,
            compute=ActorPoolStrategy(size=sc.mllm_actors),
            fn_constructor_kwargs={"app_name": sc.via_serve, "model_info": {**info, "ref": sc.model},
                                   "max_in_flight": sc.serve_in_flight, "overlay_fraction": sc.overlay_fraction},
        )  # fmt: skip
    else:
        ds = model_steps(ds, cfg, spec, model, info)
    writer = WriterOptions(sc.output, settings, sc.dicom_seg, sc.nifti_labels, sc.slice_axis, info)
    ds = ds.map_batches(
        PartitionWriter, fn_constructor_kwargs={"options": writer}, batch_size=None, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=1), num_cpus=sc.task_num_cpus,
    )  # fmt: skip
    finished = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        finished += batch.num_rows
    log(f"{finished} of {len(todo)} partitions written")


def model_steps(ds, cfg, spec: ModelSpec, model: dict, info: dict):
    """MLLM actors -> screening and decoder actors (fused) -> decision (fused into the writer):
    the actor-pool path."""
    from ray.data import ActorPoolStrategy

    sc = cfg.scoring
    ds = ds.map_batches(
        MLLMStep, fn_constructor_kwargs={"spec": spec, "mode": sc.mode, "max_new_tokens": sc.max_new_tokens},
        batch_size=sc.mllm_batch_images, batch_format="pyarrow", compute=ActorPoolStrategy(size=sc.mllm_actors),
        num_cpus=sc.mllm_num_cpus, num_gpus=sc.mllm_num_gpus,
    )  # fmt: skip
    # With the decoder's resources Ray Data fuses the screening into the decoder actors: no process
    # of its own to start (importing torch there costs seconds) and no extra hop for the rows.
    ds = ds.map_batches(
        screen_rows, batch_format="pyarrow", num_cpus=sc.decoder_num_cpus, num_gpus=sc.decoder_num_gpus,
        fn_kwargs={"calibration_json": model["calibration_json"], "clip_size": model["inputs"]["clip_size"]},
    )  # fmt: skip
    ds = ds.map_batches(
        DecoderStep, fn_constructor_kwargs={"spec": spec, "mask_threshold": sc.mask_threshold, "early_reject": sc.early_reject},
        batch_size=sc.decoder_batch_images, batch_format="pyarrow", compute=ActorPoolStrategy(size=sc.decoder_actors),
        num_cpus=sc.decoder_num_cpus, num_gpus=sc.decoder_num_gpus,
    )  # fmt: skip
    ds = ds.map_batches(
        finish_rows, batch_format="pyarrow", num_cpus=sc.task_num_cpus,
        fn_kwargs={
            "calibration_json": model["calibration_json"], "clip_size": model["inputs"]["clip_size"],
            "padded_map": model["inputs"]["padded_map"], "judge_config": cfg.verifier, "early_reject": sc.early_reject, "model_info": info,
            "overlay_fraction": sc.overlay_fraction,
        },
    )  # fmt: skip
    return ds


def summarize(output: str, partitions: list[dict], settings, seconds: float, scored: int) -> dict:
    """Totals over every partition's marker, and the reconciliation (scoring/reconcile.py): reconciled
    when every planned partition is committed, its files hold the rows its marker counts, every
    planned input has a row (or was skipped), and the rows the decode step announced (inputs) equal
    the rows found in the written result and error files."""
    markers = completed_partitions(output, settings)
    missing = sorted(p["key"] for p in partitions if p["key"] not in markers)
    planned = {p["key"] for p in partitions}
    totals = {"inputs": 0, "images": 0, "decoded": 0}
    counters: dict[str, dict] = {
        k: {} for k in ("verdicts", "decided_by", "prompts", "error_reasons", "skipped", "stage_seconds")
    }
    for key, m in markers.items():
        if key not in planned:
            continue
        for k in totals:
            totals[k] += m[k]
        for k, counter in counters.items():
            for name, value in m.get(k, {}).items():  # markers of earlier versions lack "prompts"
                counter[name] = counter.get(name, 0) + value
    checked = reconcile(output, partitions, markers, settings)
    results, errors = checked["results"], checked["errors"]
    consistent = not (
        checked["unaccounted_inputs"] or checked["partitions_inconsistent"] or checked["files_not_in_plan"]
    )
    return {
        "partitions": len(partitions),
        "partitions_done": len(planned & markers.keys()),
        "partitions_missing": missing,
        **totals,
        **checked,
        "reconciled": totals["inputs"] == results + errors and not missing and consistent,
        **counters,
        "seconds": round(seconds, 2),
        "partitions_scored_this_run": scored,
        "results_per_second": round(results / seconds, 2) if seconds > 0 and scored else None,
        "output": output,
    }
