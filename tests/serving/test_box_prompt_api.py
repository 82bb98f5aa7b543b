"""Box-prompt mode of POST /v1/segment (`box`, no queries): parsing of both request forms without a
cluster, the rendering of its results, and the answer over real HTTP equal to Predictor.segment_box."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import Headers

from medisee.data import phantom
from medisee.data.codec import mask_to_rle, rle_to_mask
from medisee.infer.results import Decoded
from medisee.serving.args import AppArgs
from medisee.serving.requests import ApiError, SegmentRequest, openapi_request_body, parse_request
from medisee.serving.responses import response_parts
from tests.serving.conftest import png_bytes

ARGS = AppArgs(model="unused", allow_anonymous=True)
IMAGE = np.full((30, 40, 3), 90, np.uint8)  # 40 wide, 30 high


async def inline(fn, *args):
    return fn(*args)


def parse(request: httpx.Request, args: AppArgs = ARGS) -> SegmentRequest:
    return asyncio.run(parse_request(Headers(dict(request.headers)), request.read(), args, inline))


def json_request(fields: dict, image: np.ndarray = IMAGE) -> httpx.Request:
    body = {"image": base64.b64encode(png_bytes(image)).decode(), **fields}
    return httpx.Request("POST", "http://x/v1/segment", json=body)


def form_request(data, image: np.ndarray = IMAGE) -> httpx.Request:
    files = {"image": ("scan.png", png_bytes(image), "image/png")}
    return httpx.Request("POST", "http://x/v1/segment", data=data, files=files)


def refused(request: httpx.Request, args: AppArgs = ARGS) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        parse(request, args)
    return caught.value.status, caught.value.message


# ----- parsing: good boxes ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "box, boxes",
    [
        ([10, 5, 30, 20], [[10, 5, 30, 20]]),
        ([0.5, 0, 39, 29], [[0.5, 0, 39, 29]]),  # the last pixel is inclusive
        ([[10, 5, 30, 20], [0, 0, 0, 0]], [[10, 5, 30, 20], [0, 0, 0, 0]]),
        ([-5, -5, 50, 50], [[-5, -5, 50, 50]]),  # larger than the image but meeting it
    ],
)
def test_a_box_in_either_form_is_box_prompt_mode(box, boxes):
    for request in (json_request({"box": box}), form_request({"box": json.dumps(box)})):
        parsed = parse(request)
        assert parsed.boxes == boxes and parsed.queries == []
        assert parsed.image.shape == (30, 40, 3)


def test_return_options_and_version_go_with_a_box():
    parsed = parse(
        json_request(
            {"box": [1, 2, 3, 4], "model_version": "v2", "return": {"mask_format": "png", "overlay": True}}
        )
    )
    assert (parsed.model_version, parsed.mask_format, parsed.overlay) == ("v2", "png", True)
    parsed = parse(form_request({"box": "[1, 2, 3, 4]", "mask_format": "png", "overlay": "true"}))
    assert (parsed.boxes, parsed.mask_format, parsed.overlay) == ([[1, 2, 3, 4]], "png", True)


def test_without_a_box_queries_are_parsed_as_before():
    assert parse(json_request({"queries": ["Segment the liver."]})).boxes is None
    assert parse(json_request({"queries": ["Segment the liver."], "box": None})).boxes is None
    assert parse(form_request({"query": ["a", "b"]})).queries == ["a", "b"]


# ----- parsing: bad boxes ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "box, words",
    [
        ([1, 2, 3], "four finite numbers"),
        ([1, 2, 3, 4, 5], "four finite numbers"),
        ([[1, 2], [3, 4]], "four finite numbers"),
        (["1", "2", "3", "4"], "four finite numbers"),  # strings are no coordinates, even numeric ones
        ([True, 0, 1, 1], "four finite numbers"),
        ([1, None, 3, 4], "four finite numbers"),
        ([[1, 2, 3, 4], 5], "four finite numbers"),
        ([[[1, 2, 3, 4]]], "four finite numbers"),
        ([30, 5, 10, 20], "x1 < x0"),
        ([10, 20, 30, 5], "y1 < y0"),
        ([40, 0, 50, 10], "outside the 40 x 30 image"),  # x0 past the last column
        ([0, 30, 10, 40], "outside the 40 x 30 image"),
        ([-10, -10, -1, -1], "outside the 40 x 30 image"),
        ([], "list of such boxes"),
        ({"x0": 1}, "list of such boxes"),
        ("[1, 2, 3, 4]", "list of such boxes"),  # JSON takes the list itself, not its text
    ],
)
def test_a_bad_json_box_is_422_with_the_reason(box, words):
    status, message = refused(json_request({"box": box}))
    assert status == 422 and words in message, message


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2, 3]", "four finite numbers"),
        ("[1, 2, NaN, 4]", "four finite numbers"),
        ("[1, 2, Infinity, 4]", "four finite numbers"),
        ("[30, 5, 10, 20]", "x1 < x0"),
        ("[100, 100, 120, 120]", "outside the 40 x 30 image"),
        ("1, 2, 3, 4", "must be JSON"),
        ("null", "must be JSON"),
        ("", "must be JSON"),
        ("[]", "list of such boxes"),
    ],
)
def test_a_bad_form_box_is_422_with_the_reason(text, words):
    status, message = refused(form_request({"box": text}))
    assert status == 422 and words in message, message


def test_a_box_with_queries_is_422_naming_both():
    for request in (
        json_request({"box": [1, 2, 3, 4], "queries": ["Segment the liver."]}),
        json_request({"box": [1, 2, 3, 4], "queries": []}),
        form_request({"box": "[1, 2, 3, 4]", "query": "Segment the liver."}),
        form_request({"box": "[1, 2, 3, 4]", "queries": json.dumps(["a", "b"])}),
    ):
        status, message = refused(request)
        assert status == 422 and "'box'" in message and "'queries'" in message, message


def test_the_number_of_boxes_is_bounded():
    assert len(parse(json_request({"box": [[0, 0, 5, 5]] * 16})).boxes) == 16  # the default max_boxes
    status, message = refused(json_request({"box": [[0, 0, 5, 5]] * 17}))
    assert status == 422 and "at most 16" in message
    status, message = refused(
        form_request({"box": json.dumps([[0, 0, 5, 5]] * 3)}), ARGS.model_copy(update={"max_boxes": 2})
    )
    assert status == 422 and "3 boxes: at most 2" in message


def test_a_repeated_form_box_is_refused():
    status, message = refused(form_request({"box": ["[1, 2, 3, 4]", "[5, 6, 7, 8]"]}))
    assert status == 422 and "'box'" in message and "once" in message


def test_neither_queries_nor_a_box_is_422_naming_both():
    status, message = refused(json_request({}))
    assert status == 422 and "at least one query" in message and "'box'" in message
    assert refused(form_request({}))[0] == 422


def test_the_openapi_body_documents_box_in_both_forms():
    content = openapi_request_body()["requestBody"]["content"]
    as_json = content["application/json"]["schema"]
    assert as_json["required"] == ["image"] and {"queries", "box"} <= set(as_json["properties"])
    one_box, several, _null = as_json["properties"]["box"]["anyOf"]
    assert (one_box["minItems"], one_box["maxItems"], one_box["items"]["type"]) == (4, 4, "number")
    assert several["items"] == one_box and several["minItems"] == 1
    assert "box-prompt" in as_json["properties"]["box"]["description"]
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["box"]["type"] == "string"
    assert "box-prompt" in form["properties"]["box"]["description"]


# ----- rendering -------------------------------------------------------------------------------------
def test_box_results_render_like_query_results():
    mask = np.zeros((30, 40), bool)
    mask[5:21, 10:31] = True
    decoded = Decoded(box=(10.0, 5.0, 30.0, 20.0), box_unclipped=(10.0, 5.0, 30.0, 20.0), mask=None,
                      mask_score=0.8, iou_score=0.7, area_fraction=float(mask.mean()), mask_rle=mask_to_rle(mask))  # fmt: skip
    options = SegmentRequest(
        image=IMAGE, queries=[], boxes=[[10, 5, 30, 20]], mask_format="rle", overlay=True
    )
    parts = response_parts([decoded], IMAGE, options, max_side=1024)
    (result,) = parts["results"]
    assert set(result) == {"box", "decoder", "mask", "mask_area"}
    assert result["box"] == [10.0, 5.0, 30.0, 20.0] and result["mask_area"] == int(mask.sum())
    assert result["decoder"] == {"mask_score": 0.8, "iou_score": 0.7, "area_fraction": float(mask.mean())}
    assert result["mask"]["format"] == "rle"
    np.testing.assert_array_equal(rle_to_mask(json.dumps(result["mask"]["rle"])), mask)
    assert Image.open(io.BytesIO(base64.b64decode(parts["overlay_png"]))).size == (40, 30)
    options.mask_format = "png"
    (result,) = response_parts([decoded], IMAGE, options, max_side=1024)["results"]
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask"]["png"])))) > 0
    np.testing.assert_array_equal(png, mask)


# ----- over real HTTP ----------------------------------------------------------------------------------
def scan(index: int = 0) -> np.ndarray:
    return np.ascontiguousarray(phantom.generate(seed=23, index=index, size=128)[0][:, :112])  # not square


@pytest.mark.slow
@pytest.mark.integration
def test_a_box_over_http_answers_what_predictor_segment_box_gives(served):
    from medisee.artifact.model_dir import load_predictor

    predictor = load_predictor(served.v1)
    img, boxes = scan(0), [[20, 30, 90, 100], [0, 0, 40.5, 60]]
    url, headers = served.url + "/v1/segment", served.headers()

    body = {"image": base64.b64encode(png_bytes(img)).decode(), "box": boxes}
    response = httpx.post(url, json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_version"] == served.v1 and len(answer["request_id"]) == 32
    assert set(answer["timings"]) == {"decoder_s", "total_s"}
    assert len(answer["results"]) == len(boxes)
    for got, box in zip(answer["results"], boxes, strict=True):
        want = predictor.segment_box(img, box)
        assert got["box"] == [float(v) for v in box] == list(want.box)
        mask = rle_to_mask(json.dumps(got["mask"]["rle"]))
        assert mask.shape == img.shape[:2] and got["mask_area"] == int(mask.sum())
        assert (mask != want.mask).mean() < 1e-3
        assert got["decoder"]["iou_score"] == pytest.approx(want.iou_score, abs=1e-4)
        assert got["decoder"]["mask_score"] == pytest.approx(want.mask_score, abs=1e-4)
        assert got["decoder"]["area_fraction"] == pytest.approx(want.area_fraction, abs=1e-3)

    files = {"image": ("scan.png", png_bytes(img), "image/png")}
    form = {"box": json.dumps(boxes[0]), "mask_format": "png"}
    response = httpx.post(url, files=files, data=form, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    (got,) = response.json()["results"]
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["mask"]["png"])))) > 0
    assert (png != predictor.segment_box(img, boxes[0]).mask).mean() < 1e-3

    for fields, words in (({"box": [0, 0, 200, 10], "queries": ["Segment the liver."]}, "not both"),
                          ({"box": [120, 0, 130, 10]}, "outside the 112 x 128 image")):  # fmt: skip
        response = httpx.post(url, json={**body, **fields}, headers=headers, timeout=60)
        assert response.status_code == 422, response.text
        error = response.json()
        assert error["error"]["status"] == 422 and words in error["error"]["message"] and error["request_id"]
