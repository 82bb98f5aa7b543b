"""Training data stall: tiny-preset step time fed by the Ray Data stream from a moto S3 vs. fed by
the same batches held in memory, inside Ray Train workers; plus samples/s for 1 vs. 2 workers and
the step time of the FSDP strategy against DDP on the same in-memory batches.

Last line: {"name": "train_ingest_stall", "value": <stall %>, "unit": "%", "target": 10}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# importing ingest also sets the benchmarks' environment defaults (loopback Ray, moto credentials)
from ingest import phantom_shards_on_s3, start_moto_bucket  # noqa: E402


def loop(config: dict) -> None:
    import ray.train
    import torch

    from medisee.data.batch import collate
    from medisee.model import build_model
    from medisee.train import parallel
    from medisee.train.step import train_step

    torch.set_num_threads(1)
    steps, warmup, batch_size = config["steps"], config["warmup"], config["batch_size"]
    inner = build_model("tiny", finetune="full")
    world = ray.train.get_context().get_world_size()
    model = parallel.wrap(inner, config["strategy"], world, ray.train.torch.get_device())
    opt = torch.optim.AdamW([p for p in inner.parameters() if p.requires_grad], lr=1e-4)
    shard = ray.train.get_dataset_shard("train")

    def stream():
        while True:
            yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)

    batches = stream()
    if config["mode"] == "memory":
        held = [next(batches) for _ in range(steps)]
        batches = iter(held * 2)

    def step(raw):
        train_step(model, inner, opt, None, [collate(raw, inner.text)], grad_clip=1.0)

    for _ in range(warmup):
        step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    elapsed = time.perf_counter() - start
    result = {"seconds_per_step": elapsed / steps, "samples_per_s": steps * batch_size / elapsed}
    ray.train.report(result)
    if ray.train.get_context().get_world_rank() == 0:  # Result.metrics is not filled without a checkpoint
        Path(config["out"]).write_text(json.dumps(result))


def run(mode: str, workers: int, uri: str, settings, args, strategy: str = "ddp") -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medisee.config import DataConfig
    from medisee.data.reader import shard_dataset

    out = str(Path(tempfile.mkdtemp()) / "result.json")
    data_cfg = DataConfig(
        sam_image_size=128,
        clip_image_size=128,
        batch_size=args.batch_size,
        preprocess_concurrency=2,
        preprocess_num_cpus=0.25,
    )
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "mode": mode,
            "strategy": strategy,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "out": out,
        },
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name=f"bench-{mode}-{workers}-{strategy}-{int(time.time())}", storage_path=tempfile.mkdtemp()
        ),
        datasets={"train": shard_dataset(data_cfg, settings, split="train", uris={"phantom": uri})},
    )
    trainer.fit()
    metrics = json.loads(Path(out).read_text())
    return {
        "seconds_per_step": metrics["seconds_per_step"],
        "samples_per_s": metrics["samples_per_s"] * workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    # 60 timed steps after 5 warm-up ones measured the stream's start (actors starting, first shards
    # read) as much as its steady state: 15-29 % "stall" where 150 steps after 20 gave ~0 %
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    import ray

    from medisee.raylib import ensure_ray

    server, settings = start_moto_bucket("bench")
    uri = "s3://bench/phantom"
    phantom_shards_on_s3(uri, settings, args.images, image_size=128, shard_mib=2)
    ensure_ray(num_cpus=os.cpu_count())
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    try:
        results["memory_2w"] = run("memory", 2, uri, settings, args)
        results["stream_2w"] = run("stream", 2, uri, settings, args)
        results["stream_1w"] = run("stream", 1, uri, settings, args)
        results["memory_2w_fsdp"] = run("memory", 2, uri, settings, args, strategy="fsdp")
    finally:
        server.terminate()
    stall = 100 * (1 - results["memory_2w"]["seconds_per_step"] / results["stream_2w"]["seconds_per_step"])
    results["fsdp_over_ddp_step_time"] = round(
        results["memory_2w_fsdp"]["seconds_per_step"] / results["memory_2w"]["seconds_per_step"], 3
    )
    print(json.dumps(results), file=sys.stderr)
    print(
        json.dumps(
            {"name": "train_ingest_stall", "value": round(max(stall, 0.0), 1), "unit": "%", "target": 10}
        )
    )


if __name__ == "__main__":
    main()
