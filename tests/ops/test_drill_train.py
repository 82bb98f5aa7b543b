"""Drill: an elastic training run on 2 nodes loses one mid-run and finishes on the node left.

Each worker node holds one training slot (a custom resource), so the 2 workers sit on 2 nodes. Once
a checkpoint exists, one node is removed; Ray Train restarts the worker group on the capacity left
(1 worker) and the recipe resumes from the latest checkpoint with twice the gradient accumulation,
ending at the configured step count in the same MLflow run.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from medisee.model.checkpoint import read_torch
from medisee.train.checkpoints import list_checkpoints
from medisee.train.trainer import run_training
from tests.ops.conftest import add_worker, report_drill
from tests.train.runs import phantom_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOT = "medisee_train_slot"  # one per worker node: one training worker per node
# A checkpoint at step 2, the node removed once step 3 is logged, steps 3-8 on the node left: the
# drill's claims need no more steps, and each costs ~2 s here.
MAX_STEPS = 8
CHECKPOINT_EVERY = 2
EXPERIMENT, RUN_NAME = "drill-train", "drill-node-loss"


def test_training_resumes_on_the_node_left_after_losing_one(ray_cluster, mlflow_server, tmp_path):
    import ray
    from mlflow import MlflowClient

    nodes = [add_worker(ray_cluster, num_cpus=1, resources={SLOT: 1}) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    ray.init(address=ray_cluster.address, logging_level="WARNING")

    tracking_uri, _ = mlflow_server
    cfg = phantom_run_config(
        tmp_path,
        tracking_uri,
        EXPERIMENT,
        RUN_NAME,
        [
            "trainer.num_workers=2",
            "trainer.min_workers=1",
            f"trainer.resources_per_worker={{{SLOT}: 1}}",
            f"trainer.max_steps={MAX_STEPS}",
            f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
            f"trainer.eval_every={MAX_STEPS}",
            "trainer.eval_limit=4",
            "trainer.log_every=1",
            "trainer.warmup_steps=2",
            # Ray Train sees the lost node's resources for up to ~20 s after the loss (its autoscaling
            # coordinator refreshes them every 20 s) and meanwhile retries 2 workers, each try ending
            # after this timeout; a try that times out is retried, at the start too.
            "trainer.worker_start_timeout_s=5",
        ],
    )

    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(run_training, cfg)
        first_step = wait_for_checkpoint(cfg, training)
        wait_for_step(MlflowClient(tracking_uri), first_step + 1, training)  # work the loss will undo
        removed_at = time.time()
        ray_cluster.remove_node(nodes[0])
        result = training.result(timeout=600)

    client = MlflowClient(tracking_uri)
    run_id = result["mlflow_run_id"]
    assert run_named(client, RUN_NAME).info.run_id == run_id  # one run, across the restart
    workers = client.get_metric_history(run_id, "workers")
    before = [m for m in workers if m.timestamp < removed_at * 1000]
    after = [m for m in workers if m.value == 1]
    assert before and {m.value for m in before} == {2}
    assert after and min(m.timestamp for m in after) >= removed_at * 1000

    resumes = client.get_metric_history(run_id, "resumed_from_step")
    assert len(resumes) == 1  # one restart, and it did not start from scratch
    resumed_from = int(resumes[0].value)
    steps_before_loss = max(m.step for m in before)
    assert first_step <= resumed_from <= steps_before_loss and resumed_from % CHECKPOINT_EVERY == 0
    assert min(m.step for m in after) == resumed_from + 1  # the steps after the checkpoint are redone
    tags = client.get_run(run_id).data.tags
    assert tags["checkpoint.resumed_from"].endswith(f"step-{resumed_from:08d}.pt")

    losses = client.get_metric_history(run_id, "train/loss")
    assert {m.step for m in losses} == set(range(1, MAX_STEPS + 1))
    assert result["checkpoint"].endswith(f"step-{MAX_STEPS:08d}.pt")
    final = read_torch(result["checkpoint"])
    assert final["step"] == MAX_STEPS and final["scheduler"]["last_epoch"] == MAX_STEPS
    assert len(final["rng"]) == 1  # written by the single worker left

    report_drill(
        "train_node_loss",
        steps_before_loss=steps_before_loss,
        resumed_from_step=resumed_from,
        steps_redone=steps_before_loss - resumed_from,
        workers_before=2,
        workers_after=1,
        recovery_s=round(min(m.timestamp for m in after) / 1000 - removed_at, 1),
        final_steps=final["step"],
        max_steps=MAX_STEPS,
    )


def wait_for_checkpoint(cfg, training, timeout: float = 300.0) -> int:
    """The step of the first checkpoint the run writes (its folder polled while the run trains)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if training.done():
            training.result()  # raises the training error, if any
            pytest.fail("training finished before a node could be removed")
        found = list_checkpoints(cfg, None)
        if found:
            return found[0][0]
        time.sleep(0.2)
    pytest.fail(f"no checkpoint within {timeout}s")


def wait_for_step(client, step: int, training, timeout: float = 120.0) -> None:
    """Until the run has logged `step` to MLflow."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if training.done():
            training.result()
            pytest.fail("training finished before a node could be removed")
        run = run_named(client, RUN_NAME)
        if run and any(m.step >= step for m in client.get_metric_history(run.info.run_id, "train/loss")):
            return
        time.sleep(0.3)
    pytest.fail(f"step {step} not logged within {timeout}s")


def run_named(client, name: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) <= 1
    return runs[0] if runs else None
