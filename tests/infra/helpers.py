"""Reading the infra/ files: Dockerfile instructions, pip install lines, kustomize renders, Ray pod
templates, and the capacity a set of Ray nodes offers a Serve deployment."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/prod")
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
SECRET_LIKE = re.compile(r"(^|_)(KEYS?|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE)


def load_render_module():
    spec = importlib.util.spec_from_file_location("infra_render", INFRA / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ray_serve_flags() -> dict[str, str]:
    from medisee.raylib import RAY_ENV_DEFAULTS

    return {k: v for k, v in RAY_ENV_DEFAULTS.items() if k.startswith("RAY_SERVE_")}


# ---- Dockerfile and pip


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # also inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def pip_install(command: str) -> dict:
    """The constraints file, requirement specs and flags of the first `pip install` in a shell command."""
    words = shlex.split(command)
    start = next(i for i in range(len(words) - 1) if words[i : i + 2] == ["pip", "install"]) + 2
    out = {"constraints": None, "specs": [], "editable": False, "flags": []}
    args = iter(words[start:])
    for word in args:
        if word in ("&&", ";", "|"):
            break
        if word in ("-c", "--constraint"):
            out["constraints"] = next(args)
        elif word in ("-e", "--editable"):
            out["editable"] = True
            out["specs"].append(next(args))
        elif word.startswith("-"):
            out["flags"].append(word)
        else:
            out["specs"].append(word)
    return out


def split_extras(spec: str) -> tuple[str, set[str]]:
    base, _, extras = spec.partition("[")
    return base, {e.strip() for e in extras.rstrip("]").split(",") if e.strip()}


def makefile_install() -> dict:
    """The `pip install` of `make setup`."""
    line = next(
        line
        for line in (ROOT / "Makefile").read_text().splitlines()
        if "pip install" in line and " -c " in line
    )
    return pip_install(line.replace("$(BIN)/python -m ", "").strip())


# ---- KubeRay manifests


def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def kustomize(directory: str) -> tuple[dict, ...]:
    """`kubectl kustomize infra/k8s/<directory>`, parsed."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def base_files() -> list[dict]:
    """The base's resources as written (no kustomize): for checks that must run without kubectl."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [
        doc
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / "base" / name).read_text())
        if doc
    ]


def merge_patch(doc: dict, patch: dict) -> dict:
    out = copy.deepcopy(doc)
    for key, value in patch.items():
        out[key] = merge_patch(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def base_documents() -> list[dict]:
    """What `kubectl kustomize infra/k8s/base` gives, read without kubectl: the resources with the
    base's file patches merged in, and its generated ConfigMaps (names without the content hash)."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    docs = base_files()
    for entry in kustomization.get("patches", []):
        patch = yaml.safe_load((K8S / "base" / entry["path"]).read_text())
        docs = [
            merge_patch(d, patch)
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
            else d
            for d in docs
        ]
    maps = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        for name, data in base_config_maps().items()
    ]
    return maps + docs


def cluster_spec(doc: dict) -> dict | None:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    spec = doc.get("spec", {})
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }.get(doc.get("kind"))


def groups(doc: dict) -> list[dict]:
    spec = cluster_spec(doc) or {}
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])] if spec else []


def ray_containers(doc: dict) -> Iterator[dict]:
    for group in groups(doc):
        yield from group["template"]["spec"]["containers"]


def container_env(container: dict, config_maps: dict[str, dict]) -> dict[str, str | None]:
    """Literal environment of a container: its ConfigMaps (envFrom), then its env (None: from a Secret)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def config_maps(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def base_config_maps() -> dict[str, dict]:
    """The base's generated ConfigMaps by their unhashed names, read from kustomization.yaml."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return {
        gen["name"]: dict(literal.split("=", 1) for literal in gen.get("literals", []))
        for gen in kustomization.get("configMapGenerator", [])
    }


def with_change(doc: dict, path: str, value) -> dict:
    """A copy of `doc` with the dotted `path` (list indices as numbers) set to `value`."""
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


# ---- capacity: how many replicas of a Serve deployment a set of nodes can hold


def cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def k8s_group_resources(group: dict) -> dict[str, float]:
    """The Ray resources one pod of a worker group offers."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    offered = {"CPU": cpu_quantity(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    params = group.get("rayStartParams", {})
    if "num-cpus" in params:
        offered["CPU"] = float(params["num-cpus"])
    if "resources" in params:  # a JSON object, quoted once more for the shell: '"{\"x\": 1}"'
        offered.update({k: float(v) for k, v in json.loads(json.loads(params["resources"])).items()})
    return offered


def replica_needs(deployment: dict) -> dict[str, float]:
    options = deployment.get("ray_actor_options", {})
    needs = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0))}
    needs.update({k: float(v) for k, v in options.get("resources", {}).items()})
    return {k: v for k, v in needs.items() if v > 0}


def replicas_per_node(needs: dict[str, float], offered: dict[str, float]) -> int:
    return min(math.floor(offered.get(name, 0) / amount + 1e-9) for name, amount in needs.items())


def max_replicas(deployment: dict) -> int:
    return deployment.get("autoscaling_config", {}).get("max_replicas") or deployment.get("num_replicas", 1)


def undersized(deployments: list[dict], node_groups: dict[str, tuple[dict[str, float], int]]) -> list[str]:
    """Deployments whose max replicas cannot all be placed on the nodes that offer every resource they
    ask for (each group: resources per node, max nodes), ignoring what other deployments take."""
    problems = []
    for deployment in deployments:
        needs = replica_needs(deployment)
        room = sum(replicas_per_node(needs, offered) * count for offered, count in node_groups.values())
        if room < max_replicas(deployment):
            problems.append(f"{deployment['name']}: room for {room} of {max_replicas(deployment)} replicas")
    return problems
