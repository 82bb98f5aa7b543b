"""Stage one -> register -> stage two from the registered model -> register, through Ray Train and a
real MLflow server: the second model starts from the first one's weights and names it as its parent."""

import pytest
import torch

from medisee import tracking
from medisee.artifact.model_dir import load_model_dir
from medisee.train.trainer import run_training
from tests.train.runs import phantom_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHORT_RUN = [
    "trainer.num_workers=1",
    "trainer.max_steps=2",
    "trainer.eval_every=2",
    "trainer.checkpoint_every=2",
    "trainer.eval_limit=2",
    "trainer.warmup_steps=1",
    "trainer.log_every=1",
]


def test_stage_two_trains_from_a_registered_stage_one_model(ray_local, mlflow_server, tmp_path):
    tracking_uri, _ = mlflow_server
    stage1 = phantom_run_config(tmp_path / "one", tracking_uri, "stages", "stage-one", SHORT_RUN)
    first = run_training(stage1, register="stage-one", alias="candidate")
    parent_ref = "models:/stage-one@candidate"
    stage2 = phantom_run_config(
        tmp_path / "two",
        tracking_uri,
        "stages",
        "stage-two",
        [*SHORT_RUN, f"model.init_from={parent_ref}", "model.similarity_loss_weight=1.0"],
    )
    second = run_training(stage2, register="stage-two", alias="candidate")

    parent = load_model_dir(parent_ref, tracking_uri=tracking_uri)
    child = load_model_dir("models:/stage-two@candidate", tracking_uri=tracking_uri)
    assert child.manifest["parent"] == {
        "ref": parent_ref,
        "name": "stage-one",
        "version": "1",
        "run_id": first["mlflow_run_id"],
        "sha256": parent.sha256,
    }
    client = tracking.client_for(tracking_uri)
    tags = client.get_run(second["mlflow_run_id"]).data.tags
    assert tags["parent.ref"] == parent_ref and tags["parent.run_id"] == first["mlflow_run_id"]
    # a fresh run (step 1 onwards, its own optimiser) whose weights moved on from the parent's
    losses = client.get_metric_history(second["mlflow_run_id"], "train/loss")
    assert sorted({m.step for m in losses}) == [1, 2]
    a, b = parent.model.trainable_state_dict(), child.model.trainable_state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
