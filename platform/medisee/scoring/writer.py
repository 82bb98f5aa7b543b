"""Exactly-once output: a partition is written whole, then marked done.

    <output>/_job.json              what this output was made from (input, queries, model, options, plan)
    <output>/results/<partition>.parquet   one row per query (schema.RESULT_SCHEMA)
    <output>/errors/<partition>.parquet    one row per failed input or query (schema.ERROR_SCHEMA)
    <output>/overlays/<image>.png          optional sample
    <output>/dicom_seg/<series>.dcm, <output>/nifti_labels/<volume>.nii.gz (+ .json)   optional
    <output>/_done/<partition>.json        the commit marker, with the partition's counts

Each file is written atomically (temporary file + rename locally; one PUT on S3) and the marker
goes last. A rerun skips marked partitions and rewrites the others under the same names, so a
killed job neither loses nor duplicates a row.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from medisee import storage
from medisee.scoring import schema
from medisee.scoring.plan import slug
from medisee.storage import StorageSettings

STAGE_TIMES = ("t_decode_s", "t_mllm_s", "t_verifier_s", "t_decoder_s")


class JobMismatch(ValueError):
    """The output folder holds the output of a different job."""


@dataclass(frozen=True)
class WriterOptions:
    output: str
    settings: StorageSettings | None = None
    dicom_seg: bool = False
    nifti_labels: bool = False
    slice_axis: int = 2
    model_info: dict = field(default_factory=dict)


def done_uri(output: str, partition: str) -> str:
    return storage.join(output, "_done", f"{partition}.json")


def completed_partitions(output: str, settings: StorageSettings | None) -> dict[str, dict]:
    markers = storage.list_files(storage.join(output, "_done"), (".json",), settings)
    return {
        m.rsplit("/", 1)[-1][: -len(".json")]: json.loads(storage.read_text(m, settings)) for m in markers
    }


def check_or_start_job(output: str, job: dict, settings: StorageSettings | None) -> bool:
    """True when resuming; JobMismatch when `output` was written by another job."""
    uri = storage.join(output, "_job.json")
    if storage.exists(uri, settings):
        previous = json.loads(storage.read_text(uri, settings))
        changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
        if changed:
            raise JobMismatch(
                f"{output} holds the output of another job (different {', '.join(changed)}); "
                "give a new output, or delete it to start over"
            )
        return True
    storage.write_bytes(uri, json.dumps(job, indent=2, sort_keys=True).encode(), settings)
    return False


def parquet_bytes(rows: list[dict], table_schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(schema.table(rows, table_schema), buffer, compression="zstd")
    return buffer.getvalue()


class PartitionWriter:
    """The last step (one actor): gathers each partition's rows and commits it once complete."""

    def __init__(self, options: WriterOptions):
        self.options = options
        self.buffers: dict[str, list[dict]] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        finished = []
        for row in batch.to_pylist():
            rows = self.buffers.setdefault(row["partition"], [])
            rows.append(row)
            if len(rows) == row["partition_rows"]:
                finished.append(self.commit(row["partition"], self.buffers.pop(row["partition"])))
        return pa.table(
            {"partition": [f["partition"] for f in finished], "summary": [json.dumps(f) for f in finished]}
        )

    def commit(self, partition: str, rows: list[dict]) -> dict:
        o = self.options
        results = [r for r in rows if r["status"] == "result"]
        errors = [r for r in rows if r["status"] == "error"]
        for r in results:
            if r.get("overlay_png"):
                storage.write_bytes(
                    storage.join(o.output, "overlays", f"{slug(r['image_id'])}.png"),
                    r["overlay_png"],
                    o.settings,
                )
        extra = write_volume_outputs(partition, results, o)
        if results:
            storage.write_bytes(
                storage.join(o.output, "results", f"{partition}.parquet"),
                parquet_bytes(results, schema.RESULT_SCHEMA),
                o.settings,
            )
        if errors:
            storage.write_bytes(
                storage.join(o.output, "errors", f"{partition}.parquet"),
                parquet_bytes(errors, schema.ERROR_SCHEMA),
                o.settings,
            )
        summary = partition_summary(partition, rows, results, errors, extra)
        storage.write_bytes(
            done_uri(o.output, partition), json.dumps(summary, sort_keys=True).encode(), o.settings
        )
        return summary


def partition_summary(partition: str, rows, results, errors, extra: dict) -> dict:
    images = {r["image_id"] for r in results}
    return {
        "partition": partition,
        "inputs": rows[0]["partition_rows"] - sum(1 for r in rows if r["status"] == "skip"),
        "results": len(results),
        "errors": len(errors),
        "images": len(images),
        "verdicts": dict(Counter(r["verdict"] for r in results)),
        "decided_by": dict(Counter(r["decided_by"] for r in results)),
        "decoded": sum(1 for r in results if r["decoded"]),
        "error_reasons": dict(Counter(r["reason"] for r in errors)),
        "skipped": json.loads(rows[0].get("partition_skipped") or "{}"),
        "stage_seconds": {k: _image_time(results, k) for k in STAGE_TIMES},
        "outputs": extra,
    }


def _image_time(results: list[dict], key: str) -> float:
    """Stage busy time: the per-image shares, counted once per image."""
    per_image = {r["image_id"]: r.get(key) or 0.0 for r in results}
    return float(sum(per_image.values()))


def write_volume_outputs(partition: str, results: list[dict], options: WriterOptions) -> dict:
    """DICOM SEG per series / NIfTI label volume per volume, when asked for; the names written."""
    written = {}
    if options.dicom_seg and partition.startswith("dicom-") and results:
        from medisee.scoring.volume_outputs import write_dicom_seg

        written["dicom_seg"] = write_dicom_seg(partition, results, options)
    if options.nifti_labels and partition.startswith("nifti-") and results:
        from medisee.scoring.volume_outputs import write_nifti_labels

        written["nifti_labels"] = write_nifti_labels(partition, results, options)
    return written
