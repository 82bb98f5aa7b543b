"""infra/cluster-aws.yaml: valid for Ray's cluster launcher, consistent with the image and the
KubeRay manifests, and without credentials (instance roles only)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.infra.helpers import (
    INFRA,
    ROOT,
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


def api_keys_file() -> str:
    from medisee.serving.args import AppArgs

    (app,) = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"]
    return AppArgs.model_validate_json(app["runtime_env"]["env_vars"]["MEDISEE_SERVE_ARGS"]).api_keys_file


def refresh_script(tmp_path: Path) -> Path:
    """The host's key-refresh script as initialization_commands writes it, with its folder moved to
    tmp_path and `sudo tee` replaced by a plain write."""
    (write, *_) = launcher()["initialization_commands"]
    script = tmp_path / "medisee-api-keys"
    command = write.replace("sudo tee /usr/local/bin/medisee-api-keys", f"tee {script}")
    subprocess.run(["bash", "-c", command], check=True, timeout=30)
    folder = str(Path(api_keys_file()).parent)
    script.write_text(script.read_text().replace(f"dir={folder}", f"dir={tmp_path / 'keys-dir'}"))
    (tmp_path / "keys-dir").mkdir()
    return script


def run_with_aws(script: Path, tmp_path: Path, aws_body: str) -> subprocess.CompletedProcess:
    """Runs the script with a stand-in `aws` command first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "aws").write_text(f"#!/bin/sh\n{aws_body}\n")
    (bin_dir / "aws").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)


def test_every_node_mounts_the_serve_api_keys_file_read_only():
    """serve/config.yaml names the keys file; each node's container sees its folder read-only, from a
    host folder that a cron job refreshes from Secrets Manager (rotation without a restart)."""
    folder = str(Path(api_keys_file()).parent)
    words = shlex.split(" ".join(launcher()["docker"]["run_options"]))
    volumes = [words[i + 1] for i, word in enumerate(words) if word in ("--volume", "-v")]
    assert volumes == [f"{folder}:{folder}:ro"]
    commands = " ".join(launcher()["initialization_commands"])
    assert "--secret-id medisee/serve-api-keys" in commands
    assert "*/5 * * * * root /usr/local/bin/medisee-api-keys" in commands
    assert f"install -d -m 0755 {folder}" in commands


@pytest.mark.skipif(os.geteuid() != 0, reason="the script gives the file to uid 1000 (chown needs root)")
def test_key_refresh_replaces_the_file_whole_and_keeps_it_on_a_failed_read(tmp_path):
    script = refresh_script(tmp_path)
    keys = tmp_path / "keys-dir" / "keys"
    assert run_with_aws(script, tmp_path, "printf 'k1\\nk2\\n'").returncode == 0
    assert keys.read_text() == "k1\nk2\n"
    info = keys.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (1000, 100, 0o440)
    # a failed or empty read never replaces the keys in use
    assert run_with_aws(script, tmp_path, "echo denied >&2; exit 255").returncode != 0
    assert run_with_aws(script, tmp_path, "true").returncode != 0
    assert keys.read_text() == "k1\nk2\n"
    assert run_with_aws(script, tmp_path, "echo k3").returncode == 0
    assert keys.read_text() == "k3\n"
