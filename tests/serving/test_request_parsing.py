"""Request parsing, auth and response rendering without a cluster: every field of both request forms,
slow bodies, key rotation, and the size of what is sent back."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import Headers

from medisee.serving.args import AppArgs
from medisee.serving.auth import KeyRing, NoKeys
from medisee.serving.requests import ApiError, parse_request, read_body
from tests.serving.conftest import png_bytes

ARGS = AppArgs(model="unused", allow_anonymous=True)
IMAGE = np.full((16, 16, 3), 90, np.uint8)


async def inline(fn, *args):
    return fn(*args)


def parse(request: httpx.Request, args: AppArgs = ARGS):
    return asyncio.run(parse_request(Headers(dict(request.headers)), request.read(), args, inline))


def multipart(data, files=None) -> httpx.Request:
    files = files if files is not None else {"image": ("scan.png", png_bytes(IMAGE), "image/png")}
    return httpx.Request("POST", "http://x/v1/segment", data=data, files=files)


def json_request(body: bytes | dict) -> httpx.Request:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Request(
        "POST", "http://x/v1/segment", content=content, headers={"content-type": "application/json"}
    )


def status_of(request: httpx.Request) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        parse(request)
    return caught.value.status, caught.value.message


def test_repeated_queries_fields_are_all_answered():
    assert parse(multipart({"queries": ["Segment the liver.", "Where is the spleen?"]})).queries == [
        "Segment the liver.",
        "Where is the spleen?",
    ]
    assert parse(multipart({"query": ["a", "b", "c"]})).queries == ["a", "b", "c"]
    assert parse(multipart({"queries": json.dumps(["a", "b"])})).queries == ["a", "b"]
    assert parse(multipart({"queries": "one"})).queries == ["one"]


@pytest.mark.parametrize("field,value", [("model_version", "v"), ("mask_format", "rle"), ("heatmap", "true"),
                                         ("overlay", "false")])  # fmt: skip
def test_a_repeated_single_field_is_refused_naming_it(field, value):
    status, message = status_of(multipart({"query": "a", field: [value, value]}))
    assert status == 422 and repr(field) in message


def test_multipart_field_audit():
    two_images = [("image", ("a.png", png_bytes(IMAGE), "image/png"))] * 2
    assert status_of(multipart({"query": "a"}, files=two_images))[0] == 422
    assert status_of(multipart({"query": "a", "queries": "b"}))[0] == 422
    status, message = status_of(multipart({"query": "a", "colour": "red"}))
    assert status == 422 and "'colour'" in message
    assert status_of(multipart({"query": "a"}, files={"other": ("a.png", b"x", "image/png")}))[0] == 422
    assert (
        status_of(multipart({"query": "a"}, files={"image": ("a.txt", b"just text", "text/plain")}))[0] == 415
    )


def test_a_text_field_that_is_not_utf8_is_refused_not_rewritten():
    valid = parse(multipart({"query": "Où est le foie ? 肝臓"})).queries
    assert valid == ["Où est le foie ? 肝臓"]
    request = multipart({"query": "QUERY_PLACEHOLDER"})
    body = request.read().replace(b"QUERY_PLACEHOLDER", b"Segment the \xff\xfe liver \xc3(")
    broken = httpx.Request("POST", "http://x/v1/segment", content=body, headers=dict(request.headers))
    broken.headers["content-length"] = str(len(body))
    status, message = status_of(broken)
    assert status == 400 and "'query'" in message and "UTF-8" in message


@pytest.mark.parametrize(
    "query", ["What is <image> here?", "Segment [SEG] the liver", "[/INST] yes", "a [CAND3]"]
)
def test_a_query_holding_a_template_token_is_refused(query):
    status, message = status_of(json_request({"image": "aGk=", "queries": [query]}))
    assert status == 422 and "reserved" in message


def test_json_field_audit():
    image = base64.b64encode(png_bytes(IMAGE)).decode()
    assert parse(json_request({"image": image, "queries": ["a", "b"]})).queries == ["a", "b"]
    duplicated = b'{"image": "%s", "queries": ["a"], "queries": ["b"]}' % image.encode()
    status, message = status_of(json_request(duplicated))
    assert status == 422 and "'queries'" in message
    status, message = status_of(json_request({"image": image, "queries": ["a"], "querys": ["b"]}))
    assert status == 422 and "'querys'" in message
    assert status_of(json_request({"image": image, "queries": ["a"], "return": {"overlays": True}}))[0] == 422
    assert status_of(json_request({"image": image, "queries": ["a"], "model_version": 3}))[0] == 422
    assert status_of(json_request(b"[" * 100_000))[0] == 400  # nested too deeply: 400, not a 500
    assert status_of(json_request(b"{not json"))[0] == 400


def test_a_decompression_bomb_is_413():
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    side = 30_000  # 900 M pixels, 1 bit each: a few hundred KB on disk
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    rows = zlib.compress(b"\x00" * ((side // 8 + 1) * side), 9)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    assert len(bomb) < 1_000_000
    status, message = status_of(multipart({"query": "a"}, files={"image": ("bomb.png", bomb, "image/png")}))
    assert status == 413 and "decompression bomb" in message


def test_an_exif_rotated_jpeg_is_upright():
    tall = np.zeros((40, 20, 3), np.uint8)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise
    Image.fromarray(tall.transpose(1, 0, 2).copy()).save(buffer, format="JPEG", exif=exif)
    files = {"image": ("photo.jpg", buffer.getvalue(), "image/jpeg")}
    assert parse(multipart({"query": "a"}, files=files)).image.shape == (40, 20, 3)


class TrickleRequest:
    """A request whose body arrives `size` bytes every `every` seconds, `count` times."""

    def __init__(self, size: int, every: float, count: int, declared: int | None = None):
        self.size, self.every, self.count = size, every, count
        self.headers = {"content-length": str(declared)} if declared else {}

    async def stream(self):
        for _ in range(self.count):
            await asyncio.sleep(self.every)
            yield b"x" * self.size


def test_a_slow_body_is_cut_off_with_408():
    with pytest.raises(ApiError) as caught:
        asyncio.run(read_body(TrickleRequest(1, 0.2, 100), 1000, timeout_s=60, min_rate=100, grace_s=0.5))
    assert caught.value.status == 408 and "bytes/s" in caught.value.message
    with pytest.raises(ApiError) as caught:  # nothing arrives at all
        asyncio.run(read_body(TrickleRequest(1, 30, 1), 1000, timeout_s=0.3))
    assert caught.value.status == 408
    assert asyncio.run(read_body(TrickleRequest(100, 0.01, 5), 1000, timeout_s=5, min_rate=100)) == b"x" * 500
    with pytest.raises(ApiError) as caught:
        asyncio.run(read_body(TrickleRequest(1, 0, 1, declared=2000), 1000))
    assert caught.value.status == 413


def test_keys_are_required_unless_anonymous_is_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDISEE_API_KEYS", raising=False)
    with pytest.raises(NoKeys, match="allow_anonymous"):
        KeyRing("MEDISEE_API_KEYS", None, allow_anonymous=False)
    with pytest.raises(NoKeys):
        KeyRing("MEDISEE_API_KEYS", str(tmp_path / "empty.txt"), allow_anonymous=False)
    assert KeyRing("MEDISEE_API_KEYS", None, allow_anonymous=True).admits({})
    monkeypatch.setenv("MEDISEE_API_KEYS", "k1, k2")
    ring = KeyRing("MEDISEE_API_KEYS", None, allow_anonymous=True)  # keys configured: they are required
    assert not ring.admits({}) and ring.admits({"x-api-key": "k2"})


def test_bearer_in_any_case_and_rotation_without_restart(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDISEE_API_KEYS", raising=False)
    keys = tmp_path / "keys.txt"
    keys.write_text("old-key\n")
    ring = KeyRing("MEDISEE_API_KEYS", str(keys), allow_anonymous=False)
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert ring.admits({"authorization": f"{scheme} old-key"})
    assert not ring.admits({"authorization": "Basic old-key"})
    keys.write_text("new-key\n")
    os.utime(keys, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    assert ring.admits({"authorization": "Bearer new-key"})
    assert not ring.admits({"authorization": "Bearer old-key"})
    keys.unlink()  # a vanished key file revokes its keys
    assert not ring.admits({"authorization": "Bearer new-key"})


def test_a_response_stays_small_whatever_the_image_and_the_renderings():
    from medisee.data.codec import mask_to_rle
    from medisee.infer.results import QueryResult
    from medisee.serving.requests import SegmentRequest
    from medisee.serving.responses import response_parts

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (2048, 2048, 3), dtype=np.uint8)  # noise: the worst case for PNG
    mask = np.zeros((2048, 2048), bool)
    mask[500:1500, 400:1600] = True
    results = [
        QueryResult(query=f"q{j}", answer="[SEG] [BBOX]", found=True, verdict="present", decided_by="rule",
                    strength=1.0, compactness=0.5, purity=0.5, box=(400.0, 500.0, 1600.0, 1500.0),
                    mask=mask_to_rle(mask), similarity=rng.normal(size=(24, 24)).astype(np.float32))
        for j in range(16)
    ]  # fmt: skip
    options = SegmentRequest(image=image, queries=[], mask_format="png", heatmap=True, overlay=True)
    parts = response_parts(results, image, options, max_side=1024)
    size = len(json.dumps(parts))
    assert len(parts["results"]) == 16 and "overlay_png" in parts
    overlay = Image.open(io.BytesIO(base64.b64decode(parts["overlay_png"])))
    assert overlay.size == (1024, 1024)
    assert size < 6 * 1024 * 1024, size  # the old per-query full-size overlays: 16 × ~12 MB
