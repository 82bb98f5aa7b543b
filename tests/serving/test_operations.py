"""Operating the Serve graph: a version switch by config update, a killed replica, overload."""

from __future__ import annotations

import base64
import concurrent.futures
import time

import httpx
import pytest

from medisee.data import phantom
from tests.serving.conftest import app_args, png_bytes
from tests.serving.test_api import assert_equal_to_predictor

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def body(index: int = 0, queries=("Segment the liver.",)) -> dict:
    image = phantom.generate(seed=13, index=index, size=128)[0]
    return {"image": base64.b64encode(png_bytes(image)).decode(), "queries": list(queries)}


def replica_actors(deployment: str) -> dict[str, int]:
    """Alive replica actors of one deployment of the medisee app: name -> pid (from the GCS: the
    state API needs the dashboard, which the tests' Ray runs without)."""
    from ray._private import state

    return {
        a["Name"]: a["Pid"]
        for a in state.actors().values()
        if a["State"] == "ALIVE" and a["Name"] and f"medisee#{deployment}#" in a["Name"]
    }


def redeploy(state, **changes) -> None:
    from ray import serve

    from medisee.serving.app import build_app

    serve.run(build_app(app_args(state, **changes)), name=state.app_name, route_prefix="/")


def wait_until_answering(served, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if (
                httpx.post(
                    served.url + "/v1/segment", json=body(), headers=served.headers(), timeout=30
                ).status_code
                == 200
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the application did not answer again")


def deploy_config(state, served_version: str) -> None:
    """What `serve deploy serve/config.yaml` does (the controller's apply_config), for a second app
    at /switch built from serve.app:app, with small replicas beside the session's app."""
    import json
    from pathlib import Path

    import yaml
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "serve" / "config.yaml").read_text())
    app = config["applications"][0]
    args = app_args(state).model_dump(mode="json")
    app.update(name="switch", route_prefix="/switch")
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": str(root), "MEDISEE_SERVE_ARGS": json.dumps(args)}}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.05
        if deployment["name"] == "Ingress":
            deployment["user_config"] = {"model": served_version, "extra_models": [state.v2]}
    config["http_options"] = {"host": "127.0.0.1", "port": int(state.url.rsplit(":", 1)[1])}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


def switch_replicas() -> dict[str, int]:
    from ray._private import state

    return {
        a["Name"]: a["Pid"]
        for a in state.actors().values()
        if a["State"] == "ALIVE" and a["Name"] and "switch#" in a["Name"]
    }


def test_switching_the_served_version_is_a_config_update_without_restarts(served):
    from ray import serve

    from medisee.artifact.model_dir import load_predictor

    deploy_config(served, served.v1)
    try:
        before = switch_replicas()
        assert len(before) == 4
        models = httpx.get(served.url + "/switch/v1/models", headers=served.headers()).json()
        assert models["default"] == served.v1
        deploy_config(served, served.v2)  # only the ingress's user_config changed
        models = httpx.get(served.url + "/switch/v1/models", headers=served.headers()).json()
        assert models["default"] == served.v2 and served.v1 in models["versions"]
        request = body(1, ("Segment the liver.", "Where is the spleen?"))
        answer = httpx.post(
            served.url + "/switch/v1/segment", json=request, headers=served.headers(), timeout=120
        ).json()
        assert answer["model_version"] == served.v2
        image = phantom.generate(seed=13, index=1, size=128)[0]
        assert_equal_to_predictor(
            answer["results"], load_predictor(served.v2).predict(image, request["queries"])
        )
        assert switch_replicas() == before  # the same replica processes: reconfigured, not restarted
    finally:
        serve.delete("switch")


def test_a_replica_killed_under_load_recovers_and_nothing_hangs(served):
    import ray

    def one(i: int) -> int:
        try:
            return httpx.post(
                served.url + "/v1/segment", json=body(i % 4), headers=served.headers(), timeout=90
            ).status_code
        except httpx.TimeoutException:
            return -1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(1.0)
        (name,) = replica_actors("MLLMDeployment")
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        statuses = [f.result(timeout=180) for f in futures]
    assert -1 not in statuses  # every request came back
    assert set(statuses) <= {200, 500, 503}
    wait_until_answering(served)
    after = [one(i) for i in range(4)]
    assert after == [200] * 4
    assert replica_actors("MLLMDeployment") and name not in replica_actors("MLLMDeployment")


def test_overload_is_refused_by_the_app_with_its_json_and_retry_after(served):
    """The app admits 1 request into the graph at a time; 4 clients at a time, several rounds: every
    refusal is the documented JSON 503 with Retry-After and a request id (not the proxy's bare 503)."""
    from medisee.serving.args import IngressOptions

    redeploy(served, ingress=IngressOptions(max_in_flight=1))
    try:
        wait_until_answering(served)

        def one(i: int) -> tuple[int, float, httpx.Response]:
            started = time.perf_counter()
            response = httpx.post(served.url + "/v1/segment", json=body(i % 4, ["Segment the liver."] * 4),
                                  headers=served.headers(), timeout=90)  # fmt: skip
            return response.status_code, time.perf_counter() - started, response

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outcomes = [o for _ in range(4) for o in pool.map(one, range(4))]
        admitted = sorted(t for status, t, _ in outcomes if status == 200)
        refused = [(t, r) for status, t, r in outcomes if status == 503]
        assert {status for status, _, _ in outcomes} <= {200, 503}
        assert admitted and refused
        for _, response in refused:
            assert response.headers["retry-after"] == "1"
            payload = response.json()
            assert payload["error"]["status"] == 503 and "overloaded" in payload["error"]["message"]
            assert len(payload["request_id"]) == 32
        assert max(t for t, _ in refused) < max(admitted)  # refusals come back faster than answers
    finally:
        redeploy(served)
        wait_until_answering(served)
