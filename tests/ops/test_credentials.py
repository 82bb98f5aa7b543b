"""Credentials stay out of Ray's runtime env and job metadata; auth is disabled only for a local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from medisee import raylib

SECRET_KEY_ID = "AKIAEXAMPLEDRIVERONLY"
SECRET_KEY = "driver-only-secret-do-not-ship"

JOB = """
import json, os, ray
from medisee.raylib import ensure_ray

ensure_ray()

@ray.remote(num_cpus=0)
def seen_by_worker():
    return {
        "runtime_env": ray.get_runtime_context().runtime_env,
        "key_id": os.environ.get("AWS_ACCESS_KEY_ID"),
        "endpoint": os.environ.get("MEDISEE_S3_ENDPOINT"),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    }

print("RESULT " + json.dumps({
    "worker": ray.get(seen_by_worker.remote()),
    "driver_auth_mode": os.environ.get("RAY_AUTH_MODE"),
}))
"""


def job_records(address: str) -> list[str]:
    """Every job the GCS knows, in protobuf text form (runtime env, metadata, entrypoint included)."""
    import ray
    from ray.core.generated import gcs_pb2

    ray.init(address=address, logging_level="ERROR")
    try:
        accessor = ray._private.state.state._connect_and_get_accessor()
        table = accessor.get_job_table(skip_submission_job_info_field=False, skip_is_running_tasks_field=True)
        return [str(gcs_pb2.JobTableData.FromString(entry)) for entry in table]
    finally:
        ray.shutdown()


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_joining_a_cluster_ships_no_credentials(ray_cluster):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env |= {
        "RAY_ADDRESS": ray_cluster.address,
        "AWS_ACCESS_KEY_ID": SECRET_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "MEDISEE_S3_ENDPOINT": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-c", JOB], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    worker = result["worker"]
    assert worker["endpoint"] == "http://127.0.0.1:9"  # settings travel
    assert worker["key_id"] != SECRET_KEY_ID  # the node's own environment, not the driver's
    assert SECRET_KEY_ID not in json.dumps(worker["runtime_env"])
    assert result["driver_auth_mode"] is None  # joining RAY_ADDRESS: auth not switched off by us

    records = job_records(ray_cluster.address)
    assert any("MEDISEE_S3_ENDPOINT" in record for record in records)  # the job's runtime env is there
    for record in records:
        assert SECRET_KEY_ID not in record and SECRET_KEY not in record


def test_worker_env_forwards_settings_only(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    monkeypatch.setenv("MEDISEE_S3_ENDPOINT", "http://s3.internal:9000")
    env = raylib.worker_env()
    assert env["MEDISEE_S3_ENDPOINT"] == "http://s3.internal:9000"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_MODE"} & set(env)


@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_auth_is_disabled_only_for_a_local_ray(monkeypatch, address):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    raylib.apply_env_defaults()
    assert os.environ.get("RAY_AUTH_MODE") == (None if address else "disabled")
