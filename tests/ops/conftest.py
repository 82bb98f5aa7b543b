"""Several Ray nodes on this machine (ray.cluster_utils.Cluster) for the multi-node fault drills."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import free_port

AGENT_PORTS = (
    "metrics_agent_port",
    "metrics_export_port",
    "dashboard_agent_listen_port",
    "runtime_env_agent_port",
)


# The GCS declares a node dead after `threshold` failed health checks in a row. Ray's default period
# (3 s) makes that ~15 s for a killed node; checked every second it is ~5 s. A live raylet that is
# merely slow still has to miss 5 checks of 10 s each (Ray's timeout) in a row, as with the default.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


def agent_ports() -> dict[str, int]:
    """A node's agents' ports given up front: otherwise its raylet waits for the dashboard agent to
    write them and aborts after ~20 s when a loaded machine slows the agent's start-up."""
    return {name: free_port() for name in AGENT_PORTS}


def add_worker(cluster, **options):
    return cluster.add_node(**agent_ports(), **options)


@pytest.fixture()
def ray_cluster(monkeypatch):
    """A head node with one CPU (the GCS, the driver's work and Serve's and Train's controllers); the
    test adds worker nodes with `add_worker(cluster, num_cpus=..., resources={...})`, then joins with
    `ray.init(address=cluster.address)`. The session's local Ray is stopped first and started again after.

    RAY_ADDRESS names this cluster while it runs: processes of Ray's own that connect with a bare
    `ray.init()` (Ray Train's placement-group cleaner) would otherwise pick whichever of the Ray
    instances on this machine started last.
    """
    import ray
    from ray.cluster_utils import Cluster

    from medisee.raylib import ensure_ray

    had_local_ray = ray.is_initialized()
    ray.shutdown()
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "gcs_server_port": port,
            "_system_config": HEALTH_CHECKS,
            **agent_ports(),
        },
    )
    try:
        assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, port)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        monkeypatch.delenv("RAY_ADDRESS")
        if had_local_ray:
            ensure_ray(num_cpus=2)


def report_drill(name: str, **figures) -> None:
    """One `DRILL {...}` line per drill (run with `pytest -s tests/ops` to see them; docs/operations.md
    records them)."""
    print("DRILL " + json.dumps({"drill": name, **figures}, default=str), flush=True)
