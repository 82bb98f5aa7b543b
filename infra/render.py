"""Write the RayService serveConfigV2 patches from serve/config.yaml (a string field: kustomize cannot
patch inside it). `python infra/render.py` rewrites them; `--check` exits 1 when one is stale.

  infra/k8s/base/rayservice-serve-config.yaml         serve/config.yaml as it is
  infra/k8s/overlays/prod/rayservice-serve-config.yaml  plus overlays/prod/serve-overrides.yaml
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
K8S = ROOT / "infra" / "k8s"
RAYSERVICE_NAME = "medisee"
PATCH_NAME = "rayservice-serve-config.yaml"


def merge(base: dict, changes: dict) -> dict:
    """`changes` over `base`, recursively for mappings; a None value removes the key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_deployment_overrides(config: dict, overrides: dict[str, dict]) -> dict:
    config = copy.deepcopy(config)
    for app in config["applications"]:
        names = {d["name"] for d in app["deployments"]}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"overrides for deployments that {app['name']!r} lacks: {sorted(unknown)}")
        app["deployments"] = [merge(d, overrides.get(d["name"], {})) for d in app["deployments"]]
    return config


def serve_configs() -> dict[Path, dict]:
    """The Serve config each patch embeds, by the patch's path."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    prod = yaml.safe_load((K8S / "overlays" / "prod" / "serve-overrides.yaml").read_text())
    return {
        K8S / "base" / PATCH_NAME: config,
        K8S / "overlays" / "prod" / PATCH_NAME: with_deployment_overrides(config, prod["deployments"]),
    }


def patch_text(config: dict) -> str:
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=float("inf"))
    return (
        "# Written by `python infra/render.py` from serve/config.yaml: edit those, not this file.\n"
        "apiVersion: ray.io/v1\n"
        "kind: RayService\n"
        f"metadata:\n  name: {RAYSERVICE_NAME}\n"
        "spec:\n  serveConfigV2: |\n" + "".join(f"    {line}\n" for line in body.splitlines())
    )


def rendered() -> dict[Path, str]:
    return {path: patch_text(config) for path, config in serve_configs().items()}


def main(argv: list[str]) -> int:
    stale = [path for path, text in rendered().items() if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run python infra/render.py)")
        return 1 if stale else 0
    for path, text in rendered().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
