"""infra/cluster-aws.yaml: valid for Ray's cluster launcher, consistent with the image and the
KubeRay manifests, and without credentials (instance roles only)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.infra.helpers import (
    INFRA,
    SECRET_LIKE,
    dockerfile_instructions,
    load_render_module,
    makefile_install,
    pip_install,
    ray_serve_flags,
    undersized,
    with_change,
)

LAUNCHER = INFRA / "cluster-aws.yaml"


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def schema_errors(config: dict) -> list[str]:
    return [e.message for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(config)]


def docker_env(config: dict) -> dict[str, str]:
    words = shlex.split(" ".join(config["docker"]["run_options"]))
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word in ("--env", "-e"))


def test_matches_rays_cluster_config_schema():
    assert schema_errors(launcher()) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("max_worker", 4),  # misspelt top-level key
        ("available_node_types.ray.worker.cpu", {"node_config": {}}),  # no resources
        ("docker.pull_before_run", "yes"),
    ],
)
def test_schema_check_catches_a_broken_config(path, value):
    config = launcher()
    if path.startswith("available_node_types."):
        config["available_node_types"]["ray.worker.cpu"] = value
    else:
        config = with_change(config, path, value)
    assert schema_errors(config) != []


def test_rays_own_validation_accepts_it():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))


def test_same_ray_image_as_the_dockerfile():
    (base,) = [a for k, a in dockerfile_instructions((INFRA / "Dockerfile").read_text()) if k == "FROM"]
    config = launcher()
    assert config["docker"]["image"] == base
    assert f":{ray.__version__}-" in base
    assert not {"head_image", "worker_image"} & config["docker"].keys()


def test_nodes_run_serve_as_a_local_ray_does_with_token_auth():
    env = docker_env(launcher())
    flags = ray_serve_flags()
    assert {k: env.get(k) for k in flags} == flags
    assert env["RAY_AUTH_MODE"] == "token"
    # instance-role credentials come from the metadata service, which the local defaults switch off
    assert env["AWS_EC2_METADATA_DISABLED"] == "false"


def test_setup_installs_the_package_as_the_image_and_make_do():
    config = launcher()
    installs = [pip_install(c) for c in config["setup_commands"] if "pip install" in c]
    assert len(installs) == 1
    make = makefile_install()
    assert installs[0]["constraints"] == make["constraints"]
    assert installs[0]["specs"] == ["."]
    assert "/home/ray/medisee" in config["file_mounts"]
    assert config["file_mounts"]["/home/ray/medisee"] == "."
    assert {".venv", ".git", ".medisee"} <= set(config["rsync_exclude"])


def test_no_credentials_only_instance_profiles():
    config = launcher()
    text = LAUNCHER.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not [k for k in docker_env(config) if SECRET_LIKE.search(k)]
    assert "ssh_private_key" not in config["auth"]
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Name"].startswith("medisee-ray-"), name
    # the Ray token is read on the node with the instance role, never written here
    assert any("~/.ray/auth_token" in c and "secretsmanager" in c for c in config["setup_commands"])


def test_gpu_workers_autoscale_and_hold_the_prod_serve_config():
    config = launcher()
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in workers.values())
    assert config["max_workers"] >= sum(v["max_workers"] for v in workers.values())
    node_groups = {
        k: ({r: float(n) for r, n in v["resources"].items()}, v["max_workers"]) for k, v in workers.items()
    }
    assert sum(offered.get("GPU", 0) > 0 for offered, _ in node_groups.values()) >= 2
    render = load_render_module()
    prod = render.serve_configs()[render.K8S / "overlays" / "prod" / render.PATCH_NAME]
    assert undersized(prod["applications"][0]["deployments"], node_groups) == []
