"""Several Ray nodes on this machine (ray.cluster_utils.Cluster) for the multi-node fault drills."""

from __future__ import annotations

import json

import pytest


@pytest.fixture()
def ray_cluster():
    """A head node with no CPUs (nothing but the GCS, the driver's and Serve's controllers land there);
    the test adds worker nodes with `cluster.add_node(num_cpus=..., resources={...})`, then joins with
    `ray.init(address=cluster.address)`. The session's local Ray is stopped first and started again after.
    """
    import ray
    from ray.cluster_utils import Cluster

    from medisee.raylib import ensure_ray

    had_local_ray = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local_ray:
            ensure_ray(num_cpus=2)


def report_drill(name: str, **figures) -> None:
    """One `DRILL {...}` line per drill (run with `pytest -s tests/ops` to see them; docs/operations.md
    records them)."""
    print("DRILL " + json.dumps({"drill": name, **figures}, default=str), flush=True)
