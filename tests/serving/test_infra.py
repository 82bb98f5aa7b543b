"""The KubeRay RayService embeds the same Serve config as serve/config.yaml."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_rayservice_embeds_the_serve_config():
    service = yaml.safe_load((ROOT / "infra" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert embedded["applications"] == config["applications"]
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == __import__("ray").__version__


def test_rayservice_containers_run_serve_as_a_local_ray_does():
    """Serve's mode flags are read when a Serve process starts: every container sets those a local
    Ray gets from medisee.raylib."""
    from medisee.raylib import RAY_ENV_DEFAULTS

    service = yaml.safe_load((ROOT / "infra" / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    serve_flags = {k: v for k, v in RAY_ENV_DEFAULTS.items() if k.startswith("RAY_SERVE_")}
    assert serve_flags
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in serve_flags} == serve_flags
