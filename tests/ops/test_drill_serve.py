"""Drill: the Serve application with two replicas of every deployment on two worker nodes; one node is
killed under load (no graceful shutdown). The application must keep answering, the lost replicas must be
replaced (on a replacement node, as KubeRay or the autoscaler brings one), and the answers after recovery
must equal the answers before. Also: the ingress's answer to a model replica lost mid-call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.artifacts import make_tiny_artifact
from tests.conftest import free_port
from tests.ops.conftest import add_worker, report_drill
from tests.serving.conftest import API_KEY, Served, app_args
from tests.serving.test_operations import body, wait_until_answering

ROOT = Path(__file__).resolve().parents[2]
APP = "medisee"
WORKER = "medisee_worker"  # a resource only the worker nodes have: no replica lands on the head node
DEPLOYMENTS = ("Ingress", "MLLMDeployment", "VerifierDeployment", "DecoderDeployment")
REPLICAS = 2
CLIENTS = 4
PROXY_500 = "Internal Server Error"  # Serve's proxy, for a request in flight on an ingress replica that died


@dataclass
class Outcome:
    sent: float  # time.monotonic()
    done: float
    status: int  # the HTTP status; 0 when no response came (connection error or client timeout)
    detail: str = ""  # a failure's body (or the client's exception)
    retry_after: str | None = None


def add_serve_node(cluster):
    return add_worker(cluster, num_cpus=2, resources={WORKER: 4})


def deploy(state: Served, port: int) -> None:
    """What a RayService's serveConfigV2 does: serve/config.yaml applied by the Serve controller, with
    every deployment at 2 replicas, at most one per node, on worker nodes only."""
    import yaml
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    args = app_args(state, extra_models=[]).model_dump(mode="json")
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT), "MEDISEE_SERVE_ARGS": json.dumps(args)}}
    for deployment in app["deployments"]:
        deployment.update(num_replicas=REPLICAS, max_replicas_per_node=1)
        deployment["ray_actor_options"]["resources"] = {WORKER: 1}
        if deployment["name"] == "Ingress":
            deployment["user_config"] = {"model": state.v1, "extra_models": []}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def replica_nodes() -> dict[str, list[str]]:
    """Deployment -> the node id of each of its replica actors that the GCS has alive."""
    from ray._private import state

    out: dict[str, list[str]] = {name: [] for name in DEPLOYMENTS}
    for actor in state.actors().values():
        for name in DEPLOYMENTS:
            if actor["State"] == "ALIVE" and f"{APP}#{name}#" in (actor["Name"] or ""):
                out[name].append(actor["Address"]["NodeID"])
    return out


def at_target(nodes: set[str]) -> bool:
    """Every deployment has its replicas RUNNING (Serve's view), on distinct nodes among `nodes`."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or set(app.deployments) != set(DEPLOYMENTS):
        return False
    placed = replica_nodes()
    return all(
        app.deployments[name].replica_states.get("RUNNING", 0) == REPLICAS
        and len(placed[name]) == REPLICAS == len(set(placed[name]))
        and set(placed[name]) <= nodes
        for name in DEPLOYMENTS
    )


def replicas_gone_from(node_id: str) -> float:
    """Waits until the GCS has no replica alive on `node_id` (it has declared the node dead); returns when."""
    wait_for(lambda: all(node_id not in nodes for nodes in replica_nodes().values()), 120,
             "the GCS still has the dead node's replicas alive")  # fmt: skip
    return time.monotonic()


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def drive(url: str, stop: threading.Event, outcomes: list[Outcome], client_index: int) -> None:
    """One client: real HTTP requests back to back until `stop`."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=90) as client:
        i = client_index
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = client.post(url + "/v1/segment", json=body(i % 4), headers=headers)
                failure = "" if response.is_success else response.text[:300]
                outcome = Outcome(sent, time.monotonic(), response.status_code, failure,
                                  response.headers.get("retry-after"))  # fmt: skip
            except httpx.HTTPError as exc:
                outcome = Outcome(sent, time.monotonic(), 0, repr(exc))
            outcomes.append(outcome)
            i += CLIENTS


def answers(url: str) -> list[list[dict]]:
    """The results of two fixed requests, one at a time (no batching with other requests)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    out = []
    for index in (0, 1):
        response = httpx.post(url + "/v1/segment", json=body(index), headers=headers, timeout=90)
        assert response.status_code == 200, response.text
        out.append(response.json()["results"])
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_serving_survives_losing_a_node_with_replicas(ray_cluster, tmp_path):
    import ray
    from ray import serve

    nodes = [add_serve_node(ray_cluster), add_serve_node(ray_cluster)]
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    (tmp_path / "keys.txt").write_text(API_KEY + "\n")
    model = make_tiny_artifact(tmp_path / "v1")
    port = free_port()
    state = Served(f"http://127.0.0.1:{port}", model, model, API_KEY, APP)
    # the proxy on the head node: the HTTP endpoint does not depend on any worker node
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    deployed_at = time.monotonic()
    deploy(state, port)
    wait_for(
        lambda: at_target({n.node_id for n in nodes}), 300, "the application did not reach 2 × 4 replicas"
    )
    started_s = time.monotonic() - deployed_at
    wait_until_answering(state)
    before = answers(state.url)

    stop, outcomes = threading.Event(), []
    victim, survivor = nodes
    with concurrent.futures.ThreadPoolExecutor(CLIENTS + 1) as pool:
        clients = [pool.submit(drive, state.url, stop, outcomes, i) for i in range(CLIENTS)]
        try:
            wait_for(lambda: sum(o.status == 200 for o in outcomes) >= 2 * CLIENTS, 120, "no load")
            killed_at = time.monotonic()
            ray_cluster.remove_node(victim, allow_graceful=False)
            dropped = pool.submit(replicas_gone_from, victim.node_id)
            # what KubeRay (a new pod for the worker group) or the autoscaler does for a lost node
            new_node = add_serve_node(ray_cluster)
            node_added_at = time.monotonic()
            dropped_at = dropped.result(timeout=150)
            wait_for(lambda: at_target({survivor.node_id, new_node.node_id}), 240,
                     "the lost replicas were not replaced")  # fmt: skip
            restored_at = time.monotonic()
            wait_for(lambda: sum(o.sent > restored_at and o.status == 200 for o in outcomes) >= 2 * CLIENTS,
                     120, "no load after recovery")  # fmt: skip
        finally:
            stop.set()
        for client in clients:
            client.result(timeout=120)
    after = answers(state.url)

    failed = [o for o in outcomes if o.status != 200]
    first_success = min(o.done for o in outcomes if o.sent > killed_at and o.status == 200)
    codes: dict[int, int] = {}
    for o in failed:
        codes[o.status] = codes.get(o.status, 0) + 1
    report_drill(
        "serve_node_loss",
        clients=CLIENTS,
        replicas_started_s=round(started_s, 1),
        requests=len(outcomes),
        requests_kill_to_restored=sum(killed_at <= o.done and o.sent <= restored_at for o in outcomes),
        failed=len(failed),
        failed_by_status=codes,
        kill_to_first_success_s=round(first_success - killed_at, 2),
        kill_to_replicas_dropped_s=round(dropped_at - killed_at, 2),
        kill_to_replacement_node_s=round(node_added_at - killed_at, 2),
        kill_to_target_s=round(restored_at - killed_at, 2),
        failures=[f"{o.status} at +{o.done - killed_at:.2f} s: {o.detail[:120]}" for o in failed],
    )
    assert not [o for o in failed if o.done < killed_at]  # the app was healthy before the drill
    # every failure is Serve's proxy answering for a request in flight on the lost ingress replica, or
    # our 503 with Retry-After (model replicas lost twice in a row): no hang, no other 5xx
    assert all(
        (o.status == 500 and o.detail == PROXY_500) or (o.status == 503 and o.retry_after) for o in failed
    ), failed
    assert len(failed) <= CLIENTS  # at most the requests in flight when the node went
    assert all(o.status == 200 for o in outcomes if o.sent > restored_at)
    assert after == before  # the same model on new replicas: the same answers


# ----- the ingress's part: a model replica lost mid-call -------------------------------------------------


def lost_replica():
    from ray.exceptions import ActorUnavailableError

    return ActorUnavailableError("Actor is unavailable.", None)


def counting(*results):
    """An async `send` that raises or returns `results` in turn; `calls` counts the sends."""
    calls = []

    async def send():
        result = results[len(calls)]
        calls.append(result)
        if isinstance(result, BaseException):
            raise result
        return result

    return send, calls


def test_a_stage_call_goes_out_again_once_when_its_replica_was_lost():
    from medisee.serving.ingress import call_stage

    send, calls = counting(lost_replica(), ["encoding"])
    assert asyncio.run(call_stage(send, "MLLM")) == ["encoding"] and len(calls) == 2


def test_other_failures_are_not_resent_and_a_replica_lost_twice_is_a_503_with_retry_after():
    from medisee.serving.ingress import call_stage, graph_error

    send, calls = counting(ValueError("bad input"), ["never"])
    with pytest.raises(ValueError):
        asyncio.run(call_stage(send, "MLLM"))
    assert len(calls) == 1

    send, calls = counting(lost_replica(), lost_replica(), ["never"])
    with pytest.raises(Exception) as lost:
        asyncio.run(call_stage(send, "decoder"))
    assert len(calls) == 2
    response = graph_error(lost.value, "request-1")
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert json.loads(response.body)["error"]["message"].startswith("a model replica was lost")
    assert graph_error(RuntimeError("bug"), "request-2").status_code == 500
