"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis 4).

The schema is read from the running application (`/openapi.json` of the session's Serve app, real
HTTP) and every operation it lists is exercised: POST /v1/segment with JSON and multipart bodies and
the GET endpoints. Per operation, schemathesis's three phases: the schema's examples, its coverage
cases (boundary values, missing or wrongly typed fields, unsupported media types, unexpected methods)
and MAX_EXAMPLES generated cases, schema-valid and schema-violating. The API key goes with every call.

Properties, per request:
  - never a 5xx, never a hang: a request without an answer within REQUEST_TIMEOUT_S fails the test;
  - POST /v1/segment: every 4xx is JSON in the documented shape
    `{"error": {"status": <the status>, "message": "..."}, "request_id": "<32 hex>"}`, and a 200 is
    the documented answer (a result with a verdict per query);
  - the other endpoints answer JSON objects (the page `/`: HTML).

Bounded and reproducible: `derandomize=True`, no deadline, no example database. About three in four
bodies of the fuzzing phase carry a real PNG instead of the random `image` string or bytes (a
`flatmap_body` hook), so that the queries, model versions and return options reach the model graph
rather than stopping at image decoding; the coverage phase's bodies are left as generated.
"""

from __future__ import annotations

import base64
from collections import Counter

import hypothesis.strategies as st
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.transport.serialization import Binary

from tests.serving.conftest import png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MAX_EXAMPLES = 60  # generated cases per operation (the coverage phase adds its own)
REQUEST_TIMEOUT_S = 30
SEGMENT = "/v1/segment"
OPERATIONS = ["POST /v1/segment", "GET /healthz", "GET /readyz", "GET /v1/models", "GET /"]

# what was sent and answered: (method, path, media type, status) -> count; summarised by the last test
SEEN: Counter = Counter()
MESSAGES: Counter = Counter()  # (status, error message's start) of POST /v1/segment's 4xx

PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
PNG_B64 = base64.b64encode(PNG).decode()


KEEP = object()


def real_image_hook(versions: list[str]):
    """A `flatmap_body` hook: the generated body as it is, or the same body with a real image, no blank
    query, and its own `model_version`, none, or a served one (blank queries and unknown versions are
    refused with 422 before the graph)."""

    def flatmap_body(context, body):
        operation = getattr(context, "operation", None)
        if operation is None or operation.path != SEGMENT or not isinstance(body, dict):
            return st.just(body)
        image = body.get("image")
        if isinstance(image, (Binary, bytes)):  # multipart: a file (Binary is a str subclass: first)
            real = {**body, "image": Binary(PNG)}
        elif isinstance(image, str):  # JSON: base64
            real = {**body, "image": PNG_B64}
        else:
            return st.just(body)
        for field in ("queries", "query"):  # blank queries are refused (422) before the graph
            if isinstance(real.get(field), list):
                real[field] = [q for q in real[field] if not isinstance(q, str) or q.strip()] or ["liver?"]
        if not any(f in real for f in ("queries", "query", "box")):  # queries and box are optional
            real["query" if isinstance(image, (Binary, bytes)) else "queries"] = ["liver?"]

        def with_version(version):
            if version is KEEP:
                return real
            return {k: v for k, v in real.items() if k != "model_version"} | (
                {"model_version": version} if version else {}
            )

        return st.one_of(st.sampled_from([KEEP, None, *versions]).map(with_version), st.just(body))

    return flatmap_body


@pytest.fixture(scope="module")
def api_schema(served):
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {served.key}"},
            "request-timeout": REQUEST_TIMEOUT_S,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "phases": {"stateful": {"enabled": False}},
        }
    )
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json", config=config, timeout=30)
    schema.hook(real_image_hook([served.v1, served.v2]))
    return schema


def check_error_shape(response) -> None:
    """4xx of POST /v1/segment: JSON `{"error": {"status", "message"}, "request_id"}`."""
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{response.status_code} is not JSON: {response.text[:200]!r}") from None
    assert isinstance(body, dict) and set(body) == {"error", "request_id"}, body
    assert body["error"]["status"] == response.status_code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["request_id"], str) and len(body["request_id"]) == 32, body


def check(case, headers: dict) -> None:
    """One generated request and its properties (an AssertionError carries a curl reproducer)."""
    reproduce = f"\nreproduce: {case.as_curl_command(headers=headers)}"
    try:
        response = case.call(headers=headers, timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout:
        raise AssertionError(f"no answer within {REQUEST_TIMEOUT_S} s{reproduce}") from None
    method = case.method.upper()
    SEEN[(method, case.path, case.media_type, response.status_code)] += 1
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]}{reproduce}"
    try:
        if case.path == SEGMENT and method == "POST":
            if 400 <= response.status_code < 500:
                check_error_shape(response)
                MESSAGES[(response.status_code, response.json()["error"]["message"][:48])] += 1
            elif response.status_code == 200:
                body = response.json()
                assert set(body) == {"request_id", "model_version", "results", "timings"}, body
                box_results = all(set(r) == {"box", "decoder", "mask", "mask_area"} for r in body["results"])
                assert body["results"] and (box_results or all(r["verdict"] for r in body["results"])), body
        elif response.status_code == 200 and case.path != "/":
            assert isinstance(response.json(), dict), response.text[:200]
    except AssertionError as exc:
        raise AssertionError(f"{exc}{reproduce}") from None


def operation_test(schema, operation, headers: dict):
    """schemathesis's Hypothesis test of one operation, all three phases. Built here because the lazy
    pytest loader (`schemathesis.pytest.from_fixture`) does not run under pytest 9.2: it sets
    `Node._nodeid`, which pytest no longer has."""
    from schemathesis.generation.hypothesis.builder import (
        HypothesisTestConfig,
        HypothesisTestMode,
        create_test,
    )
    from schemathesis.generation.overrides import with_config_headers

    def test_case(case):
        check(case, headers)

    project = schema.config
    phases = project.phases_for(operation=operation)
    modes = [
        mode
        for mode, enabled in (
            (HypothesisTestMode.EXAMPLES, phases.examples.enabled),
            (HypothesisTestMode.FUZZING, phases.fuzzing.enabled),
            (HypothesisTestMode.COVERAGE, phases.coverage.enabled),
        )
        if enabled
    ]
    explicit = settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    return create_test(
        operation=operation,
        test_func=test_case,
        config=HypothesisTestConfig(
            project=project,
            modes=modes,
            settings=project.get_hypothesis_settings(operation=operation, phase="fuzzing"),
            explicit_settings=explicit,
            override=with_config_headers(project, operation=operation),
        ),
    )


def test_the_schema_lists_the_fuzzed_operations(api_schema):
    listed = {f"{r.ok().method.upper()} {r.ok().path}" for r in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS), "a new endpoint: add it to OPERATIONS"


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_error_and_no_hang_on_generated_requests(api_schema, served, label):
    method, path = label.split(" ", 1)
    operation_test(api_schema, api_schema[path][method], served.headers())()


def test_every_operation_and_body_kind_was_exercised():
    if not SEEN:
        pytest.skip("the fuzz tests did not run in this session")
    by_kind: Counter = Counter()
    for (method, path, media_type, _), count in SEEN.items():
        by_kind[(method, path, media_type)] += count
    print(f"\nfuzz: {sum(SEEN.values())} requests")
    for (method, path, media_type, status), count in sorted(SEEN.items(), key=str):
        print(f"  {method} {path} {media_type or '-'} -> {status}: {count}")
    for (status, message), count in MESSAGES.most_common(12):
        print(f"  POST {SEGMENT} {status} {message!r}: {count}")
    for media_type in ("application/json", "multipart/form-data"):
        assert by_kind[("POST", SEGMENT, media_type)] >= MAX_EXAMPLES // 2, by_kind
    for label in OPERATIONS[1:]:
        method, path = label.split(" ", 1)
        assert any((m, p) == (method, path) for m, p, _ in by_kind), (label, by_kind)
    answered = sum(c for (m, p, _, s), c in SEEN.items() if (m, p, s) == ("POST", SEGMENT, 200))
    assert answered > 0, "no generated request reached the model graph"
