"""Ingest benchmark: rows/s streaming shards from a moto S3 through decode + preprocess.

Side by side in one run: the Ray Data reader (actor pool) vs. the same read + decode +
preprocess in a plain single-process loop, plus raw pyarrow read MB/s (the I/O limit).
Last line: {"name": "ingest", "value": <ratio>, "unit": "x single-process", "target": 1.2}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

for key, value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def start_moto_bucket(bucket: str):
    """A moto S3 server in its own process (so it does not share the benchmark's GIL) with one bucket."""
    from medisee import storage

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(f"http://127.0.0.1:{port}/moto-api/")
    settings = storage.StorageSettings(endpoint=f"http://127.0.0.1:{port}")
    storage.boto3_client(settings).create_bucket(Bucket=bucket)
    return server, settings


def phantom_shards_on_s3(uri: str, settings, images: int, image_size: int, shard_mib: int) -> None:
    """Prepare phantom shards locally (no Ray, so it is not timed) and upload them to `uri`."""
    from medisee import storage
    from medisee.config import PrepareConfig
    from medisee.data.prepare import prepare

    cfg = PrepareConfig(
        phantom_images=images, phantom_size=image_size, val_fraction=0.0, shard_max_bytes=shard_mib * 2**20
    )
    with tempfile.TemporaryDirectory() as tmp:
        prepare("phantom", "-", tmp, cfg, executor="local", progress=False)
        storage.upload_dir(tmp, uri, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--sam-size", type=int, default=1024)
    parser.add_argument("--clip-size", type=int, default=336)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from medisee import storage
    from medisee.config import DataConfig
    from medisee.data.reader import Preprocess, shard_dataset, shard_files
    from medisee.raylib import ensure_ray

    server, settings = start_moto_bucket("bench")
    root = "s3://bench/phantom"
    phantom_shards_on_s3(root, settings, args.images, args.image_size, shard_mib=4)
    uris = shard_files(root, "train", settings)
    data_cfg = DataConfig(
        sam_image_size=args.sam_size,
        clip_image_size=args.clip_size,
        batch_size=args.batch_size,
        preprocess_concurrency=args.concurrency,
        preprocess_num_cpus=0.5,
    )

    # raw I/O limit
    t0 = time.perf_counter()
    nbytes = 0
    for uri in uris:
        nbytes += len(storage.read_bytes(uri, settings))
    raw_mb_s = nbytes / 1e6 / (time.perf_counter() - t0)

    # single-process loop: the same read + decode + preprocess
    preprocess = Preprocess(args.sam_size, args.clip_size)
    t0 = time.perf_counter()
    rows_single = 0
    for uri in uris:
        fs, path = storage.filesystem(uri, settings)
        pf = pq.ParquetFile(fs.open_input_file(path))
        for batch in pf.iter_batches(batch_size=args.batch_size):
            import pyarrow as pa

            out = preprocess(pa.Table.from_batches([batch]))
            rows_single += len(out["record_id"])
    single_s = time.perf_counter() - t0

    # Ray Data path (cluster start-up excluded, pipeline start-up included)
    ensure_ray(num_cpus=os.cpu_count())
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's redraws cost a core here
    t0 = time.perf_counter()
    rows_ray = 0
    ds = shard_dataset(data_cfg, settings, split="train", uris={"phantom": root})
    for batch in ds.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
        rows_ray += len(batch["record_id"])
    ray_s = time.perf_counter() - t0
    server.terminate()
    server.wait()

    assert rows_ray == rows_single, (rows_ray, rows_single)
    single_rps, ray_rps = rows_single / single_s, rows_ray / ray_s
    print(
        json.dumps(
            {
                "rows": rows_single,
                "shard_mb": round(nbytes / 1e6, 1),
                "raw_read_mb_s": round(raw_mb_s, 1),
                "single_process_rows_s": round(single_rps, 1),
                "ray_data_rows_s": round(ray_rps, 1),
                "cpus": os.cpu_count(),
            }
        ),
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "name": "ingest",
                "value": round(ray_rps / single_rps, 3),
                "unit": "x single-process",
                "target": 1.2,
            }
        )
    )


if __name__ == "__main__":
    main()
