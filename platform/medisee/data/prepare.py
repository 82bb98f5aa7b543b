"""`medisee prepare`: convert a dataset layout into Parquet shards on storage.

Specs (one per image or volume) are enumerated on the driver from the dataset's index;
loading, decoding, validation and PNG encoding run in Ray Data tasks; the driver streams
the results into bounded-size shards per split, a quarantine table and a manifest:

    <output>/<split>/part-00000.parquet
    <output>/quarantine.parquet
    <output>/manifest.json

An input that is missing or holds nothing the format recognises raises PrepareError before
anything is written: an empty dataset never looks like a finished one. An input whose every
record is bad is a real run (all rows in quarantine, rows_written == 0).
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from medisee import storage
from medisee.config import PrepareConfig
from medisee.data.codec import BadRecord
from medisee.data.records import LoadedImage, LoadedTarget, Query, rows_for_image
from medisee.data.schema import QUARANTINE_SCHEMA, SHARD_SCHEMA, rows_to_table
from medisee.data.sources import EXPECTS, FORMATS, load_spec
from medisee.data.sources.context import ConvertContext
from medisee.storage import StorageSettings

FORMAT_NAMES = tuple(FORMATS)


class PrepareError(ValueError):
    """The input cannot be prepared (unknown format, missing input, nothing recognisable)."""


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _check_input(fmt: str, input_uri: str, settings: StorageSettings) -> None:
    if fmt not in FORMATS:
        raise PrepareError(f"unknown format {fmt!r}; choose one of {', '.join(FORMAT_NAMES)}")
    if fmt == "phantom":
        return
    if input_uri in ("", "-"):
        raise PrepareError(f"{fmt} needs an input: a local path or an s3:// prefix")
    try:
        found = storage.exists(input_uri, settings)
    except OSError as exc:
        raise PrepareError(f"{fmt} input {input_uri} cannot be reached ({_one_line(exc)})") from exc
    if not found:
        raise PrepareError(f"{fmt} input {input_uri} does not exist")


def enumerate_specs(fmt: str, input_uri: str, ctx: ConvertContext) -> list[dict]:
    """The input's specs; PrepareError when there are none or the layout's index is unreadable."""
    _check_input(fmt, input_uri, ctx.settings)
    expects = f"{fmt} expects {EXPECTS[fmt]}"
    try:
        specs = list(FORMATS[fmt].specs(input_uri, ctx))
    except (OSError, ValueError, KeyError) as exc:
        raise PrepareError(f"{fmt} input {input_uri} is unreadable ({_one_line(exc)}); {expects}") from exc
    if not specs:
        raise PrepareError(f"{fmt} input {input_uri} has nothing recognisable; {expects}")
    return specs


def _fallback(spec: dict, err: BadRecord) -> LoadedImage:
    """When a loader itself fails, still account for every record the spec promised."""
    targets = [
        LoadedTarget(
            t["class_name"],
            err,
            t.get("mask_uri") or spec.get("image_uri", ""),
            int(t.get("instance", 0)),
            [Query(**q) for q in t["queries"]] if t.get("queries") else None,
        )
        for t in spec.get("targets", [])
    ]
    return LoadedImage(
        spec["image_key"],
        spec.get("image_uri", spec["image_key"]),
        spec.get("modality", "unknown"),
        spec.get("split", "train"),
        err,
        targets,
        list(spec.get("absent_classes", [])),
    )


def process_specs(spec_jsons, ctx: ConvertContext, mask_format: str = "png") -> pa.Table:
    rows: list[dict] = []
    for text in spec_jsons:
        spec = json.loads(text)
        try:
            loaded = load_spec(spec, ctx)
        except Exception as exc:
            loaded = [_fallback(spec, BadRecord("loader_error", f"{type(exc).__name__}: {str(exc)[:200]}"))]
        for image in loaded:
            rows.extend(rows_for_image(ctx.source, image, mask_format))
    return rows_to_table(rows)


class _ProcessBatch:
    def __init__(self, ctx: ConvertContext, mask_format: str):
        self.ctx, self.mask_format = ctx, mask_format

    def __call__(self, batch: pa.Table) -> pa.Table:
        return process_specs(batch.column("spec").to_pylist(), self.ctx, self.mask_format)


@dataclass
class ShardWriter:
    """Streams shard rows into `<output>/<split>/part-NNNNN.parquet` files of bounded size."""

    output_uri: str
    settings: StorageSettings
    max_bytes: int
    shards: list[dict] = field(default_factory=list)
    _buffers: dict[str, list[pa.Table]] = field(default_factory=dict)
    _sizes: Counter = field(default_factory=Counter)
    _counts: Counter = field(default_factory=Counter)

    def add(self, table: pa.Table) -> None:
        for split in set(table.column("split").to_pylist()):
            part = table.filter(pa.compute.equal(table.column("split"), split))
            self._buffers.setdefault(split, []).append(part)
            self._sizes[split] += part.nbytes
            if self._sizes[split] >= self.max_bytes:
                self._flush(split)

    def _flush(self, split: str) -> None:
        parts = self._buffers.pop(split, [])
        self._sizes[split] = 0
        if not parts:
            return
        table = pa.concat_tables(parts)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=256, compression="zstd")
        data = buf.getvalue()
        name = f"{split}/part-{self._counts[split]:05d}.parquet"
        self._counts[split] += 1
        storage.write_bytes(storage.join(self.output_uri, name), data, self.settings)
        self.shards.append(
            {
                "path": name,
                "split": split,
                "rows": table.num_rows,
                "bytes": len(data),
                "sha256": storage.sha256(data),
            }
        )

    def close(self) -> list[dict]:
        for split in list(self._buffers):
            self._flush(split)
        return self.shards


def prepare(
    fmt: str,
    input_uri: str,
    output_uri: str,
    prepare_cfg: PrepareConfig | None = None,
    settings: StorageSettings | None = None,
    executor: str = "ray",
    mask_format: str = "png",
    modality: str = "unknown",
    progress: bool = True,
) -> dict:
    """Convert `input_uri` (layout `fmt`) into shards under `output_uri`; return the manifest.

    Raises PrepareError, having written nothing, when the input has no spec to process.
    """
    prepare_cfg = prepare_cfg or PrepareConfig()
    settings = settings or StorageSettings.resolve()
    ctx = ConvertContext(settings=settings, prepare=prepare_cfg, source=fmt, modality=modality)
    started = time.time()
    specs = enumerate_specs(fmt, input_uri, ctx)
    spec_jsons = [json.dumps(s) for s in specs]

    writer = ShardWriter(output_uri, settings, prepare_cfg.shard_max_bytes)
    quarantine: list[pa.Table] = []
    seen: set[str] = set()
    counts = Counter()
    for table in _results(spec_jsons, ctx, mask_format, executor, progress):
        table = _mark_duplicates(table, seen)
        bad_mask = pa.compute.invert(pa.compute.is_null(table.column("reason")))
        bad = table.filter(bad_mask)
        good = table.filter(pa.compute.invert(bad_mask))
        counts["input"] += table.num_rows
        if bad.num_rows:
            quarantine.append(bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA))
        if good.num_rows:
            good = good.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
            for key, value in Counter(good.column("split").to_pylist()).items():
                counts[f"split:{key}"] += value
            for key, value in Counter(good.column("query_kind").to_pylist()).items():
                counts[f"kind:{key}"] += value
            writer.add(good)
    shards = writer.close()

    quarantine_table = pa.concat_tables(quarantine) if quarantine else QUARANTINE_SCHEMA.empty_table()
    buf = io.BytesIO()
    pq.write_table(quarantine_table, buf)
    storage.write_bytes(storage.join(output_uri, "quarantine.parquet"), buf.getvalue(), settings)

    manifest = {
        "format": fmt,
        "input": input_uri,
        "created_unix": int(started),
        "seconds": round(time.time() - started, 2),
        "images_specs": len(specs),
        "rows_input": counts["input"],
        "rows_written": sum(s["rows"] for s in shards),
        "rows_quarantined": quarantine_table.num_rows,
        "rows_by_split": {k[6:]: v for k, v in sorted(counts.items()) if k.startswith("split:")},
        "rows_by_query_kind": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("kind:")},
        "quarantine_reasons": dict(Counter(quarantine_table.column("reason").to_pylist())),
        "quarantine": "quarantine.parquet",
        "schema": SHARD_SCHEMA.to_string(show_schema_metadata=False),
        "mask_format": mask_format,
        "prepare": prepare_cfg.model_dump(mode="json"),
        "shards": shards,
    }
    assert manifest["rows_input"] == manifest["rows_written"] + manifest["rows_quarantined"]
    storage.write_bytes(
        storage.join(output_uri, "manifest.json"), json.dumps(manifest, indent=2).encode(), settings
    )
    return manifest


def _mark_duplicates(table: pa.Table, seen: set[str]) -> pa.Table:
    ids = table.column("record_id").to_pylist()
    reasons = table.column("reason").to_pylist()
    details = table.column("detail").to_pylist()
    changed = False
    for i, rid in enumerate(ids):
        if reasons[i] is not None:
            continue
        if rid in seen:
            reasons[i], details[i] = "duplicate_record_id", f"{rid} was already written"
            changed = True
        else:
            seen.add(rid)
    if not changed:
        return table
    table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    return table.set_column(table.schema.get_field_index("detail"), "detail", pa.array(details, pa.string()))


def _results(spec_jsons: list[str], ctx, mask_format: str, executor: str, progress: bool):
    if not spec_jsons:
        return
    if executor == "local":
        for text in spec_jsons:
            yield process_specs([text], ctx, mask_format)
        return
    import ray

    from medisee.raylib import ensure_ray

    ensure_ray()
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.execution_options.preserve_order = True
    data_ctx.enable_progress_bars = progress
    ds = ray.data.from_arrow(pa.table({"spec": spec_jsons}))
    ds = ds.repartition(max(1, min(len(spec_jsons), 64)))
    ds = ds.map_batches(
        _ProcessBatch,
        fn_constructor_args=(ctx, mask_format),
        batch_size=4,
        batch_format="pyarrow",
        num_cpus=ctx.prepare.num_cpus_per_task,
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=max(1, int(_cluster_cpus() / ctx.prepare.num_cpus_per_task))
        ),
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))
