"""Reading and checking a /v1/segment request: every problem becomes an ApiError with a clear status.

400 unreadable image        413 too large (Content-Length, while streaming, or pixel count)
415 unsupported type        422 invalid fields (queries, model version, options)
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel
from pydantic import Field as PydanticField

from medisee.serving.args import AppArgs


class ReturnOptions(BaseModel):
    mask_format: Literal["rle", "png"] = "rle"
    heatmap: bool = False
    overlay: bool = False


class SegmentJSON(BaseModel):
    """The JSON form of POST /v1/segment (documented in the OpenAPI schema; checked by parse_request)."""

    image: str = PydanticField(
        description="base64 of a PNG, JPEG, TIFF, BMP or DICOM file (a data: URL is fine)"
    )
    queries: list[str] = PydanticField(
        min_length=1, description="questions about the image, answered separately"
    )
    model_version: str | None = PydanticField(
        None, description="a served version (GET /v1/models); default: the served one"
    )
    return_: ReturnOptions = PydanticField(default_factory=ReturnOptions, alias="return")


def inline_refs(schema: dict) -> dict:
    """Replace `#/$defs/X` references by the definitions (they would not resolve inside OpenAPI)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def openapi_request_body() -> dict:
    """OpenAPI requestBody of /v1/segment: JSON or multipart (the image as a file)."""
    multipart = {
        "type": "object",
        "required": ["image", "query"],
        "properties": {
            "image": {"type": "string", "format": "binary"},
            "query": {"type": "array", "items": {"type": "string"}},
            "model_version": {"type": "string"},
            "mask_format": {"type": "string", "enum": ["rle", "png"]},
            "heatmap": {"type": "boolean"},
            "overlay": {"type": "boolean"},
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_refs(SegmentJSON.model_json_schema(by_alias=True))},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class SegmentRequest:
    image: np.ndarray  # uint8 H×W×3
    queries: list[str]
    model_version: str | None = None
    mask_format: str = "rle"  # rle | png
    heatmap: bool = False
    overlay: bool = False


async def read_body(request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed `limit` (header first, then while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request, body: bytes, args: AppArgs) -> SegmentRequest:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        fields, image_bytes = await _multipart(request, body)
    elif content_type == "application/json":
        fields, image_bytes = _json(body)
    else:
        raise ApiError(
            415,
            f"unsupported content type {content_type or 'none'!r}: send multipart/form-data or application/json",
        )
    return SegmentRequest(
        image=decode_upload(image_bytes, args.max_image_pixels),
        queries=check_queries(fields.get("queries"), args),
        model_version=fields.get("model_version") or None,
        mask_format=_choice(fields.get("mask_format", "rle"), ("rle", "png"), "mask_format"),
        heatmap=_flag(fields.get("heatmap", False), "heatmap"),
        overlay=_flag(fields.get("overlay", False), "overlay"),
    )


async def _multipart(request, body: bytes) -> tuple[dict, bytes]:
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=64).parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "multipart field 'image' (a file) is required")
    fields = {k: v for k, v in form.items() if k not in ("image", "query")}
    queries = [q for q in form.getlist("query") if isinstance(q, str)]
    if "queries" in fields:
        try:
            fields["queries"] = json.loads(fields["queries"])
        except json.JSONDecodeError:
            fields["queries"] = [fields["queries"]]
    elif queries:
        fields["queries"] = queries
    return fields, await upload.read()


def _json(body: bytes) -> tuple[dict, bytes]:
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise ApiError(422, "the JSON body must be an object")
    image = fields.get("image")
    if not isinstance(image, str) or not image:
        raise ApiError(422, "field 'image' (base64 of a PNG, JPEG or DICOM file) is required")
    try:
        data = base64.b64decode(
            image.split(",", 1)[-1] if image.startswith("data:") else image, validate=True
        )
    except (binascii.Error, ValueError):
        raise ApiError(400, "field 'image' is not valid base64") from None
    returns = fields.get("return") or {}
    if not isinstance(returns, dict):
        raise ApiError(422, "field 'return' must be an object")
    return {**fields, **{k: returns[k] for k in ("mask_format", "heatmap", "overlay") if k in returns}}, data


def check_queries(queries, args: AppArgs) -> list[str]:
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not queries:
        raise ApiError(422, "at least one query is required ('queries': [...] or repeated 'query' fields)")
    if len(queries) > args.max_queries:
        raise ApiError(422, f"{len(queries)} queries: at most {args.max_queries} per request")
    out = []
    for q in queries:
        if not isinstance(q, str) or not q.strip():
            raise ApiError(422, "every query must be a non-empty string")
        if len(q) > args.max_query_chars:
            raise ApiError(422, f"a query of {len(q)} characters: at most {args.max_query_chars}")
        out.append(q.strip())
    return out


def _choice(value, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ApiError(422, f"{name} must be one of {', '.join(allowed)}")
    return value


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ApiError(422, f"{name} must be true or false")


def sniff(data: bytes) -> str:
    if data[128:132] == b"DICM":  # first: a DICOM preamble may itself look like a TIFF header
        return "dicom"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM":
        return "bmp"
    return "unknown"


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    kind = sniff(data)
    if kind == "unknown":
        raise ApiError(
            415, "unsupported image type: send PNG, JPEG, TIFF, BMP or DICOM (with its DICM preamble)"
        )
    if kind == "dicom":
        return _dicom(data, max_pixels)
    from PIL import Image

    from medisee.data.codec import as_rgb, to_uint8_image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ApiError(
                    413,
                    f"{img.width}×{img.height} pixels exceeds the limit of {max_pixels} (decompression bomb refused)",
                )
            img.load()
            return as_rgb(np.asarray(to_uint8_image(img)))
    except ApiError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise ApiError(400, f"unreadable {kind} image: {type(exc).__name__}") from None


def _dicom(data: bytes, max_pixels: int) -> np.ndarray:
    import pydicom

    from medisee.data.sources.dicom import read_frames
    from medisee.scoring.decode import DecodeOptions, WindowContext

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, cols = int(header.get("Rows", 0)), int(header.get("Columns", 0))
    except Exception as exc:  # pydicom raises many types for damaged files
        raise ApiError(400, f"unreadable DICOM: {type(exc).__name__}") from None
    if rows * cols > max_pixels:
        raise ApiError(413, f"{cols}×{rows} pixels exceeds the limit of {max_pixels}")
    try:
        _, frames = read_frames(data, WindowContext(DecodeOptions()))
    except Exception as exc:  # truncated pixel data and the like
        raise ApiError(400, f"unreadable DICOM pixel data: {type(exc).__name__}") from None
    return frames[0]
