"""Phantom shards prepared in a test's folder, their rows, and reader batches made from those rows
by the training reader's own Preprocess."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medisee.config import PrepareConfig
from medisee.data.prepare import prepare
from medisee.data.reader import Preprocess, shard_files


def prepare_phantom(folder: Path, images: int = 8, val_fraction: float = 0.0) -> Path:
    shards = folder / "shards"
    config = PrepareConfig(phantom_images=images, val_fraction=val_fraction)
    prepare("phantom", "-", str(shards), config, executor="local")
    return shards


def split_rows(shards: Path, split: str = "train") -> list[dict]:
    rows = []
    for uri in shard_files(str(shards), split, None):
        rows.extend(pq.read_table(uri).to_pylist())
    return rows


def phantom_rows(folder: Path, images: int = 8) -> list[dict]:
    return split_rows(prepare_phantom(folder, images))


def reader_batch(rows: list[dict], sam_size: int, clip_size: int) -> dict:
    return Preprocess(sam_size, clip_size)(pa.Table.from_pylist(rows))
