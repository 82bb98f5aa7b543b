"""The KubeRay manifests (infra/k8s): valid against the CRDs, the Serve config embedded as
serve/config.yaml says, overlays changing only what they mean to, and no credentials anywhere."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess

import jsonschema
import pytest
import ray
import yaml

from medisee.config import load_config
from tests.infra.helpers import (
    K8S,
    KUSTOMIZATIONS,
    ROOT,
    SECRET_LIKE,
    base_documents,
    base_files,
    cluster_spec,
    config_maps,
    container_env,
    dockerfile_instructions,
    groups,
    k8s_group_resources,
    kubectl,
    load_render_module,
    ray_containers,
    ray_serve_flags,
    undersized,
    with_change,
)
from tests.infra.policies import all_containers, operator_pods

RAY_KINDS = {"RayCluster", "RayJob", "RayService"}


def schema_errors(doc: dict, crd_schemas: dict) -> list[str]:
    schema = crd_schemas[f"{doc['apiVersion']} {doc['kind']}"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def ray_docs(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in RAY_KINDS]


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def embedded_serve_config(docs) -> dict:
    (service,) = by_kind(docs, "RayService").values()
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())


# ---- schema


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_rendered_manifest_matches_the_kuberay_crds(name, renders, crd_schemas):
    docs = ray_docs(renders[name])
    assert {d["kind"] for d in docs} == RAY_KINDS
    assert len(docs) == 4  # training job, batch-scoring job, service, interactive cluster
    for doc in docs:
        assert schema_errors(doc, crd_schemas) == [], f"{name}: {doc['kind']}/{doc['metadata']['name']}"


def test_base_files_match_the_kuberay_crds_without_kustomize(crd_schemas):
    docs = ray_docs(base_files())
    assert {d["kind"] for d in docs} == RAY_KINDS
    for doc in docs:
        assert schema_errors(doc, crd_schemas) == [], f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    [
        ("RayJob", "spec.shutdownAfterJobFinish", True, "shutdownAfterJobFinish"),  # misspelt field
        ("RayJob", "spec.backoffLimit", "two", "is not of type 'integer'"),
        ("RayCluster", "spec.authOptions.mode", "tokens", "is not one of"),
        ("RayService", "spec.rayClusterConfig.workerGroupSpecs.0.replicas", "1", "is not of type"),
        (
            "RayService",
            "spec.rayClusterConfig.headGroupSpec",
            {"rayStartParams": {}},
            "'template' is a required",
        ),
    ],
)
def test_schema_validation_catches_a_broken_manifest(kind, path, value, expected, crd_schemas):
    doc = next(d for d in base_files() if d["kind"] == kind)
    assert schema_errors(doc, crd_schemas) == []
    errors = schema_errors(with_change(doc, path, value), crd_schemas)
    assert any(expected in e for e in errors), errors


def test_kustomize_rejects_a_patch_aimed_at_a_moved_worker_group(tmp_path):
    """The overlays' JSON patches first test the group's name: a reordered base fails the render."""
    if kubectl() is None:
        pytest.skip("kubectl not found")

    def render_with_patch_for(group_name: str) -> subprocess.CompletedProcess:
        overlay = tmp_path / group_name
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(
            f"resources: [{os.path.relpath(K8S / 'base', overlay)}]\n"
            "patches:\n"
            "  - target: {kind: RayService, name: medisee}\n"
            "    patch: |\n"
            f"      - {{op: test, path: /spec/rayClusterConfig/workerGroupSpecs/0/groupName, value: {group_name}}}\n"
            "      - {op: replace, path: /spec/rayClusterConfig/workerGroupSpecs/0/maxReplicas, value: 9}\n"
        )
        return subprocess.run(
            [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
        )

    assert render_with_patch_for("cpu").returncode == 0
    wrong = render_with_patch_for("mllm-gpu")
    assert wrong.returncode != 0
    assert "testing value /spec/rayClusterConfig/workerGroupSpecs/0/groupName failed" in wrong.stderr


# ---- the Serve config


def test_generated_serve_config_patches_are_current():
    render = load_render_module()
    expected = render.rendered()
    assert {p.relative_to(K8S).as_posix() for p in expected} == {
        "base/rayservice-serve-config.yaml",
        "overlays/prod/rayservice-serve-config.yaml",
    }
    for path, text in expected.items():
        assert path.read_text() == text, f"{path} is stale: run python infra/render.py"


def test_base_rayservice_embeds_serve_config_yaml():
    patch = yaml.safe_load((K8S / "base" / "rayservice-serve-config.yaml").read_text())
    embedded = yaml.safe_load(patch["spec"]["serveConfigV2"])
    assert embedded == serve_config()
    assert embedded["applications"] == serve_config()["applications"]


def test_rendered_base_rayservice_embeds_serve_config_yaml(renders):
    assert embedded_serve_config(renders["base"]) == serve_config()
    assert embedded_serve_config(renders["overlays/dev"]) == serve_config()


def test_prod_serve_config_changes_only_the_listed_deployment_fields(renders):
    overrides = yaml.safe_load((K8S / "overlays" / "prod" / "serve-overrides.yaml").read_text())[
        "deployments"
    ]
    prod, base = embedded_serve_config(renders["overlays/prod"]), serve_config()
    assert {k: v for k, v in prod.items() if k != "applications"} == {
        k: v for k, v in base.items() if k != "applications"
    }
    (prod_app,), (base_app,) = prod["applications"], base["applications"]
    assert {k: v for k, v in prod_app.items() if k != "deployments"} == {
        k: v for k, v in base_app.items() if k != "deployments"
    }
    for prod_dep, base_dep in zip(prod_app["deployments"], base_app["deployments"], strict=True):
        changed = {k for k in prod_dep.keys() | base_dep.keys() if prod_dep.get(k) != base_dep.get(k)}
        assert changed == set(overrides[base_dep["name"]]), base_dep["name"]
        assert "num_replicas" not in prod_dep and prod_dep["autoscaling_config"]["max_replicas"] >= 1


def test_embedded_serve_configs_pass_serves_own_schema():
    from ray.serve.schema import ServeDeploySchema

    render = load_render_module()
    for config in render.serve_configs().values():
        ServeDeploySchema.model_validate(config)


def test_render_refuses_overrides_for_an_unknown_deployment():
    render = load_render_module()
    with pytest.raises(ValueError, match="Decodr"):
        render.with_deployment_overrides(serve_config(), {"Decodr": {"num_replicas": 2}})


def test_prod_gpu_worker_groups_hold_every_deployment_at_max_replicas(renders):
    docs = renders["overlays/prod"]
    (service,) = by_kind(docs, "RayService").values()
    workers = cluster_spec(service)["workerGroupSpecs"]
    node_groups = {g["groupName"]: (k8s_group_resources(g), g["maxReplicas"]) for g in workers}
    deployments = embedded_serve_config(docs)["applications"][0]["deployments"]
    assert undersized(deployments, node_groups) == []
    gpu_deployments = [d for d in deployments if d["ray_actor_options"].get("num_gpus", 0) > 0]
    assert {d["name"] for d in gpu_deployments} == {"MLLMDeployment", "DecoderDeployment"}
    # each GPU deployment has a group of its own (custom resource), never the CPU group
    for deployment in gpu_deployments:
        (custom,) = deployment["ray_actor_options"]["resources"]
        hosts = [name for name, (offered, _) in node_groups.items() if offered.get(custom)]
        assert len(hosts) == 1 and node_groups[hosts[0]][0]["GPU"] >= 1, deployment["name"]
    # and the check is live: half the MLLM group's pods are not enough
    smaller = dict(node_groups, **{"mllm-gpu": (node_groups["mllm-gpu"][0], 2)})
    assert undersized(deployments, smaller) == ["MLLMDeployment: room for 2 of 4 replicas"]


def test_rayservice_autoscales_and_upgrades_without_downtime(manifests):
    for docs in manifests.values():
        (service,) = by_kind(docs, "RayService").values()
        assert service["spec"]["upgradeStrategy"]["type"] == "NewCluster"
        spec = cluster_spec(service)
        assert spec["enableInTreeAutoscaling"] is True
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        (app,) = embedded_serve_config(docs)["applications"]
        ingress_model = next(d["user_config"]["model"] for d in app["deployments"] if d["name"] == "Ingress")
        assert serve_args(app).model == ingress_model
        for container in ray_containers(service):
            # the application's args come from its runtime_env, which a container's value would not override
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"MEDISEE_SERVE_ARGS", "MEDISEE_SERVE_MODEL"}


def serve_args(app: dict):
    """The AppArgs the application is built with (serve/app.py: AppArgs.from_env)."""
    from medisee.serving.args import AppArgs

    return AppArgs.model_validate_json(app["runtime_env"]["env_vars"]["MEDISEE_SERVE_ARGS"])


API_KEYS_SECRET = "medisee-api-keys"


def secret_mounts(pod_spec: dict, container: dict) -> dict[str, dict]:
    """mountPath -> the Secret volume mounted there (its `secret` field and the mount)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    return {
        m["mountPath"]: {**volumes[m["name"]]["secret"], "mount": m}
        for m in container.get("volumeMounts", [])
        if "secret" in volumes[m["name"]]
    }


def test_serve_config_names_the_api_keys_file_every_serve_container_mounts(manifests):
    """serve/config.yaml binds 0.0.0.0: its args name a keys file (never anonymous), and every
    RayService container mounts Secret medisee-api-keys there, as a directory: a subPath mount is
    never updated, and the application re-reads the file to take a rotated key without a restart."""
    (app,) = serve_config()["applications"]
    args = serve_args(app)
    assert args.api_keys_file and not getattr(args, "allow_anonymous", False)
    folder, _, file_name = args.api_keys_file.rpartition("/")
    for name, docs in manifests.items():
        (service,) = by_kind(docs, "RayService").values()
        for group in groups(service):
            pod = group["template"]["spec"]
            mounted = secret_mounts(pod, pod["containers"][0])[folder]
            assert mounted["secretName"] == API_KEYS_SECRET, name
            assert mounted["items"] == [{"key": "keys", "path": file_name}]
            assert not mounted.get("optional") and mounted["defaultMode"] & 0o077 == 0o040  # no others
            assert mounted["mount"]["readOnly"] is True and "subPath" not in mounted["mount"]


# ---- overlays


COMMON_CHANGES = [
    "*:metadata.namespace",
    "ConfigMap/medisee-env:metadata.name",
    "*.envFrom.*.configMapRef.name",
    "*.containers.*.image",
]
INTENDED_CHANGES = {
    "overlays/dev": [
        "ConfigMap/medisee-env:data.MEDISEE_S3_ENDPOINT",
        "RayJob/medisee-train:spec.entrypoint",
        "RayJob/medisee-train:spec.rayClusterSpec.workerGroupSpecs.0.*eplicas",
        "RayJob/medisee-train:spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.*",
        "RayJob/medisee-batch-infer:spec.entrypoint",
        "RayJob/medisee-batch-infer:spec.rayClusterSpec.workerGroupSpecs.[01].*eplicas",
        "RayService/medisee:spec.rayClusterConfig.workerGroupSpecs.[012].maxReplicas",
        "RayCluster/medisee-interactive:spec.workerGroupSpecs.[01].maxReplicas",
    ],
    "overlays/prod": [
        "RayService/medisee:spec.serveConfigV2",
        "RayService/medisee:spec.rayClusterConfig.workerGroupSpecs.0.*eplicas",
    ],
}


def flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix: node}
    out = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def flat_render(docs) -> dict[str, object]:
    out = {}
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "ConfigMap":
            name = re.sub(r"-[a-z0-9]{10}$", "", name)  # kustomize's content hash
        out.update({f"{doc['kind']}/{name}:{k}": v for k, v in flatten(doc).items()})
    return out


def differences(before, after) -> list[str]:
    old, new = flat_render(before), flat_render(after)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


@pytest.mark.parametrize("overlay", sorted(INTENDED_CHANGES))
def test_overlays_differ_from_the_base_only_where_intended(overlay, renders):
    differences_ = differences(renders["base"], renders[overlay])
    allowed = COMMON_CHANGES + INTENDED_CHANGES[overlay]
    unexpected = [d for d in differences_ if not any(fnmatch.fnmatchcase(d, p) for p in allowed)]
    assert unexpected == []
    unused = [
        p for p in INTENDED_CHANGES[overlay] if not any(fnmatch.fnmatchcase(d, p) for d in differences_)
    ]
    assert unused == []  # each intended change is really made


def test_the_base_read_without_kubectl_is_the_render(renders):
    """The fallback used when kubectl is missing (tests.infra.helpers.base_documents) reads the base as
    kustomize renders it, but for kustomize's labels and the ConfigMap's hashed name."""
    allowed = ["*.labels.*", "*.envFrom.*.configMapRef.name", "ConfigMap/medisee-env:metadata.name"]
    found = differences(base_documents(), renders["base"])
    assert found and [d for d in found if not any(fnmatch.fnmatchcase(d, p) for p in allowed)] == []


# ---- settings, images, versions


def test_every_container_sets_the_serve_flags_of_a_local_ray(manifests):
    flags = ray_serve_flags()
    assert flags
    for name, docs in manifests.items():
        maps = config_maps(docs)
        for doc in ray_docs(docs):
            for container in ray_containers(doc):
                env = container_env(container, maps)
                assert {k: env.get(k) for k in flags} == flags, f"{name}: {doc['metadata']['name']}"


def test_one_image_per_render_and_the_installed_ray_version(manifests):
    package_version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for name, docs in manifests.items():
        images = {c["image"] for pod in operator_pods(docs) for c in all_containers(pod.spec)}
        images.discard("(the head's image)")  # the autoscaler's, when autoscalerOptions names none
        assert len(images) == 1, f"{name}: {images}"
        assert images.pop().split("@")[0].rsplit(":", 1)[1].startswith(package_version), name
        for doc in ray_docs(docs):
            assert cluster_spec(doc)["rayVersion"] == ray.__version__
    for doc in ray_docs(base_files()):
        assert cluster_spec(doc)["rayVersion"] == ray.__version__


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_references(docs) -> list[str]:
    """Every image a render names: containers anywhere, and autoscalerOptions.image."""
    return [
        value
        for key, value in flat_render(docs).items()
        if re.search(r"\.(containers|initContainers|ephemeralContainers)\.\d+\.image$", key)
        or key.endswith("autoscalerOptions.image")
    ]


def test_prod_images_are_pinned_by_digest(renders):
    """A tag can be moved; the prod nodes pull exactly the image that was tested (kustomize `images:`
    with a digest in overlays/prod)."""
    images = image_references(renders["overlays/prod"])
    assert len(images) == 14  # 4 heads, 8 worker groups, 2 submitters
    assert [i for i in images if not DIGEST.search(i)] == []
    assert [i for i in image_references(renders["base"]) if DIGEST.search(i)] == []  # the check is live


def test_pods_run_as_the_images_non_root_user(manifests):
    """The uid and gid of the Dockerfile's USER (the image's own user owns its files; tests/infra's
    restricted-profile check covers the rest of the securityContext)."""
    (user,) = [
        a for k, a in dockerfile_instructions((ROOT / "infra" / "Dockerfile").read_text()) if k == "USER"
    ]
    uid, gid = (int(n) for n in user.split(":"))
    for docs in manifests.values():
        for pod in operator_pods(docs):
            context = pod.spec["securityContext"]
            assert (context["runAsNonRoot"], context["runAsUser"], context["runAsGroup"]) == (True, uid, gid)
            for container in all_containers(pod.spec):
                assert container["securityContext"].get("runAsUser", uid) == uid, pod.where


# ---- credentials and cluster access


def inline_secrets(docs) -> list[str]:
    """Credentials written into manifests: env vars or ConfigMap keys that look secret and carry a
    literal value, Secrets with data, and secret-looking variables in a job's runtime env or a Serve
    application's (Ray stores those with the job and shows them in the dashboard)."""
    found = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
            found.append(f"{where}: Secret with data")
        if doc["kind"] == "ConfigMap":
            found += [f"{where}: {k}" for k in doc.get("data", {}) if SECRET_LIKE.search(k)]
        for container in ray_containers(doc) if doc["kind"] in RAY_KINDS else []:
            found += [
                f"{where}: {e['name']}"
                for e in container.get("env", [])
                if SECRET_LIKE.search(e["name"]) and "value" in e
            ]
        runtime_env = yaml.safe_load(doc.get("spec", {}).get("runtimeEnvYAML") or "{}")
        found += [
            f"{where}: runtimeEnvYAML {k}" for k in runtime_env.get("env_vars", {}) if SECRET_LIKE.search(k)
        ]
        serve = yaml.safe_load(doc.get("spec", {}).get("serveConfigV2") or "{}")
        for app in serve.get("applications", []):
            found += [
                f"{where}: {app['name']} runtime_env {k}"
                for k in app.get("runtime_env", {}).get("env_vars", {})
                if SECRET_LIKE.search(k)
            ]
    return found


def test_no_credentials_inline(manifests):
    for name, docs in manifests.items():
        assert inline_secrets(docs) == [], name
        text = yaml.safe_dump_all(docs)
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)


def test_inline_secret_check_finds_a_literal_key():
    (service,) = [d for d in base_files() if d["kind"] == "RayService"]
    container = cluster_spec(service)["headGroupSpec"]["template"]["spec"]["containers"][0]
    leaky = with_change(
        service,
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.env",
        [
            *container.get("env", []),
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"},
        ],
    )
    (job,) = [d for d in base_files() if d["metadata"]["name"] == "medisee-train"]
    leaky_job = with_change(
        job, "spec.runtimeEnvYAML", "env_vars: {AWS_ACCESS_KEY_ID: x, AWS_DEFAULT_REGION: y}"
    )
    assert inline_secrets([leaky, leaky_job]) == [
        "RayService/medisee: AWS_SECRET_ACCESS_KEY",
        "RayJob/medisee-train: runtimeEnvYAML AWS_ACCESS_KEY_ID",
    ]


def container_secrets(pod_spec: dict, container: dict) -> set[str]:
    """The Secrets a container can read: envFrom, env valueFrom, and the Secret volumes it mounts."""
    names = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    names |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        names |= {volume["secret"]["secretName"]} if "secret" in volume else set()
        names |= {
            s["secret"]["name"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s
        }
    return names


S3, MLFLOW, JUDGE = "medisee-s3", "medisee-mlflow", "medisee-judge"
# What each workload's Ray containers use (KubeRay adds the Ray token, medisee-ray-token, itself):
# object storage and MLflow wherever models, data or runs are read or written (the jobs' drivers run on
# their heads); the judge's key where the verifier runs; the API keys in the serving containers only.
# The serving head has no replicas (num-cpus 0): the Serve controller and a proxy need the keys only.
RAY_CONTAINER_SECRETS = {
    ("RayJob/medisee-train", "head"): {S3, MLFLOW},
    ("RayJob/medisee-train", "worker"): {S3, MLFLOW},
    ("RayJob/medisee-batch-infer", "head"): {S3, MLFLOW},
    ("RayJob/medisee-batch-infer", "worker"): {S3, MLFLOW, JUDGE},
    ("RayService/medisee", "head"): {API_KEYS_SECRET},
    ("RayService/medisee", "worker"): {S3, MLFLOW, JUDGE, API_KEYS_SECRET},
    ("RayCluster/medisee-interactive", "head"): {S3, MLFLOW},
    ("RayCluster/medisee-interactive", "worker"): {S3, MLFLOW},
}


def secrets_by_container(docs) -> dict[tuple[str, str], set[str]]:
    """(pod, container) -> its Secrets, for every container of every pod the render makes."""
    return {
        (pod.where, container["name"]): container_secrets(pod.spec, container)
        for pod in operator_pods(docs)
        for container in all_containers(pod.spec)
    }


def expected_secrets(where: str, container: str) -> set[str]:
    workload, _, group = where.partition(" ")
    if container not in ("ray-head", "ray-worker"):  # a submitter, the autoscaler, wait-gcs-ready
        return set()
    return RAY_CONTAINER_SECRETS[(workload, "head" if group == "headgroup" else "worker")]


def test_each_container_gets_only_the_secrets_it_uses(manifests):
    for name, docs in manifests.items():
        found = secrets_by_container(docs)
        assert len(found) == 4 + 8 * 2 + 2 + 2, (
            name
        )  # Ray containers + init containers, submitters, autoscalers
        wrong = {k: v for k, v in found.items() if v != expected_secrets(*k)}
        assert wrong == {}, name
    for doc in manifests[next(iter(manifests))]:
        for container in ray_containers(doc) if doc["kind"] in RAY_KINDS else []:
            optional = {
                e["name"]: e["valueFrom"]["secretKeyRef"].get("optional") for e in container.get("env", [])
            }
            assert optional.get("OPENAI_API_KEY", True) is True  # only with verifier.judge_base_url


def test_secret_scoping_check_sees_a_secret_given_to_the_wrong_container():
    (service,) = [d for d in base_files() if d["kind"] == "RayService"]
    head = "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0"
    leaky = with_change(service, f"{head}.envFrom", [{"secretRef": {"name": S3}}])
    found = secrets_by_container([leaky])
    assert found[("RayService/medisee headgroup", "ray-head")] == {S3, API_KEYS_SECRET}
    (job,) = [d for d in base_files() if d["metadata"]["name"] == "medisee-train"]
    leaky_job = with_change(
        job,
        "spec.submitterPodTemplate.spec.containers.0.env",
        [{"name": "K", "valueFrom": {"secretKeyRef": {"name": API_KEYS_SECRET, "key": "keys"}}}],
    )
    assert secrets_by_container([leaky_job])[("RayJob/medisee-train submitter", "ray-job-submitter")] == {
        API_KEYS_SECRET
    }


def test_clusters_use_token_authentication(manifests):
    """KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (Secret medisee-ray-token) in every Ray
    container; nothing may switch authentication off."""
    for name, docs in manifests.items():
        maps = config_maps(docs)
        for doc in ray_docs(docs):
            assert cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": "medisee-ray-token"}
            for container in ray_containers(doc):
                assert "RAY_AUTH_MODE" not in container_env(container, maps), (
                    f"{name}: {doc['metadata']['name']}"
                )
    for path in K8S.rglob("*.yaml"):
        assert not re.search(r"RAY_AUTH_MODE\W+disabled", path.read_text()), path


# ---- jobs


def entrypoint_config(entrypoint: str):
    """The medisee config a job's entrypoint runs with, and its script and CLI options."""
    words = shlex.split(entrypoint)
    assert words[0] == "python"
    script, rest = words[1], words[2:]
    options, overrides, i = {}, [], 0
    while i < len(rest):
        if rest[i].startswith("--"):
            options[rest[i]] = rest[i + 1]
            i += 2
        else:
            overrides.append(rest[i])
            i += 1
    return script, options, load_config(options.get("--config"), overrides), overrides


def test_jobs_run_a_repository_script_with_a_valid_config(manifests):
    for name, docs in manifests.items():
        (tracking_uri,) = {m["MLFLOW_TRACKING_URI"] for m in config_maps(docs).values()}
        for job in by_kind(docs, "RayJob").values():
            script, options, cfg, overrides = entrypoint_config(job["spec"]["entrypoint"])
            assert script.startswith("/home/ray/app/")
            assert (ROOT / script.removeprefix("/home/ray/app/")).is_file()
            assert cfg.tracking.uri == tracking_uri, f"{name}: {job['metadata']['name']}"
            assert job["spec"]["shutdownAfterJobFinishes"] is True
            assert job["spec"]["backoffLimit"] >= 1
            if script.endswith("train.py"):
                # a stable run name: a retry or a resubmission resumes this run
                assert any(o.startswith("run.name=") for o in overrides)
                assert cfg.run.storage_uri.startswith("s3://")
                workers = cluster_spec(job)["workerGroupSpecs"]
                gpus = sum(
                    float(
                        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
                    )
                    * g["replicas"]
                    for g in workers
                )
                assert cfg.trainer.use_gpu and gpus >= cfg.trainer.num_workers, name
            else:
                assert script.endswith("batch_score.py")
                assert options["--output"].startswith("s3://") and options["--input"].startswith("s3://")
