"""Every pod the manifests make (with what KubeRay adds: the autoscaler sidecar, the wait-gcs-ready
init container, a RayJob's submitter) meets the Kubernetes "restricted" Pod Security Standard, and
only the autoscaler holds a Kubernetes API token."""

from __future__ import annotations

import pytest

from tests.infra.helpers import base_files, cluster_spec, with_change
from tests.infra.policies import autoscaling, operator_pods, restricted_violations

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def base_doc(kind: str, name: str | None = None) -> dict:
    return next(d for d in base_files() if d["kind"] == kind and name in (None, d["metadata"]["name"]))


REMOVED = object()


def changed(doc: dict, path: str, value) -> dict:
    """`doc` with the dotted `path` set to `value`, or removed (REMOVED)."""
    if value is not REMOVED:
        return with_change(doc, path, value)
    out = with_change(doc, path, None)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    del node[last]
    return out


def violations(docs) -> list[str]:
    return [v for pod in operator_pods(docs) for v in restricted_violations(pod)]


def test_every_pod_meets_the_restricted_profile(manifests):
    for name, docs in manifests.items():
        pods = operator_pods(docs)
        # 4 heads, 8 worker groups, 2 submitters
        assert sorted(p.role for p in pods) == ["head"] * 4 + ["submitter"] * 2 + ["worker"] * 8, name
        assert violations(docs) == [], name


RAYSERVICE_HEAD = "spec.rayClusterConfig.headGroupSpec.template.spec"
RAYSERVICE_HEAD_RAY = f"{RAYSERVICE_HEAD}.containers.0"
RAYSERVICE_CPU = "spec.rayClusterConfig.workerGroupSpecs.0.template.spec"
TRAIN_SUBMITTER = "spec.submitterPodTemplate.spec"
CONTAINER_CONTEXT = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    [
        ("RayService", f"{RAYSERVICE_HEAD_RAY}.securityContext", {}, "ray-head: allowPrivilegeEscalation"),
        (
            "RayService",
            f"{RAYSERVICE_HEAD_RAY}.securityContext",
            {**CONTAINER_CONTEXT, "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}},
            "ray-head: adds capabilities ['SYS_ADMIN']",
        ),
        (
            "RayService",
            f"{RAYSERVICE_HEAD_RAY}.securityContext",
            {**CONTAINER_CONTEXT, "capabilities": {}},
            "ray-head: capabilities do not drop ALL",
        ),
        (
            "RayService",
            f"{RAYSERVICE_HEAD_RAY}.securityContext",
            {**CONTAINER_CONTEXT, "privileged": True},
            "ray-head: privileged",
        ),
        (
            "RayService",
            f"{RAYSERVICE_HEAD_RAY}.securityContext",
            {**CONTAINER_CONTEXT, "seccompProfile": {"type": "Unconfined"}},
            "ray-head: seccompProfile Unconfined",
        ),
        (
            "RayService",
            f"{RAYSERVICE_HEAD_RAY}.securityContext",
            {**CONTAINER_CONTEXT, "runAsUser": 0},
            "ray-head: runAsUser 0",
        ),
        ("RayService", f"{RAYSERVICE_HEAD}.hostNetwork", True, "hostNetwork: true"),
        (
            "RayService",
            f"{RAYSERVICE_CPU}.volumes",
            [{"name": "host", "hostPath": {"path": "/"}}],
            "volume host: type ['hostPath'] not allowed",
        ),
        (
            "RayService",
            f"{RAYSERVICE_CPU}.containers.0.ports",
            [{"containerPort": 8000, "hostPort": 8000}],
            "ray-worker: hostPort 8000",
        ),
        (
            "RayService",
            f"{RAYSERVICE_HEAD}.securityContext.sysctls",
            [{"name": "kernel.msgmax", "value": "65536"}],
            "unsafe sysctl kernel.msgmax",
        ),
        # what KubeRay adds: the autoscaler takes autoscalerOptions.securityContext, nothing else
        ("RayService", "spec.rayClusterConfig.autoscalerOptions.securityContext", REMOVED, "autoscaler:"),
        # the workers' wait-gcs-ready init container copies the Ray container's securityContext
        ("RayService", f"{RAYSERVICE_CPU}.containers.0.securityContext", {}, "wait-gcs-ready:"),
        ("RayJob", f"{TRAIN_SUBMITTER}.containers.0.securityContext", {}, "submitter: ray-job-submitter"),
        (
            "RayJob",
            f"{TRAIN_SUBMITTER}.containers.0.securityContext",
            {k: v for k, v in CONTAINER_CONTEXT.items() if k != "runAsNonRoot"},
            None,  # the pod's runAsNonRoot covers the container
        ),
        ("RayJob", "spec.submitterPodTemplate", REMOVED, "submitter: ray-job-submitter"),  # KubeRay's default
        (
            "RayJob",
            f"{TRAIN_SUBMITTER}.securityContext",
            {"runAsNonRoot": False},
            "submitter: pod: runAsNonRoot false",
        ),
    ],
)
def test_restricted_check_catches_a_weakened_pod(kind, path, value, expected):
    doc = base_doc(kind, "medisee-train" if kind == "RayJob" else None)
    assert violations([doc]) == []
    found = violations([changed(doc, path, value)])
    if expected is None:
        assert found == []
    else:
        assert any(expected in v for v in found), found


def test_restricted_check_covers_built_in_workload_kinds():
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "migrate"},
        "spec": {"template": {"spec": {"containers": [{"name": "m", "image": "x"}]}}},
    }
    found = violations([job])
    assert "Job/migrate: m: allowPrivilegeEscalation is not false" in found
    assert "Job/migrate: m: seccompProfile None (RuntimeDefault or Localhost)" in found


def api_token_holders(pod) -> list[str]:
    """Containers of `pod` that can read a Kubernetes API token: every one when it is automounted,
    else those that mount a projected serviceAccountToken volume."""
    spec = pod.spec
    if spec.get("automountServiceAccountToken", True):
        return [c["name"] for c in spec["containers"]]
    token_volumes = {
        v["name"]
        for v in spec.get("volumes", [])
        if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
    }
    return [
        c["name"]
        for c in spec["containers"] + spec.get("initContainers", [])
        if {m["name"] for m in c.get("volumeMounts", [])} & token_volumes
    ]


def projected_paths(volume: dict) -> set[str]:
    paths = set()
    for source in volume["projected"]["sources"]:
        if "serviceAccountToken" in source:
            paths.add(source["serviceAccountToken"]["path"])
        else:
            (projection,) = source.values()
            paths |= {item["path"] for item in projection.get("items", [])}
    return paths


def test_only_the_autoscaler_holds_a_kubernetes_api_token(manifests):
    """KubeRay's autoscaler sidecar adds and deletes pods through the Kubernetes API; nothing else
    here calls it, so no pod automounts a token and the autoscaler alone mounts one, where its client
    reads it (ray.autoscaler._private.kuberay: token and ca.crt under the service-account folder)."""
    for name, docs in manifests.items():
        for pod in operator_pods(docs):
            assert pod.spec.get("automountServiceAccountToken") is False, f"{name}: {pod.where}"
            autoscaled_head = pod.role == "head" and pod.spec["containers"][-1]["name"] == "autoscaler"
            assert api_token_holders(pod) == (["autoscaler"] if autoscaled_head else []), pod.where
            if autoscaled_head:
                (mount,) = pod.spec["containers"][-1]["volumeMounts"]
                assert mount["mountPath"] == SERVICE_ACCOUNT_DIR and mount["readOnly"] is True
                (volume,) = [v for v in pod.spec["volumes"] if v["name"] == mount["name"]]
                assert projected_paths(volume) == {"token", "ca.crt", "namespace"}
        autoscaled = {d["metadata"]["name"] for d in docs if cluster_spec(d) and autoscaling(d)}
        assert autoscaled == {"medisee", "medisee-interactive"}, name


def test_token_check_sees_an_automounted_or_mounted_token():
    (head, *_) = operator_pods([base_doc("RayService")])
    assert api_token_holders(head) == ["autoscaler"]
    service = with_change(base_doc("RayService"), f"{RAYSERVICE_HEAD}.automountServiceAccountToken", True)
    (head, *_) = operator_pods([service])
    assert api_token_holders(head) == ["ray-head", "autoscaler"]
    leaky = with_change(
        base_doc("RayService"),
        f"{RAYSERVICE_HEAD_RAY}.volumeMounts",
        [{"name": "kube-api-access", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}],
    )
    (head, *_) = operator_pods([leaky])
    assert api_token_holders(head) == ["ray-head", "autoscaler"]
