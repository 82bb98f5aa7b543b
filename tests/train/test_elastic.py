"""The elastic worker range: config, Ray Train's scaling settings, and a step schedule that does not
depend on how many workers are left (same global batch, same data position, same step count)."""

from __future__ import annotations

import os

import pytest
import torch

from medisee.config import ConfigError, load_config, resume_differences
from medisee.train import recipe
from medisee.train.recipe import RecipeState, micro_batches_per_worker
from medisee.train.trainer import (
    WORKER_START_TIMEOUT_ENV,
    worker_range,
    worker_resources,
    worker_start_timeout,
)


def trainer_cfg(*overrides: str):
    return load_config("tiny", list(overrides)).trainer


def test_a_fixed_group_by_default_and_a_range_with_min_workers():
    assert worker_range(trainer_cfg("trainer.num_workers=4")) == 4
    assert worker_range(trainer_cfg("trainer.num_workers=4", "trainer.min_workers=2")) == (2, 4)


def test_ray_train_reads_the_range_as_elastic():
    from ray.train import ScalingConfig

    t = trainer_cfg(
        "trainer.num_workers=3", "trainer.min_workers=1", "trainer.resources_per_worker={slot: 1}"
    )
    scaling = ScalingConfig(
        num_workers=worker_range(t),
        resources_per_worker=worker_resources(t),
        elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
    )
    assert scaling.elasticity_enabled and (scaling.min_workers, scaling.max_workers) == (1, 3)
    assert scaling._resources_per_worker_not_none == {"CPU": 0.5, "slot": 1.0}
    assert not ScalingConfig(num_workers=worker_range(trainer_cfg())).elasticity_enabled


def test_worker_range_and_resources_are_checked():
    with pytest.raises(ConfigError, match=r"min_workers=3 exceeds trainer.num_workers=2"):
        trainer_cfg("trainer.min_workers=3")
    with pytest.raises(ConfigError, match="trainer.min_workers"):
        trainer_cfg("trainer.min_workers=0")
    with pytest.raises(ConfigError, match=r"set CPU through trainer.cpus_per_worker"):
        trainer_cfg("trainer.resources_per_worker={CPU: 2}")


def test_a_resume_may_change_the_worker_range():
    saved = load_config("tiny")
    resized = load_config(
        "tiny",
        [
            "trainer.num_workers=8",
            "trainer.min_workers=2",
            "trainer.resources_per_worker={slot: 1}",
            "trainer.worker_start_timeout_s=15",
            "trainer.elastic_resize_interval_s=30",
        ],
    )
    assert resume_differences(saved, resized) == []


@pytest.mark.parametrize(
    ("accum", "num_workers", "world", "expected"),
    [(1, 2, 2, 1), (1, 2, 1, 2), (2, 4, 2, 4), (3, 4, 3, 4), (1, 4, 3, 2), (1, 1, 1, 1)],
)
def test_fewer_workers_accumulate_more_micro_batches(accum, num_workers, world, expected):
    t = trainer_cfg(f"trainer.grad_accum_steps={accum}", f"trainer.num_workers={num_workers}")
    assert micro_batches_per_worker(t, world) == expected
    global_batch = expected * world
    assert global_batch >= accum * num_workers  # never a smaller step than the configured one
    if (accum * num_workers) % world == 0:
        assert global_batch == accum * num_workers  # exact whenever the world divides it


def test_the_worker_start_timeout_reaches_ray_train_during_fit_only(monkeypatch):
    monkeypatch.delenv(WORKER_START_TIMEOUT_ENV, raising=False)
    with worker_start_timeout(12.5):
        assert os.environ[WORKER_START_TIMEOUT_ENV] == "12.5"
    assert WORKER_START_TIMEOUT_ENV not in os.environ
    monkeypatch.setenv(WORKER_START_TIMEOUT_ENV, "90")
    with worker_start_timeout(None):
        assert os.environ[WORKER_START_TIMEOUT_ENV] == "90"  # the operator's own setting stays
    with worker_start_timeout(5):
        pass
    assert os.environ[WORKER_START_TIMEOUT_ENV] == "90"


class FakeShard:
    """A data shard whose micro-batches are numbered 0, 1, 2, ... on every pass."""

    def iter_batches(self, **_):
        yield from ({"n": i} for i in range(1000))


def recipe_state(world: int, *overrides: str) -> RecipeState:
    cfg = load_config("tiny", ["trainer.num_workers=2", "trainer.min_workers=1", *overrides])
    module = torch.nn.Linear(2, 2)
    module.text = None
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # rank 1: no MLflow logging from these bookkeeping tests
    return RecipeState(cfg, None, 1, world, module, module, optimizer, scheduler, eval_rows=[])


@pytest.fixture()
def fake_ray_train(monkeypatch):
    """Ray Train's shard and report, and the model step, replaced by recorders."""
    import ray.train

    seen = {"micro_batches": [], "reports": [], "checkpoints": []}
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: FakeShard())
    monkeypatch.setattr(ray.train, "report", lambda metrics: seen["reports"].append(metrics))
    monkeypatch.setattr(recipe, "collate", lambda raw, text, device: [raw["n"]])  # 1 sample

    def step(model, module, optimizer, scheduler, micro, clip, scaler=None):
        seen["micro_batches"].append([batch[0] for batch in micro])
        optimizer.step()
        scheduler.step()
        return {"loss": 1.0}

    monkeypatch.setattr(recipe, "train_step", step)
    monkeypatch.setattr(recipe, "evaluate", lambda state: {"dice": 0.5})
    monkeypatch.setattr(
        recipe, "save_checkpoint", lambda state, metric=None: seen["checkpoints"].append(state.step)
    )
    return seen


def test_a_resume_on_fewer_workers_continues_at_the_same_data_position(fake_ray_train):
    """2 workers took 3 steps of 1 micro-batch each (6 global micro-batches): 1 worker resumes at its
    micro-batch 6 and takes 2 per step."""
    state = recipe_state(1)
    state.step, state.step_in_epoch = 3, 3
    stream = recipe.batch_stream(state)
    assert [next(stream)[0] for _ in range(4)] == [6, 7, 8, 9]


def test_a_run_resumed_on_fewer_workers_ends_at_the_same_step_with_the_same_global_batch(fake_ray_train):
    overrides = [
        "trainer.max_steps=10",
        "trainer.checkpoint_every=4",
        "trainer.eval_every=100",
        "trainer.log_every=1",
    ]
    state = recipe_state(1, *overrides)
    state.step, state.step_in_epoch = 4, 4  # as loaded from a checkpoint the 2-worker group wrote
    state.scheduler.last_epoch = 4
    recipe.train(state)
    seen = fake_ray_train
    assert state.step == 10 and state.scheduler.last_epoch == 10
    assert len(seen["micro_batches"]) == 6  # steps 5..10, nothing more
    assert seen["micro_batches"][0] == [8, 9]  # 2 micro-batches per step, from the right position
    assert all(len(m) == 2 for m in seen["micro_batches"])
    assert seen["checkpoints"] == [8, 10]  # the schedule of the uninterrupted run; the last step saves
    assert [r["step"] for r in seen["reports"]] == list(range(5, 11))
    assert {r["workers"] for r in seen["reports"]} == {1}
