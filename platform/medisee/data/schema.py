"""The Parquet shard schema (documented in docs/data-format.md).

One row per (image, target, query). Images and masks travel as PNG bytes; a mask may
instead be stored as COCO RLE (`mask_rle`, JSON). False queries carry no mask and no box.
"""

from __future__ import annotations

import pyarrow as pa

QUERY_KINDS = ("referring", "reasoning_short", "reasoning_long", "false_query", "image_only")
SPLITS = ("train", "val", "test")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("input_ref", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("image_png", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("class_name", pa.string()),
        pa.field("mask_png", pa.binary()),
        pa.field("mask_rle", pa.string()),
        pa.field("box", pa.list_(pa.float32())),  # pixel xyxy, null for false queries
        pa.field("query", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("query_kind", pa.string(), nullable=False),
        pa.field("explanation", pa.string()),
        pa.field("split", pa.string(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("input_ref", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)

# What a processing task emits: a shard row, or a quarantine row (reason set).
PROCESSED_SCHEMA = pa.schema(
    list(SHARD_SCHEMA) + [pa.field("reason", pa.string()), pa.field("detail", pa.string())]
)


def empty_row() -> dict:
    return {name: None for name in PROCESSED_SCHEMA.names}


def rows_to_table(rows: list[dict], schema: pa.Schema = PROCESSED_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
