"""The pods KubeRay makes of the manifests, the Kubernetes "restricted" Pod Security Standard, and
which traffic a set of NetworkPolicies admits: what tests/infra checks the renders against."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.infra.helpers import cluster_spec

# ---- the pods the operator creates (KubeRay ray-operator/controllers/ray/common/pod.go, job.go)

RAY_CONTAINER = 0  # KubeRay's RayContainerIndex
TEMPLATE_PATHS = {  # where the built-in workload kinds keep their pod template
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass
class Pod:
    where: str  # "RayService/medisee headgroup"
    role: str  # head, worker, submitter or pod (a built-in kind's)
    template: dict  # metadata + spec, with the containers the operator adds

    @property
    def spec(self) -> dict:
        return self.template["spec"]

    def labels(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("labels", {})


def autoscaling(doc: dict) -> bool:
    return bool((cluster_spec(doc) or {}).get("enableInTreeAutoscaling"))


def autoscaler_container(doc: dict) -> dict:
    """The sidecar KubeRay adds to an autoscaling head: autoscalerOptions' securityContext (none
    without it), volumeMounts, env and envFrom."""
    options = cluster_spec(doc).get("autoscalerOptions", {})
    container = {"name": "autoscaler", "image": options.get("image", "(the head's image)")}
    for key in ("securityContext", "volumeMounts", "env", "envFrom"):
        if key in options:
            container[key] = copy.deepcopy(options[key])
    return container


def default_submitter(doc: dict) -> dict:
    head = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][RAY_CONTAINER]
    return {"name": "ray-job-submitter", "image": head["image"]}  # no securityContext


def ray_group_pods(doc: dict) -> Iterator[Pod]:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = cluster_spec(doc)
    head = copy.deepcopy(spec["headGroupSpec"]["template"])
    head.setdefault("metadata", {}).setdefault("labels", {}).update(
        {"ray.io/node-type": "head", "ray.io/is-ray-node": "yes", "ray.io/group": "headgroup"}
    )
    if autoscaling(doc):
        head["spec"]["containers"].append(autoscaler_container(doc))
    if doc["kind"] == "RayJob" and doc["spec"].get("submissionMode") == "SidecarMode":
        head["spec"]["containers"].append(default_submitter(doc))
    yield Pod(f"{name} headgroup", "head", head)
    for group in spec.get("workerGroupSpecs", []):
        worker = copy.deepcopy(group["template"])
        worker.setdefault("metadata", {}).setdefault("labels", {}).update(
            {"ray.io/node-type": "worker", "ray.io/is-ray-node": "yes", "ray.io/group": group["groupName"]}
        )
        ray_container = worker["spec"]["containers"][RAY_CONTAINER]
        wait_gcs = {"name": "wait-gcs-ready", "image": ray_container["image"]}
        if "securityContext" in ray_container:
            wait_gcs["securityContext"] = copy.deepcopy(ray_container["securityContext"])
        worker["spec"]["initContainers"] = [wait_gcs, *worker["spec"].get("initContainers", [])]
        yield Pod(f"{name} {group['groupName']}", "worker", worker)


def submitter_pod(doc: dict) -> Pod | None:
    """The Kubernetes Job pod that runs `ray job submit` (K8sJobMode, the default)."""
    if doc["spec"].get("submissionMode", "K8sJobMode") != "K8sJobMode":
        return None
    template = doc["spec"].get("submitterPodTemplate") or {
        "spec": {"containers": [default_submitter(doc)], "restartPolicy": "Never"}
    }
    return Pod(f"RayJob/{doc['metadata']['name']} submitter", "submitter", copy.deepcopy(template))


def operator_pods(docs) -> list[Pod]:
    """Every pod the render makes: the Ray groups' (with KubeRay's sidecar and init container), the
    RayJobs' submitters, and the built-in kinds' pod templates."""
    pods = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if cluster_spec(doc):
            pods += ray_group_pods(doc)
            submitter = submitter_pod(doc) if kind == "RayJob" else None
            pods += [submitter] if submitter else []
        elif kind == "Pod":
            pods.append(Pod(f"Pod/{name}", "pod", doc))
        elif kind in TEMPLATE_PATHS:
            node = doc
            for key in TEMPLATE_PATHS[kind]:
                node = node[key]
            pods.append(Pod(f"{kind}/{name}", "pod", node))
    return pods


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]


# ---- the restricted Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards)

ALLOWED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
    "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}


def host_access(spec: dict) -> list[str]:
    found = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if kinds - ALLOWED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: type {sorted(kinds)} not allowed")
    for container in all_containers(spec):
        found += [
            f"{container['name']}: hostPort {port['hostPort']}"
            for port in container.get("ports", [])
            if port.get("hostPort")
        ]
    unsafe = [
        s["name"] for s in spec.get("securityContext", {}).get("sysctls", []) if s["name"] not in SAFE_SYSCTLS
    ]
    return found + [f"unsafe sysctl {name}" for name in unsafe]


def context_problems(where: str, context: dict) -> list[str]:
    """What a pod's or a container's securityContext may never hold, whatever the level."""
    found = []
    if context.get("windowsOptions", {}).get("hostProcess"):
        found.append(f"{where}: hostProcess")
    selinux = context.get("seLinuxOptions", {})
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        found.append(f"{where}: seLinuxOptions {selinux}")
    if context.get("appArmorProfile", {}).get("type") == "Unconfined":
        found.append(f"{where}: appArmorProfile Unconfined")
    if context.get("runAsUser") == 0:
        found.append(f"{where}: runAsUser 0")
    if context.get("runAsNonRoot") is False:  # forbidden even where the other level says true
        found.append(f"{where}: runAsNonRoot false")
    if context.get("seccompProfile", {}).get("type") not in (None, *SECCOMP_TYPES):
        found.append(f"{where}: seccompProfile {context['seccompProfile']['type']}")
    return found


def container_problems(container: dict, pod_context: dict) -> list[str]:
    name, context = container["name"], container.get("securityContext") or {}
    found = context_problems(name, context)
    if context.get("privileged"):
        found.append(f"{name}: privileged")
    if context.get("procMount", "Default") != "Default":
        found.append(f"{name}: procMount {context['procMount']}")
    if context.get("allowPrivilegeEscalation") is not False:
        found.append(f"{name}: allowPrivilegeEscalation is not false")
    capabilities = context.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []):
        found.append(f"{name}: capabilities do not drop ALL")
    if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
        found.append(f"{name}: adds capabilities {sorted(set(capabilities['add']) - {'NET_BIND_SERVICE'})}")
    non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
    if non_root is not True:
        found.append(f"{name}: runAsNonRoot is not true")
    seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
    if seccomp not in SECCOMP_TYPES:
        found.append(f"{name}: seccompProfile {seccomp} (RuntimeDefault or Localhost)")
    return found


def restricted_violations(pod: Pod) -> list[str]:
    """The restricted profile's rules that `pod` breaks, one line each (empty: it is admitted)."""
    spec = pod.spec
    pod_context = spec.get("securityContext") or {}
    found = host_access(spec) + context_problems("pod", pod_context)
    annotations = pod.template.get("metadata", {}).get("annotations", {})
    found += [
        f"annotation {key}: {value}"
        for key, value in annotations.items()
        if key.startswith("container.apparmor.security.beta.kubernetes.io/")
        and not (value == "runtime/default" or value.startswith("localhost/"))
    ]
    for container in all_containers(spec):
        found += container_problems(container, pod_context)
    return [f"{pod.where}: {problem}" for problem in found]


# ---- NetworkPolicy: which sources reach which pod on which port


@dataclass(frozen=True)
class Source:
    """Where traffic comes from: outside the cluster (external), or a pod with these labels in a
    namespace with these labels ("same": the policies' own namespace)."""

    external: bool = False
    labels: dict = field(default_factory=dict, hash=False)
    namespace: str = "same"
    namespace_labels: dict = field(default_factory=dict, hash=False)


EXTERNAL = Source(external=True)


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        held = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not held:
            return False
    return True


def peer_admits(peer: dict, source: Source) -> bool:
    if "ipBlock" in peer:  # any address range: taken as admitting outside traffic (and pods)
        return True
    if source.external:
        return False
    if "namespaceSelector" not in peer and source.namespace != "same":
        return False
    if "namespaceSelector" in peer and not selects(peer["namespaceSelector"], source.namespace_labels):
        return False
    return selects(peer.get("podSelector", {}), source.labels)


def port_admits(rule: dict, port: int) -> bool:
    if not rule.get("ports"):
        return True
    return any(
        p.get("protocol", "TCP") == "TCP"
        and (p.get("port") is None or p["port"] <= port <= p.get("endPort", p["port"]))
        for p in rule["ports"]
    )


def admitted(policies: list[dict], pod_labels: dict[str, str], source: Source, port: int) -> bool:
    """Whether TCP traffic from `source` reaches a pod with `pod_labels` on `port` (a pod that no
    ingress policy selects admits everything)."""
    selecting = [
        p
        for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], pod_labels)
    ]
    if not selecting:
        return True
    return any(
        port_admits(rule, port)
        and (not rule.get("from") or any(peer_admits(peer, source) for peer in rule["from"]))
        for policy in selecting
        for rule in policy["spec"].get("ingress", [])
    )


def network_policies(docs) -> list[dict]:
    return [d for d in docs if d["kind"] == "NetworkPolicy"]
