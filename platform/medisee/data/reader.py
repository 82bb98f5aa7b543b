"""Stream shards from storage into model-ready batches with Ray Data.

    ds = shard_dataset(data_cfg, settings, split="train")      # mixed sources, streaming
    for batch in ds.iter_batches(batch_size=8): ...

Decode and resize run in Ray Data CPU tasks (actor pool), never in the training worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from medisee import storage
from medisee.data.batch import pack_masks, packed_length
from medisee.data.codec import decode_image, row_mask
from medisee.data.preprocess import clip_input, sam_input, sam_mask
from medisee.storage import StorageSettings

PREPROCESS_COLUMNS = (
    "record_id",
    "image_id",
    "query",
    "answer",
    "query_kind",
    "class_name",
    "modality",
    "split",
    "image_png",
    "mask_png",
    "mask_rle",
    "box",
    "height",
    "width",
)


def shard_files(uri: str, split: str | None, settings: StorageSettings) -> list[str]:
    """Shard URIs of a prepared output (from its manifest), optionally one split only."""
    manifest_uri = storage.join(uri, "manifest.json")
    if storage.exists(manifest_uri, settings):
        manifest = json.loads(storage.read_text(manifest_uri, settings))
        return [
            storage.join(uri, s["path"]) for s in manifest["shards"] if split is None or s["split"] == split
        ]
    prefix = storage.join(uri, split) if split else uri
    return storage.list_files(prefix, (".parquet",), settings)


def mix_fractions(rows: dict[str, int], ratio: dict[str, float]) -> dict[str, float]:
    """Per-source sampling fractions so that an epoch follows `ratio`, dropping no source.

    The source that is scarcest relative to its share is used whole; the others are
    down-sampled to match it.
    """
    shares = {s: ratio.get(s, 0.0) for s in rows if rows[s] > 0 and ratio.get(s, 0.0) > 0}
    if not shares:
        return {s: 1.0 for s in rows}
    total = sum(shares.values())
    epoch = min(rows[s] / (shares[s] / total) for s in shares)
    return {s: min(1.0, epoch * shares[s] / total / rows[s]) if s in shares else 0.0 for s in rows}


def _row_count(uris: list[str], settings: StorageSettings) -> int:
    import pyarrow.parquet as pq

    total = 0
    for uri in uris:
        fs, path = storage.filesystem(uri, settings)
        total += pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
    return total


class Preprocess:
    """Shard rows -> model inputs (uint8 images, SAM-frame masks and boxes, text).

    The output fields are medisee.data.batch.READER_FIELDS (masks bit-packed there).
    """

    def __init__(self, sam_size: int, clip_size: int, tokenize: Callable | None = None):
        self.sam_size, self.clip_size, self.tokenize = sam_size, clip_size, tokenize

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = batch.to_pylist()
        n = len(rows)
        s, c = self.sam_size, self.clip_size
        out = {
            "sam_image": np.zeros((n, s, s, 3), np.uint8),
            "clip_image": np.zeros((n, c, c, 3), np.uint8),
            "mask_bits": np.zeros((n, packed_length(s)), np.uint8),
            "box_sam": np.zeros((n, 4), np.float32),
            "has_target": np.zeros((n,), np.bool_),
            "resized_hw": np.zeros((n, 2), np.int32),
            "original_hw": np.zeros((n, 2), np.int32),
        }
        for i, row in enumerate(rows):
            image = decode_image(row["image_png"])
            out["sam_image"][i], frame = sam_input(image, s)
            out["clip_image"][i] = clip_input(image, c)
            out["resized_hw"][i] = frame.resized_hw
            out["original_hw"][i] = image.shape[:2]
            mask = row_mask(row)
            if mask is not None and row.get("box") is not None:
                out["mask_bits"][i] = pack_masks(sam_mask(mask, frame)[None])[0]
                out["box_sam"][i] = np.asarray(row["box"], np.float32) * frame.scale
                out["has_target"][i] = True
        for key in ("record_id", "image_id", "query", "answer", "query_kind", "class_name", "modality"):
            out[key] = np.array([r[key] or "" for r in rows], dtype=object)
        if self.tokenize is not None:
            out.update(self.tokenize(rows))
        return out


class ShardPreprocess:
    """Reads whole shards (one per input row) and yields preprocessed batches from them.

    Reading inside the preprocessing actor keeps one shard's I/O and decode on one CPU,
    needs no driver-side file listing, and streams: one batch at a time is held in memory.
    """

    def __init__(
        self,
        settings: StorageSettings,
        sam_size: int,
        clip_size: int,
        batch_size: int,
        tokenize: Callable | None = None,
        seed: int = 0,
    ):
        self.settings, self.seed = settings, seed
        self.preprocess = Preprocess(sam_size, clip_size, tokenize)
        # Output blocks of ~32 MB: tiny blocks make Ray Data's per-block overhead the bottleneck.
        row_bytes = sam_size * sam_size * 3 + clip_size * clip_size * 3 + sam_size * sam_size // 8
        # a whole number of batches per block, so the consumer slices blocks instead of copying across them
        self.rows_per_block = batch_size * max(1, min(256, 32 * 2**20 // row_bytes) // batch_size)

    def __call__(self, batch: dict):
        import pyarrow.parquet as pq

        for uri, fraction in zip(batch["uri"], batch["fraction"], strict=True):
            fs, path = storage.filesystem(str(uri), self.settings)
            with fs.open_input_file(path) as f:
                for record_batch in pq.ParquetFile(f).iter_batches(
                    batch_size=self.rows_per_block, columns=list(PREPROCESS_COLUMNS)
                ):
                    table = pa.Table.from_batches([record_batch])
                    if fraction < 1.0:
                        keep = [
                            keep_row(rid, fraction, self.seed)
                            for rid in table.column("record_id").to_pylist()
                        ]
                        table = table.filter(pa.array(keep))
                    if table.num_rows:
                        yield self.preprocess(table)


def keep_row(record_id: str, fraction: float, seed: int) -> bool:
    """Deterministic per-row sampling: the same rows are kept for the same seed."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}/{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def shard_dataset(
    data_cfg,
    settings: StorageSettings,
    split: str = "train",
    tokenize: Callable | None = None,
    uris: dict[str, str] | None = None,
    seed: int | None = None,
):
    """A streaming Ray Dataset of preprocessed rows mixing `data_cfg.sources` at `data_cfg.mix`.

    The training split is mixed by per-source sampling fractions and its shard order is
    shuffled by `seed`; other splits are read whole, in order.
    """
    import random

    import ray

    from medisee.raylib import ensure_ray

    ensure_ray()
    sources = uris or data_cfg.sources
    if not sources:
        raise ValueError("data.sources is empty: give at least one source name -> shard URI")
    files = {name: shard_files(uri, split, settings) for name, uri in sources.items()}
    files = {name: f for name, f in files.items() if f}
    if not files:
        raise FileNotFoundError(f"no {split} shards under {sources}")
    seed = data_cfg.seed if seed is None else seed
    if len(files) > 1 and split == "train":
        fractions = mix_fractions(
            {n: _row_count(f, settings) for n, f in files.items()}, _named_mix(data_cfg.mix, files)
        )
    else:
        fractions = {n: 1.0 for n in files}
    items = [
        {"uri": uri, "fraction": fractions[name]}
        for name, f in files.items()
        for uri in f
        if fractions[name] > 0
    ]
    if split == "train":
        random.Random(seed).shuffle(items)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        ShardPreprocess,
        fn_constructor_args=(
            settings,
            data_cfg.sam_image_size,
            data_cfg.clip_image_size,
            data_cfg.batch_size,
            tokenize,
            seed,
        ),
        batch_size=1,
        num_cpus=data_cfg.preprocess_num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=data_cfg.preprocess_concurrency),
    )


def _named_mix(mix: dict[str, float], files: dict[str, list[str]]) -> dict[str, float]:
    """Mix weights by source name; a source missing from the mix gets weight 1."""
    return {name: float(mix.get(name, 1.0)) for name in files}
