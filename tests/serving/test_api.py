"""The Serve graph over real HTTP: answers equal the Predictor, every error has its status, versions."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from medisee.data import phantom
from medisee.data.codec import rle_to_mask
from tests.serving.conftest import png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.integration]

QUERIES = ["Segment the liver.", "Where is the spleen?", "Can you find the left kidney?"]


def image(index: int = 0) -> np.ndarray:
    return phantom.generate(seed=11, index=index, size=128)[0]


def post_json(served, img: np.ndarray, queries, timeout=60, **fields) -> httpx.Response:
    body = {"image": base64.b64encode(png_bytes(img)).decode(), "queries": queries, **fields}
    return httpx.post(served.url + "/v1/segment", json=body, headers=served.headers(), timeout=timeout)


def assert_equal_to_predictor(answers: list[dict], expected) -> None:
    assert len(answers) == len(expected)
    for got, want in zip(answers, expected, strict=True):
        assert (got["query"], got["answer"], got["found"]) == (want.query, want.answer, want.found)
        assert (got["verdict"], got["decided_by"]) == (want.verdict, want.decided_by)
        assert got["scores"]["strength"] == pytest.approx(want.strength, abs=1e-4)
        if want.mask is None:
            assert got["mask"] is None and got["box"] is None
            continue
        np.testing.assert_allclose(got["box"], want.box, atol=1e-3)
        rle = got["mask"]["rle"]
        mask = rle_to_mask(json.dumps(rle))
        assert (mask != want.mask).mean() < 1e-3


@pytest.fixture(scope="module")
def predictors(served):
    from medisee.artifact.model_dir import load_predictor

    return {served.v1: load_predictor(served.v1), served.v2: load_predictor(served.v2)}


def test_json_and_multipart_answers_equal_the_predictor(served, predictors):
    img = image(0)
    expected = predictors[served.v1].predict(img, QUERIES)
    response = post_json(served, img, QUERIES)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == served.v1 and len(body["request_id"]) == 32
    assert set(body["timings"]) == {"mllm_s", "verifier_s", "decoder_s", "total_s"}
    assert_equal_to_predictor(body["results"], expected)

    files = {"image": ("scan.png", png_bytes(img), "image/png")}
    multipart = httpx.post(
        served.url + "/v1/segment", files=files, data={"query": QUERIES}, headers=served.headers(), timeout=60
    )
    assert multipart.status_code == 200, multipart.text
    assert_equal_to_predictor(multipart.json()["results"], expected)


def test_several_queries_equal_one_query_at_a_time(served):
    img = image(1)
    together = post_json(served, img, QUERIES).json()["results"]
    for query, combined in zip(QUERIES, together, strict=True):
        (alone,) = post_json(served, img, [query]).json()["results"]
        assert alone["verdict"] == combined["verdict"] and alone["mask"] == combined["mask"]
        np.testing.assert_allclose(alone["scores"]["strength"], combined["scores"]["strength"], atol=1e-5)


def test_png_mask_heatmap_and_overlay_are_returned_on_request(served):
    img = image(2)
    body = post_json(
        served, img, QUERIES[:1], **{"return": {"mask_format": "png", "heatmap": True, "overlay": True}}
    ).json()
    (result,) = body["results"]
    for rendering in (result["heatmap_png"], body["overlay_png"]):  # one overlay per image, every query on it
        assert Image.open(io.BytesIO(base64.b64decode(rendering))).size == (128, 128)
    if result["mask"] is not None:
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask"]["png"])))) > 0
        assert mask.sum() == result["mask_area"]


def test_a_dicom_upload_is_answered(served):
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    response = httpx.post(served.url + "/v1/segment", files={"image": ("ct.dcm", data, "application/dicom")},
                          data={"query": "Segment the liver."}, headers=served.headers(), timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["found"]


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["status"] == status and body["request_id"]
    return body["error"]["message"]


def test_errors_have_their_status_and_a_clear_message(served):
    from pydicom.data import get_testdata_file

    url, h = served.url + "/v1/segment", served.headers()
    img = png_bytes(image(0))
    assert "base64" in error_of(httpx.post(url, json={"image": "%%%", "queries": ["a"]}, headers=h), 400)
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50
    assert "unreadable png" in error_of(
        httpx.post(url, files={"image": ("x.png", broken)}, data={"query": "a"}, headers=h), 400
    )
    truncated = open(get_testdata_file("MR_truncated.dcm"), "rb").read()
    assert "DICOM" in error_of(
        httpx.post(url, files={"image": ("t.dcm", truncated)}, data={"query": "a"}, headers=h), 400
    )
    assert "content type" in error_of(
        httpx.post(url, content=b"x", headers={**h, "content-type": "text/plain"}), 415
    )
    assert "unsupported image type" in error_of(
        httpx.post(url, files={"image": ("x.gif", b"GIF89a....")}, data={"query": "a"}, headers=h), 415
    )
    assert "exceeds the limit" in error_of(
        httpx.post(url, content=b"0" * (21 * 1024 * 1024), headers={**h, "content-type": "application/json"}),
        413,
    )
    bomb = io.BytesIO()
    Image.new("1", (8000, 7000)).save(bomb, format="PNG")  # 56 M pixels in a few kB
    assert "decompression bomb" in error_of(
        httpx.post(url, files={"image": ("bomb.png", bomb.getvalue())}, data={"query": "a"}, headers=h), 413
    )
    for fields, message in (
        ({"queries": []}, "at least one query"),
        ({"queries": ["  "]}, "non-empty"),
        ({"queries": ["x" * 501]}, "at most 500"),
        ({"queries": ["q"] * 17}, "at most 16"),
        ({"queries": ["q"], "model_version": "models:/elsewhere@x"}, "unknown model_version"),
        ({"queries": ["q"], "return": {"mask_format": "gif"}}, "mask_format"),
    ):
        body = {"image": base64.b64encode(img).decode(), **fields}
        assert message in error_of(httpx.post(url, json=body, headers=h, timeout=30), 422)
    assert "API key" in error_of(httpx.post(url, json={"image": "", "queries": ["q"]}), 401)
    assert "API key" in error_of(
        httpx.post(url, json={"image": "", "queries": ["q"]}, headers={"X-API-Key": "wrong"}), 401
    )


def test_health_readiness_models_and_openapi(served):
    assert httpx.get(served.url + "/healthz").json() == {"status": "alive"}
    ready = httpx.get(served.url + "/readyz", timeout=60)
    assert ready.status_code == 200 and ready.json()["golden"]["ok"]
    assert httpx.get(served.url + "/v1/models").status_code == 401
    models = httpx.get(served.url + "/v1/models", headers=served.headers()).json()
    assert models["default"] == served.v1 and models["versions"] == [served.v1, served.v2]
    assert "/v1/segment" in httpx.get(served.url + "/openapi.json").json()["paths"]
    assert httpx.get(served.url + "/docs").status_code == 200


def test_a_version_is_chosen_per_request_by_field_or_header(served, predictors):
    img = image(3)
    expected = predictors[served.v2].predict(img, QUERIES[:2])
    by_field = post_json(served, img, QUERIES[:2], model_version=served.v2).json()
    assert by_field["model_version"] == served.v2
    assert_equal_to_predictor(by_field["results"], expected)
    body = {"image": base64.b64encode(png_bytes(img)).decode(), "queries": QUERIES[:2]}
    by_header = httpx.post(served.url + "/v1/segment", json=body, timeout=60,
                           headers=served.headers(serve_multiplexed_model_id=served.v2)).json()  # fmt: skip
    assert_equal_to_predictor(by_header["results"], expected)
    back = post_json(served, img, QUERIES[:2]).json()  # v1 again on the same replicas
    assert_equal_to_predictor(back["results"], predictors[served.v1].predict(img, QUERIES[:2]))


def test_many_clients_at_once_each_get_their_own_answer(served, predictors):
    import asyncio

    images = [image(i) for i in range(6)]
    jobs = [(i % 6, [QUERIES[i % 3]]) for i in range(24)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(i, queries):
                body = {"image": base64.b64encode(png_bytes(images[i])).decode(), "queries": queries}
                return await client.post(served.url + "/v1/segment", json=body, headers=served.headers())

            return await asyncio.gather(*(one(i, q) for i, q in jobs))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(jobs)
    assert len({r.json()["request_id"] for r in responses}) == len(jobs)
    for (i, queries), response in zip(jobs, responses, strict=True):
        assert_equal_to_predictor(
            response.json()["results"], predictors[served.v1].predict(images[i], queries)
        )


def test_config_file_is_what_serve_build_writes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "built.yaml"
    serve_cli = Path(sys.executable).with_name("serve")
    done = subprocess.run(
        [str(serve_cli), "build", "serve.app:app", "-o", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    built, ours = (
        yaml.safe_load(out.read_text()),
        yaml.safe_load((root / "serve" / "config.yaml").read_text()),
    )
    built["applications"][0]["name"] = "medisee"
    (app,) = ours["applications"]
    # serve build writes no runtime_env; ours names the registered model and the mounted key file
    assert built["applications"][0]["runtime_env"] == {}
    built["applications"][0]["runtime_env"] = app["runtime_env"]
    assert ours == built
    from medisee.serving.args import AppArgs

    served = AppArgs.model_validate_json(app["runtime_env"]["env_vars"]["MEDISEE_SERVE_ARGS"])
    assert served.api_keys_file == "/etc/medisee/api-keys/keys" and not served.allow_anonymous
