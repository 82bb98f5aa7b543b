"""Exactly-once output: a partition is written whole, then marked done.

    <output>/_job.json              what this output was made from (input, queries, model, options, plan)
    <output>/results/<partition>.parquet   one row per query or box prompt (schema.RESULT_SCHEMA)
    <output>/errors/<partition>.parquet    one row per failed input, query or box prompt (schema.ERROR_SCHEMA)
    <output>/overlays/<image>-<hash>.png   optional sample
    <output>/dicom_seg/<series>-<hash>.dcm, <output>/nifti_labels/<volume>-<hash>.nii.gz (+ .json)
                                           optional; the names follow the partition key; text
                                           queries only (a box prompt has no query to name a segment)
    <output>/_done/<partition>.json        the commit marker, with the partition's counts
    <output>/_staging/<partition>/<piece>.parquet   rows of a partition not yet complete (see below)

Every name is the partition key or `plan.unique_name` of an image id and its partition, so no two
inputs write the same file (not even on a case-insensitive store). Each file is written atomically (temporary file + rename locally; one PUT on S3) and the marker
goes last. A rerun skips marked partitions and rewrites the others under the same names, so a
killed job neither loses nor duplicates a row.

A partition usually reaches the writer whole, in one block. One larger than Ray Data's block size
(a long DICOM series, a big volume) arrives in pieces, and the writer holds the first ones until the
last comes. Should the writer's node be lost meanwhile, Ray restarts the writer and retries only the
batch in flight, not the pieces already handed over: so each piece of an incomplete partition is
also staged to storage, under a name derived from its rows (a retried piece overwrites itself), and
a writer that meets a partition it holds nothing of reads that partition's staged pieces first.
Rows are counted by their key, so a piece seen twice counts once.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from medisee import storage
from medisee.scoring import schema
from medisee.scoring.plan import unique_name
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


def staging_uri(output: str, partition: str) -> str:
    return storage.join(output, "_staging", partition)


def overlay_uri(output: str, partition: str, image_id: str) -> str:
    """Image ids are unique within a partition only (two shards may hold the same id)."""
    return storage.join(output, "overlays", f"{unique_name(f'{partition}/{image_id}', image_id)}.png")


def row_key(row: dict) -> str:
    """A row's identity within its partition: the record id (results and errors), or the image id of
    a partition's placeholder row."""
    return row.get("record_id") or f"{row['status']}:{row['image_id']}"


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
        self.buffers: dict[str, dict[str, dict]] = {}  # partition -> row key -> row

    def __call__(self, batch: pa.Table) -> pa.Table:
        by_partition: dict[str, list[dict]] = {}
        for row in batch.to_pylist():
            by_partition.setdefault(row["partition"], []).append(row)
        finished = [s for p, rows in by_partition.items() if (s := self.add(p, rows)) is not None]
        return pa.table(
            {"partition": [f["partition"] for f in finished], "summary": [json.dumps(f) for f in finished]}
        )

    def add(self, partition: str, rows: list[dict]) -> dict | None:
        """Adds rows of one partition; the partition's summary once it is complete and committed."""
        expected = rows[0]["partition_rows"]
        if partition not in self.buffers and len(rows) >= expected:
            return self.commit(partition, rows)  # arrived whole: the common case, nothing staged
        buffer = self.buffers.pop(partition, None)
        if buffer is None:
            buffer = self.staged(partition)
        new = {row_key(r): r for r in rows if row_key(r) not in buffer}
        buffer.update(new)
        if len(buffer) >= expected:
            summary = self.commit(partition, list(buffer.values()))
            storage.delete(staging_uri(self.options.output, partition), self.options.settings)
            return summary
        self.buffers[partition] = buffer
        if new:
            self.stage(partition, list(new.values()))
        return None

    def stage(self, partition: str, rows: list[dict]) -> None:
        name = hashlib.sha256("\n".join(sorted(row_key(r) for r in rows)).encode()).hexdigest()[:24]
        uri = storage.join(staging_uri(self.options.output, partition), f"{name}.parquet")
        storage.write_bytes(uri, parquet_bytes(rows, schema.OUTPUT_ROW), self.options.settings)

    def staged(self, partition: str) -> dict[str, dict]:
        """Rows of `partition` staged by an earlier writer (one on a lost node, or a killed job's)."""
        rows: dict[str, dict] = {}
        settings = self.options.settings
        for uri in storage.list_files(staging_uri(self.options.output, partition), (".parquet",), settings):
            for row in pq.read_table(io.BytesIO(storage.read_bytes(uri, settings))).to_pylist():
                rows[row_key(row)] = row
        return rows

    def commit(self, partition: str, rows: list[dict]) -> dict:
        o = self.options
        results = [r for r in rows if r["status"] == "result"]
        errors = [r for r in rows if r["status"] == "error"]
        for r in results:
            if r.get("overlay_png"):
                storage.write_bytes(
                    overlay_uri(o.output, partition, r["image_id"]), r["overlay_png"], o.settings
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
        "verdicts": dict(Counter(r["verdict"] for r in results if r["verdict"] is not None)),
        "decided_by": dict(Counter(r["decided_by"] for r in results if r["decided_by"] is not None)),
        "prompts": dict(Counter(r["prompt"] for r in results if r.get("prompt"))),  # text | box
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
    """DICOM SEG per series / NIfTI label volume per volume, when asked for, of the text queries;
    the names written."""
    written = {}
    results = [r for r in results if r.get("prompt") != "box"]
    if options.dicom_seg and partition.startswith("dicom-") and results:
        from medisee.scoring.volume_outputs import write_dicom_seg

        written["dicom_seg"] = write_dicom_seg(partition, results, options)
    if options.nifti_labels and partition.startswith("nifti-") and results:
        from medisee.scoring.volume_outputs import write_nifti_labels

        written["nifti_labels"] = write_nifti_labels(partition, results, options)
    return written
