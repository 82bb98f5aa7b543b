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
