"""The NetworkPolicies (infra/k8s/base/networkpolicy.yaml): from outside the cluster only the Serve
HTTP port of the Serve pods; Ray traffic within each workload; the operator to the heads' dashboard."""

from __future__ import annotations

import yaml

from tests.infra.helpers import ROOT, with_change
from tests.infra.policies import EXTERNAL, Source, admitted, network_policies, operator_pods

# GCS, dashboard, client, object manager, dashboard agent, metrics, a worker's port, Serve HTTP, gRPC
RAY_PORTS = (6379, 8265, 10001, 8076, 52365, 8080, 12345, 8000, 9000)
OPERATOR = Source(
    labels={"app.kubernetes.io/name": "kuberay-operator"},
    namespace="kuberay-system",
    namespace_labels={"kubernetes.io/metadata.name": "kuberay-system"},
)


def serve_http_port() -> int:
    return yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["http_options"]["port"]


def component(pod) -> str:
    return pod.labels()["app.kubernetes.io/component"]


def open_from(docs, source: Source) -> set[tuple[str, int]]:
    """(pod, port) pairs that `source` reaches, over every pod of the render."""
    policies = network_policies(docs)
    return {
        (pod.where, port)
        for pod in operator_pods(docs)
        for port in RAY_PORTS
        if admitted(policies, pod.labels(), source, port)
    }


def test_from_outside_only_the_serve_port_of_the_serve_pods(manifests):
    for name, docs in manifests.items():
        serve_pods = {p.where for p in operator_pods(docs) if component(p) == "serve"}
        assert len(serve_pods) == 4, name  # head and three worker groups: a proxy on every node
        assert open_from(docs, EXTERNAL) == {(where, serve_http_port()) for where in serve_pods}, name


def test_a_pod_of_no_workload_admits_nothing(manifests):
    for name, docs in manifests.items():
        policies = network_policies(docs)
        stranger = {"app": "something-else"}
        for source in (EXTERNAL, Source(labels={"app": "x"}), OPERATOR):
            assert not any(admitted(policies, stranger, source, port) for port in RAY_PORTS), name


def test_ray_pods_reach_the_pods_of_their_own_workload_only(manifests):
    for name, docs in manifests.items():
        policies = network_policies(docs)
        pods = operator_pods(docs)
        assert {component(p) for p in pods} == {"train", "batch-infer", "serve", "interactive"}
        for source in pods:
            sender = Source(labels=source.labels())
            for target in pods:
                reached = {port for port in RAY_PORTS if admitted(policies, target.labels(), sender, port)}
                if component(source) == component(target):
                    assert reached == set(RAY_PORTS), f"{name}: {source.where} -> {target.where}"
                else:  # another workload: as any client, the Serve port at most
                    expected = {serve_http_port()} if component(target) == "serve" else set()
                    assert reached == expected, f"{name}: {source.where} -> {target.where}"


def test_the_operator_reaches_the_heads_dashboard(manifests):
    for name, docs in manifests.items():
        reached = open_from(docs, OPERATOR)
        heads = {p.where for p in operator_pods(docs) if p.role == "head"}
        assert {(where, 8265) for where in heads} <= reached, name
        dashboards = {(where, port) for where, port in reached if port == 8265}
        assert dashboards == {(where, 8265) for where in heads}, name
        elsewhere = Source(labels=OPERATOR.labels, namespace="other", namespace_labels={"team": "x"})
        assert {port for _, port in open_from(docs, elsewhere)} == {serve_http_port()}, name


def test_policy_check_sees_an_opened_port(manifests):
    docs = next(iter(manifests.values()))
    index, policy = next(
        (i, d)
        for i, d in enumerate(docs)
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "medisee-serve-http"
    )
    gcs_too = with_change(policy, "spec.ingress.0.ports", [{"protocol": "TCP", "port": 8000}, {"port": 6379}])
    opened = open_from([*docs[:index], gcs_too, *docs[index + 1 :]], EXTERNAL)
    assert {port for _, port in opened} == {8000, 6379}
    no_deny = [d for d in docs if d["metadata"]["name"] != "medisee-default-deny-ingress"]
    stranger = {"app": "something-else"}
    assert admitted(network_policies(no_deny), stranger, EXTERNAL, 6379)
