"""Fault drills for batch scoring (issue 12), on several Ray nodes of this machine.

(a) A worker node is lost mid-run: Ray restarts the lost actors elsewhere and retries their work;
    every input record comes out exactly once, with the results of a run without the loss.
(b) The object store under pressure: a job whose decoded images are several times a node's object
    store completes by spilling, while the driver's memory does not grow with the archive.

Run with `pytest -s tests/ops/test_drill_batch.py` to see the `DRILL {...}` lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medisee.config import load_config
from medisee.data import phantom
from medisee.data.codec import rle_to_mask
from tests.ops.conftest import add_worker, report_drill
from tests.scoring import test_batch_infer as batch_infer

QUERIES = batch_infer.QUERIES  # two template queries per image

# Ray Data runs as many decode tasks at once as the CPUs allow, each in a Ray worker process of its own:
# at the default 0.25 CPU, 4 per worker CPU start together (16 on the nodes of (a), 8 on the node of
# (b)), and on a 2-core machine starting them takes longer than the scoring (a run of (a): 32-40 s at
# 0.25, 18-20 s at 0.8). At 0.8 CPU: 2 per node, and one still fits beside the three actors (1.1 CPU)
# on the node left after a loss, to redo the decoded blocks lost with the other. Not 0.5: with the
# MLLM actors' resources Ray Data fuses decoding into them, a graph production does not run.
DECODE_SETTINGS = ["scoring.decode_num_cpus=0.8"]

# (a): 128x128 phantoms, 16 per partition (12 partitions with the DICOM inputs). Blocks of ~5 image
# rows, so that partitions reach the writer in pieces (as a long DICOM series does at Ray Data's
# default 128 MiB blocks) and the writer holds rows of incomplete partitions when its node goes.
NODE_LOSS_IMAGES = 128
NODE_LOSS_BLOCK_BYTES = 256 * 1024
NODE_LOSS_SETTINGS = [
    "scoring.images_per_partition=16",
    "scoring.mllm_batch_images=8",
    "scoring.decoder_batch_images=8",
    *DECODE_SETTINGS,
]

# (b): 512x512 RGB images (768 KiB decoded, 12 MiB per partition block) on a node with a 100 MiB object
# store. Ray Data budgets its memory against the object stores of the whole cluster (the head's is large),
# so the blocks between the steps overfill the small one and Ray spills.
PRESSURE_IMAGES = 400
PRESSURE_SIDE = 512
PRESSURE_STORE_BYTES = 100 * 1024 * 1024
PRESSURE_SETTINGS = [
    "scoring.images_per_partition=16",
    "scoring.mllm_batch_images=8",
    "scoring.decoder_batch_images=8",
    *DECODE_SETTINGS,
]


# ----- cluster helpers -----------------------------------------------------------------------------
def hold_head_cpus(cluster) -> None:
    """An actor taking the head's CPUs, so that the job's actors and tasks all run on the worker nodes
    (as on a cluster whose head has no CPUs) and losing a worker hits the job. Detached: it lives on
    without a handle, until the cluster is shut down."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote
    class HeadPlaceholder:
        def ready(self) -> bool:
            return True

    head = cluster.head_node.node_id
    cpus = next(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == head)
    if cpus:
        holder = HeadPlaceholder.options(
            num_cpus=cpus,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
        ).remote()
        ray.get(holder.ready.remote(), timeout=300)


def job_actors(class_part: str = "MapWorker") -> list[dict]:
    """The cluster's actors (live and dead) whose class name contains `class_part`, from the GCS; Ray
    Data names its pool actors after their steps, e.g. `MapWorker(MapBatches(MLLMStep))`."""
    import ray

    return [
        {
            "class": a["ActorClassName"],
            "node": a["Address"]["NodeID"],
            "state": a["State"],
            "restarts": a["NumRestarts"],
        }
        for a in ray._private.state.actors().values()
        if class_part in a["ActorClassName"]
    ]


@contextlib.contextmanager
def block_size(max_bytes: int):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.target_max_block_size
    ctx.target_max_block_size = max_bytes
    try:
        yield
    finally:
        ctx.target_max_block_size = before


def scoring_config(archive: Path, output: Path, model: Path, settings: list[str]):
    cfg = load_config(
        "tiny", [f"scoring.input={archive}", f"scoring.output={output}", f"scoring.model={model}", *settings]
    )
    cfg.scoring.queries = QUERIES
    return cfg


def files(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern)) if folder.is_dir() else []


def records(output: Path, table: str) -> list[dict]:
    return batch_infer.read_table(str(output / table), None)


# ----- (a) a worker node lost mid-run -------------------------------------------------------------
class WriterNodeKiller(threading.Thread):
    """Removes the worker node that hosts the writer (ungracefully, as a crashed machine) once a
    partition is committed and the writer holds a piece of another one (staged in the output)."""

    def __init__(self, cluster, workers: list, output: Path, timeout_s: float = 900):
        super().__init__(daemon=True)
        self.cluster, self.workers, self.output, self.timeout_s = cluster, workers, output, timeout_s
        self.finished = threading.Event()  # set by the test when the job returned
        self.killed_at: float | None = None
        self.at_kill: dict = {}
        self.error: BaseException | None = None
        self.observed = {"max_staged": 0, "writer_nodes": set()}

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and not self.finished.is_set():
            committed = files(self.output / "_done", "*.json")
            staged = files(self.output / "_staging", "*/*.parquet")
            self.observed["max_staged"] = max(self.observed["max_staged"], len(staged))
            if committed and staged:
                victim = self._writer_node()
                if victim is not None:
                    lost = [
                        a["class"]
                        for a in job_actors()
                        if a["state"] == "ALIVE" and a["node"] == victim.node_id
                    ]
                    self.cluster.remove_node(victim, allow_graceful=False)
                    self.killed_at = time.monotonic()
                    self.at_kill = {
                        "committed": len(committed),
                        "staged_pieces": len(staged),
                        "actors_lost": lost,
                    }
                    return
            time.sleep(0.05)

    def _writer_node(self):
        alive = {a["node"] for a in job_actors("PartitionWriter") if a["state"] == "ALIVE"}
        self.observed["writer_nodes"] |= alive
        return next((w for w in self.workers if w.node_id in alive), None)


def result_view(rows: list[dict]) -> dict[str, tuple]:
    keys = ("image_id", "query", "answer", "found", "verdict", "decided_by")
    return {r["record_id"]: tuple(json.dumps(r[k]) for k in keys) for r in rows}


def assert_same_results(rows: list[dict], baseline: list[dict]) -> None:
    """Every record's answer and decision as in the baseline; masks and boxes up to the float noise of
    another batch composition (a retry re-batches the images: a pixel at the threshold can flip, as
    tests/scoring allows against the predictor)."""
    assert result_view(rows) == result_view(baseline)
    expected = {r["record_id"]: r for r in baseline}
    for row in rows:
        want = expected[row["record_id"]]
        assert (row["mask_rle"] is None) == (want["mask_rle"] is None), row["record_id"]
        if row["mask_rle"] is not None:
            mismatch = (rle_to_mask(row["mask_rle"]) != rle_to_mask(want["mask_rle"])).mean()
            assert mismatch < 1e-3, (row["record_id"], mismatch)
            np.testing.assert_allclose(row["box"], want["box"], atol=1e-3, err_msg=row["record_id"])


def output_rows(partition: str, images: int) -> list[dict]:
    """What the last step hands the writer for one partition: one row per image and query."""
    return [
        {"status": "result", "partition": partition, "partition_rows": images * 2, "partition_skipped": "{}",
         "record_id": f"{partition}/p{i}.png|q{j}", "image_id": f"{partition}/p{i}.png", "query": f"q{j}",
         "verdict": "present", "decided_by": "rule", "decoded": True}
        for i in range(images) for j in range(2)
    ]  # fmt: skip


def test_a_restarted_writer_completes_a_partition_from_the_pieces_its_predecessor_staged(tmp_path):
    """What happens when the writer's node is lost: the pieces of an incomplete partition handed to the
    lost writer come back from storage, a retried piece counts once, and nothing is left staged."""
    from medisee.scoring import schema
    from medisee.scoring.writer import PartitionWriter, WriterOptions

    def table(rows):
        return schema.table(rows, schema.OUTPUT_ROW)

    rows = output_rows("images-00000", 4)
    lost = PartitionWriter(WriterOptions(str(tmp_path)))
    assert lost(table(rows[:3])).num_rows == 0
    assert files(tmp_path / "_staging", "*/*.parquet")
    restarted = PartitionWriter(WriterOptions(str(tmp_path)))  # the lost writer's memory is gone
    assert restarted(table(rows[3:6])).num_rows == 0
    assert restarted(table(rows[3:6])).num_rows == 0  # Ray retried the batch in flight
    done = restarted(table(rows[6:] + output_rows("images-00001", 1)))
    assert sorted(done.column("partition").to_pylist()) == ["images-00000", "images-00001"]
    written = records(tmp_path, "results")
    assert sorted(r["record_id"] for r in written) == sorted(
        r["record_id"] for r in rows + output_rows("images-00001", 1)
    )
    assert not files(tmp_path / "_staging", "*/*")


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_node_lost_mid_run_loses_and_duplicates_no_record(ray_cluster, tiny_artifact, tmp_path):
    import ray

    from medisee.scoring.pipeline import score_archive

    archive = tmp_path / "archive"
    batch_infer.make_archive(archive, None, pngs=NODE_LOSS_IMAGES)  # + 3 unreadable inputs, 1 CT slice
    workers = [add_worker(ray_cluster, num_cpus=2) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    hold_head_cpus(ray_cluster)
    expected_results = (NODE_LOSS_IMAGES + 1) * 2

    with block_size(NODE_LOSS_BLOCK_BYTES):
        started = time.monotonic()
        baseline = score_archive(
            scoring_config(archive, tmp_path / "baseline", tiny_artifact, NODE_LOSS_SETTINGS)
        )
        baseline_s = time.monotonic() - started

        output = tmp_path / "out"
        killer = WriterNodeKiller(ray_cluster, workers, output)
        killer.start()
        try:
            started = time.monotonic()
            summary = score_archive(scoring_config(archive, output, tiny_artifact, NODE_LOSS_SETTINGS))
            finished_at = time.monotonic()
        finally:
            killer.finished.set()
            killer.join(timeout=60)
    if killer.error is not None:
        raise killer.error
    assert killer.killed_at is not None, (
        f"the job ended before the writer's node could be removed: {killer.observed}"
    )
    assert killer.at_kill["committed"] < summary["partitions"], "the node was removed after the last commit"

    results, errors = records(output, "results"), records(output, "errors")
    ids = [r["record_id"] for r in results]
    writers = job_actors("PartitionWriter")
    report_drill(
        "batch_node_loss",
        records_in=summary["inputs"],
        records_out=len(results) + len(errors),
        results=len(results),
        unique=len(set(ids)),
        lost=expected_results - len(set(ids)),
        duplicates=len(ids) - len(set(ids)),
        error_rows=len(errors),
        partitions=summary["partitions"],
        committed_at_kill=killer.at_kill["committed"],
        staged_pieces_at_kill=killer.at_kill["staged_pieces"],
        actors_lost=killer.at_kill["actors_lost"],
        writer_restarts=max(a["restarts"] for a in writers),
        kill_to_completion_s=round(finished_at - killer.killed_at, 1),
        run_with_kill_s=round(finished_at - started, 1),
        run_without_kill_s=round(baseline_s, 1),
        replacement_node_added=False,
    )
    assert summary["reconciled"] and summary["partitions_missing"] == []
    assert summary["partitions_done"] == summary["partitions"] == baseline["partitions"]
    assert len(ids) == len(set(ids)) == expected_results
    assert sorted((e["image_id"], e["reason"]) for e in errors) == sorted(
        (e["image_id"], e["reason"]) for e in records(tmp_path / "baseline", "errors")
    )
    assert {e["reason"] for e in errors} == {"unreadable_image", "unreadable_dicom", "unsupported_format"}
    assert_same_results(results, records(tmp_path / "baseline", "results"))
    # the loss hit the writer while it held an incomplete partition, and Ray restarted it
    assert any("PartitionWriter" in name for name in killer.at_kill["actors_lost"])
    assert max(a["restarts"] for a in writers) >= 1
    assert not (output / "_staging").exists() and not list(output.rglob("*.tmp-*"))

    # `medisee score` again with the same arguments: the documented recovery; here nothing is left to do
    again = score_archive(scoring_config(archive, output, tiny_artifact, NODE_LOSS_SETTINGS))
    assert again["partitions_scored_this_run"] == 0 and again["reconciled"]
    assert (again["results"], again["errors"]) == (summary["results"], summary["errors"])


# ----- (b) the object store under pressure --------------------------------------------------------
def make_large_image_archive(folder: Path, images: int, side: int) -> None:
    """`images` PNGs of side x side pixels (8 phantoms, enlarged, under different names)."""
    folder.mkdir(parents=True)
    originals = []
    for index in range(min(images, 8)):
        path = folder / f"p{index:05d}.png"
        Image.fromarray(phantom.generate(seed=3, index=index, size=128)[0]).resize((side, side)).save(path)
        originals.append(path)
    for index in range(len(originals), images):
        shutil.copyfile(originals[index % len(originals)], folder / f"p{index:05d}.png")


def store_stats(address: str) -> dict[str, int]:
    """Object store counters summed over all nodes since they started: spilled to disk, and restored."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    stats = get_memory_info_reply(get_state_from_address(address)).store_stats
    return {
        "spilled": int(stats.spilled_bytes_total),
        "spilled_objects": int(stats.spilled_objects_total),
        "restored": int(stats.restored_bytes_total),
    }


def run_driver(archive: Path, output: Path, model: Path, address: str, logs: Path) -> dict:
    """`medisee score` in its own process joined to the cluster; its summary and peak RSS."""
    args = ["--input", str(archive), "--queries", QUERIES, "--model", str(model), "--output", str(output)]
    env = {**os.environ, "RAY_ADDRESS": address}
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medisee.cli", "score", *args, *PRESSURE_SETTINGS],
            env=env,
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = logs.with_suffix(".err").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(logs.with_suffix(".out").read_text().strip().splitlines()[-1])
    return {"summary": summary, "peak_rss_mib": usage.ru_maxrss / 1024}


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_several_times_the_object_store_spills_and_keeps_the_driver_small(
    ray_cluster, tiny_artifact, tmp_path
):
    import ray

    small_images = PRESSURE_IMAGES // 4
    archives = {"small": tmp_path / "small", "large": tmp_path / "large"}
    make_large_image_archive(archives["small"], small_images, PRESSURE_SIDE)
    make_large_image_archive(archives["large"], PRESSURE_IMAGES, PRESSURE_SIDE)
    add_worker(ray_cluster, num_cpus=2, object_store_memory=PRESSURE_STORE_BYTES)
    ray_cluster.wait_for_nodes()
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    hold_head_cpus(ray_cluster)  # all of the job on the worker with the small object store

    runs = {}
    for name, folder in archives.items():
        before = store_stats(ray_cluster.address)
        started = time.monotonic()
        output = tmp_path / f"out-{name}"
        runs[name] = run_driver(folder, output, tiny_artifact, ray_cluster.address, tmp_path / name)
        runs[name]["seconds"] = round(time.monotonic() - started, 1)
        after = store_stats(ray_cluster.address)
        runs[name]["spilled_mib"] = (after["spilled"] - before["spilled"]) / 2**20
        runs[name]["spilled_objects"] = after["spilled_objects"] - before["spilled_objects"]
        runs[name]["restored_mib"] = (after["restored"] - before["restored"]) / 2**20

    decoded_mib = PRESSURE_IMAGES * PRESSURE_SIDE**2 * 3 / 2**20
    # each decoded image passes the object store three times: decode -> MLLM -> decoder -> writer
    through_store_mib = 3 * decoded_mib
    large, small = runs["large"], runs["small"]
    rss_ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    report_drill(
        "batch_object_store_pressure",
        records_in=large["summary"]["inputs"],
        records_out=large["summary"]["results"] + large["summary"]["errors"],
        unique=len({r["record_id"] for r in records(tmp_path / "out-large", "results")}),
        object_store_mib=PRESSURE_STORE_BYTES / 2**20,
        decoded_images_mib=round(decoded_mib, 1),
        through_object_store_mib=round(through_store_mib, 1),
        spilled_mib={k: round(r["spilled_mib"], 1) for k, r in runs.items()},
        spilled_objects={k: r["spilled_objects"] for k, r in runs.items()},
        restored_mib={k: round(r["restored_mib"], 1) for k, r in runs.items()},
        driver_peak_rss_mib={k: round(r["peak_rss_mib"], 1) for k, r in runs.items()},
        driver_rss_ratio_4x_archive=round(rss_ratio, 3),
        seconds={k: r["seconds"] for k, r in runs.items()},
    )
    assert decoded_mib >= 3 * PRESSURE_STORE_BYTES / 2**20
    for name, images in (("small", small_images), ("large", PRESSURE_IMAGES)):
        summary = runs[name]["summary"]
        assert summary["reconciled"] and summary["errors"] == 0
        assert summary["results"] == images * 2
    assert len({r["record_id"] for r in records(tmp_path / "out-large", "results")}) == PRESSURE_IMAGES * 2
    assert large["spilled_mib"] > 0, "nothing was spilled: the job fitted in the object store"
    assert rss_ratio <= 1.3, runs
