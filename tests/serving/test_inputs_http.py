"""The bad-input suite over HTTP: every case of tests/inputs/cases.py against POST /v1/segment of the
session's Serve app (real HTTP, the tiny model). Each gets its documented status, an error as the
documented JSON (never a 5xx, never a hang), while /healthz keeps answering; large images answer
what the Predictor gives; trickling bodies are cut off; `--via-serve` scores a folder of large images.
"""

from __future__ import annotations

import json
import mimetypes
import select
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from medisee.data.codec import mask_to_rle, rle_to_mask
from tests.inputs import cases
from tests.inputs.cases import (
    FILES,
    QUERIES,
    REQUESTS,
    FileCase,
    RequestCase,
    RequestContext,
    serving_default,
)
from tests.serving.test_api import assert_equal_to_predictor

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SEGMENT = "/v1/segment"
ANSWER_BOUND_S = 180  # bounds on a hang, not timing assertions
HEALTHZ_BOUND_S = 10
SLOW_CLIENTS = 20  # CI's machine is small
SLOW_CLIENT_BOUND_S = 150


def http_params(case: FileCase | RequestCase):
    """The case as a pytest parameter, xfail(strict) while it shows a known bug."""
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail_http)] if case.xfail_http else []
    return pytest.param(case, id=case.id, marks=marks)


HTTP_FILES = [http_params(c) for c in FILES if c.http is not None]
HTTP_REQUESTS = [http_params(c) for c in REQUESTS]


class HealthzWatch:
    """Probes /healthz from a thread while a case runs; every probe must be a 200 within the bound."""

    def __init__(self, url: str):
        self.url, self.failures, self.probes = url, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=HEALTHZ_BOUND_S) as client:
            while not self.stop.is_set():
                self.probe(client)
                self.stop.wait(0.5)

    def probe(self, client: httpx.Client) -> None:
        try:
            response = client.get(self.url)
            if response.status_code != 200:
                self.failures.append(f"{response.status_code}: {response.text[:200]}")
        except httpx.HTTPError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
        self.probes += 1


@contextmanager
def healthz_answers(served):
    watch = HealthzWatch(served.url + "/healthz")
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        watch.stop.set()
        thread.join(HEALTHZ_BOUND_S + 5)
    with httpx.Client(timeout=HEALTHZ_BOUND_S) as client:
        watch.probe(client)
    assert not watch.failures, (
        f"/healthz failed {len(watch.failures)} of {watch.probes}: {watch.failures[:3]}"
    )


def documented_error(response: httpx.Response, status: int) -> str:
    """The message of a documented error answer: `{"error": {"status", "message"}, "request_id"}`."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert body["error"]["status"] == status, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"].strip(), body
    assert isinstance(body["request_id"], str) and body["request_id"], body
    return body["error"]["message"]


def decoded(data: bytes) -> np.ndarray:
    """The image as the application decodes an upload (its own function, its default limits)."""
    from medisee.serving.requests import decode_upload

    return decode_upload(data, serving_default("max_image_pixels"), serving_default("max_image_bytes"))


def assert_answered_at(results: list[dict], hw: tuple[int, int]) -> None:
    """Masks and boxes are in the pixels of the image as decoded (upright): (height, width) `hw`."""
    for result in results:
        if result["mask"] is not None:
            size = tuple(result["mask"]["rle"]["size"])
            assert size == hw, (result["query"], size)
        if result["box"] is not None:
            x0, y0, x1, y1 = result["box"]
            assert 0 <= x0 <= x1 <= hw[1] and 0 <= y0 <= y1 <= hw[0], (result["query"], result["box"])


def assert_masks_match(answers: list[dict], expected) -> None:
    """Beyond test_api's check: each mask has the Predictor's RLE or a Dice of at least 0.999."""
    for got, want in zip(answers, expected, strict=True):
        if want.mask is None:
            continue
        rle = json.dumps(got["mask"]["rle"])
        if json.loads(rle) == json.loads(mask_to_rle(want.mask)):
            continue
        mask = rle_to_mask(rle)
        area = int(mask.sum() + want.mask.sum())
        dice = 2 * int((mask & want.mask).sum()) / area if area else 1.0
        assert dice >= 0.999, f"{got['query']!r}: Dice {dice:.5f} with the Predictor's mask"


@pytest.fixture(scope="module")
def predictor(served):
    from medisee.artifact.model_dir import load_predictor

    return load_predictor(served.v1)


@pytest.mark.parametrize("case", HTTP_FILES)
def test_an_uploaded_file_gets_its_documented_answer(served, predictor, case):
    data = case.data()
    kind = mimetypes.guess_type(case.name)[0] or "application/octet-stream"
    with healthz_answers(served):
        response = httpx.post(
            served.url + SEGMENT,
            files={"image": (case.name, data, kind)},
            data={"query": QUERIES},
            headers=served.headers(),
            timeout=ANSWER_BOUND_S,
        )
    if case.http != 200:
        documented_error(response, case.http)
        return
    assert response.status_code == 200, response.text[:500]
    results = response.json()["results"]
    assert [r["query"] for r in results] == QUERIES
    assert all(r["verdict"] in ("present", "absent", "uncertain") for r in results)
    assert_answered_at(results, case.hw)
    if case.large:
        expected = predictor.predict(decoded(data), QUERIES)
        assert_equal_to_predictor(results, expected)
        assert_masks_match(results, expected)


@pytest.fixture(scope="module")
def context(served) -> RequestContext:
    return RequestContext(
        png=cases.small_png(0),
        versions=(served.v1, served.v2),
        max_upload_bytes=serving_default("max_upload_bytes"),
        max_queries=serving_default("max_queries"),
        max_query_chars=serving_default("max_query_chars"),
    )


def post_case(served, case, context) -> httpx.Response:
    request = case.builder(context)
    headers = {**served.headers(), **request.pop("headers", {})}
    return httpx.post(served.url + SEGMENT, headers=headers, timeout=ANSWER_BOUND_S, **request)


@pytest.mark.parametrize("case", HTTP_REQUESTS)
def test_a_request_gets_its_documented_answer(served, context, case):
    with healthz_answers(served):
        response = post_case(served, case, context)
    assert response.status_code in case.status, response.text[:500]
    if response.status_code == 200:
        assert tuple(r["query"] for r in response.json()["results"]) == case.answers
        return
    assert case.mentions in documented_error(response, response.status_code)


def test_an_unknown_version_is_refused_without_a_served_path(served, context):
    (case,) = [c for c in REQUESTS if c.builder is cases.unknown_model_version]
    message = documented_error(post_case(served, case, context), 422)
    folder = str(Path(served.v1).parent)  # the versions here are local paths; in production URIs
    assert folder not in message and "://" not in message, message


# ----- slow clients --------------------------------------------------------------------------------------
def trickle(served) -> str:
    """One slow client: headers with a Content-Length, then one byte every 2 s, until the server answers
    or closes; returns its answer, "closed", or "no answer" after the bound."""
    url = urlsplit(served.url)
    head = (
        f"POST {SEGMENT} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {served.key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=HEALTHZ_BOUND_S) as sock:
        sock.sendall(head.encode())
        deadline = time.monotonic() + SLOW_CLIENT_BOUND_S
        while time.monotonic() < deadline:
            if select.select([sock], [], [], 2.0)[0]:
                return answer_of(sock)
            try:
                sock.sendall(b" ")
            except OSError:
                return "closed"
    return "no answer"


def answer_of(sock: socket.socket) -> str:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            head, separator, body = data.partition(b"\r\n\r\n")
            length = next(
                (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                None,
            )  # fmt: skip
            if separator and length is not None and len(body) >= length:
                break
    except OSError:  # reset once the answer was sent
        pass
    return data.decode(errors="replace") or "closed"


def check_cut_off(outcome: str) -> None:
    if outcome == "closed":
        return
    status_line, _, rest = outcome.partition("\r\n")
    assert status_line.split(" ")[1:2] == ["408"], outcome[:500]
    body = json.loads(rest.partition("\r\n\r\n")[2])
    assert body["error"]["status"] == 408 and body["error"]["message"] and body["request_id"], body


def test_trickling_bodies_are_cut_off_while_healthz_answers(served, context):
    with healthz_answers(served), ThreadPoolExecutor(SLOW_CLIENTS) as pool:
        outcomes = list(pool.map(lambda _: trickle(served), range(SLOW_CLIENTS)))
    for outcome in outcomes:
        check_cut_off(outcome)
    after = httpx.post(served.url + SEGMENT, files=context.upload(), data={"query": QUERIES[0]},
                       headers=served.headers(), timeout=ANSWER_BOUND_S)  # fmt: skip
    assert after.status_code == 200, after.text[:500]


# ----- batch scoring through the application ------------------------------------------------------------
def test_via_serve_scores_every_large_image(served, tmp_path):
    from tests.serving.test_via_serve import QUERIES as VIA_QUERIES
    from tests.serving.test_via_serve import score

    large = [c for c in FILES if c.large and c.name.endswith(".png")]
    inputs = tmp_path / "large"
    inputs.mkdir()
    for case in large:
        case.write_into(inputs)
    summary, rows = score(inputs, tmp_path / "out", via_serve=served.app_name)
    assert summary["errors"] == 0, summary["error_reasons"]
    assert summary["reconciled"] and summary["inputs"] == summary["results"] + summary["errors"]
    queries = len(VIA_QUERIES.partition(";classes=")[2].split(","))
    assert Counter(r["image_id"] for r in rows) == {c.name: queries for c in large}
