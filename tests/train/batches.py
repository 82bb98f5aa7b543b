"""Real reader batches for step-level tests: phantom shards through the training reader's Preprocess."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from medisee.config import PrepareConfig
from medisee.data.prepare import prepare
from medisee.data.reader import Preprocess, shard_files


def phantom_rows(folder, images: int = 8) -> list[dict]:
    out = folder / "shards"
    prepare(
        "phantom", "-", str(out), PrepareConfig(phantom_images=images, val_fraction=0.0), executor="local"
    )
    rows = []
    for uri in shard_files(str(out), "train", None):
        rows.extend(pq.read_table(uri).to_pylist())
    return rows


def reader_batch(rows: list[dict], sam_size: int, clip_size: int) -> dict:
    return Preprocess(sam_size, clip_size)(pa.Table.from_pylist(rows))
