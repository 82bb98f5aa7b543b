"""Reading and checking a /v1/segment request: every problem becomes an ApiError with a clear status.

400 unreadable image        413 too large (Content-Length, while streaming, or pixel count)
415 unsupported type        422 invalid fields (queries, boxes, model version, options)

A request holds queries (each answered through MLLM -> verifier -> decoder) or, in box-prompt mode,
boxes: pixel xyxy of the uploaded image (last pixel inclusive), each prompting the mask decoder
alone, MedSAM-style (no text, no MLLM, no verifier). Not both.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel
from pydantic import Field as PydanticField

from medisee.data.prompts import reserved_tokens
from medisee.infer.results import BadBox, check_box
from medisee.serving.args import AppArgs


class ReturnOptions(BaseModel):
    mask_format: Literal["rle", "png"] = "rle"
    heatmap: bool = False
    overlay: bool = False


Box = Annotated[list[float], PydanticField(min_length=4, max_length=4)]
BOX_DESCRIPTION = (
    "box-prompt mode, instead of queries: [x0, y0, x1, y1] in pixels of the uploaded image (last pixel "
    "inclusive), or a list of such boxes (at most max_boxes, 16 by default); each box alone prompts "
    "the mask decoder (no text, no MLLM, no verifier) and gets one mask"
)


class SegmentJSON(BaseModel):
    """The JSON form of POST /v1/segment (documented in the OpenAPI schema; checked by parse_request):
    `queries` or, in box-prompt mode, `box`; both in one request is a 422."""

    image: str = PydanticField(
        description="base64 of a PNG, JPEG, TIFF, BMP or DICOM file (a data: URL is fine)"
    )
    queries: Annotated[list[str], PydanticField(min_length=1)] | None = PydanticField(
        None, description="questions about the image, answered separately (required unless 'box' is given)"
    )
    box: Box | Annotated[list[Box], PydanticField(min_length=1)] | None = PydanticField(
        None, description=BOX_DESCRIPTION
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
    """OpenAPI requestBody of /v1/segment: JSON or multipart (the image as a file), each with queries
    or, in box-prompt mode, a box (one object schema per form: OpenAPI tools handle a multipart
    `anyOf` poorly, and both carry the same options)."""
    multipart = {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary"},
            "query": {
                "type": "array",
                "items": {"type": "string"},
                "description": "repeated, one question each (required unless 'box' is given)",
            },
            "box": {"type": "string", "description": f"once, JSON text: {BOX_DESCRIPTION}"},
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
    queries: list[str]  # empty in box-prompt mode
    model_version: str | None = None
    mask_format: str = "rle"  # rle | png
    heatmap: bool = False
    overlay: bool = False
    boxes: list[list[float]] | None = None  # box-prompt mode: pixel xyxy, each checked against the image


MULTIPART_SINGLE = ("box", "model_version", "mask_format", "heatmap", "overlay")
JSON_FIELDS = ("image", "queries", "box", "model_version", "return")
RETURN_FIELDS = ("mask_format", "heatmap", "overlay")
BODY_GRACE_S = 5.0  # the minimum rate applies after this long (a connection's slow start)


async def read_body(
    request, limit: int, timeout_s: float = 60.0, min_rate: float = 0.0, grace_s: float = BODY_GRACE_S
) -> bytes:
    """The body, refused as soon as it is known to exceed `limit` (header first, then while
    streaming), and cut off with 408 when it has not arrived within `timeout_s` or arrives slower
    than `min_rate` bytes per second after the first seconds: a slow client holds no slot for long."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
    loop = asyncio.get_running_loop()
    started, chunks, total = loop.time(), [], 0
    stream = request.stream().__aiter__()
    while True:
        elapsed = loop.time() - started
        wait = timeout_s - elapsed
        if min_rate > 0:  # the longest wait after which the rate is still met
            wait = min(wait, max(grace_s, (total + 1) / min_rate) - elapsed + 0.05)
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.001))
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(408, too_slow(total, loop.time() - started, timeout_s, min_rate)) from None
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def too_slow(received: int, elapsed: float, timeout_s: float, min_rate: float) -> str:
    return (
        f"request body incomplete after {elapsed:.1f} s ({received} bytes received): bodies must arrive "
        f"within {timeout_s:g} s and at {min_rate:g} bytes/s or faster"
    )


async def parse_request(headers, body: bytes, args: AppArgs, run=asyncio.to_thread) -> SegmentRequest:
    """The whole request: fields checked first, then the image decoded. CPU work (JSON, base64, image
    decoding) goes through `run` (a thread by default), never on the event loop."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        fields, image_bytes = await _multipart(headers, body)
    elif content_type == "application/json":
        fields, image_bytes = await run(_json, body)
    else:
        raise ApiError(
            415,
            f"unsupported content type {content_type or 'none'!r}: send multipart/form-data or application/json",
        )
    # bad fields refused before the costly decode; a box's bounds need the image's size: after it
    boxes = fields.get("box")
    if boxes is not None:
        if fields.get("queries") is not None:
            raise ApiError(
                422,
                "give 'box' (box-prompt mode: the box alone prompts the mask decoder) or 'queries' "
                "(repeated 'query' fields in a form), not both",
            )
        boxes, queries = check_boxes(boxes, args), []
    else:
        queries = check_queries(fields.get("queries"), args)
    image = await run(decode_upload, image_bytes, args.max_image_pixels, args.max_image_bytes)
    if boxes is not None:
        for box in boxes:
            try:
                check_box(box, image.shape[:2])
            except BadBox as exc:
                raise ApiError(422, str(exc)) from None
    return SegmentRequest(
        image=image,
        queries=queries,
        boxes=boxes,
        model_version=_text(fields.get("model_version"), "model_version") or None,
        mask_format=_choice(fields.get("mask_format", "rle"), ("rle", "png"), "mask_format"),
        heatmap=_flag(fields.get("heatmap", False), "heatmap"),
        overlay=_flag(fields.get("overlay", False), "overlay"),
    )


@functools.cache
def strict_multipart_parser():
    """Starlette's parser, except that a text field not valid in the form's charset is a 400:
    Starlette decodes it as Latin-1 instead, and a query would be answered rewritten."""
    from starlette.formparsers import MultiPartParser

    class StrictFieldParser(MultiPartParser):
        def on_part_end(self) -> None:
            part = self._current_part
            if part.file is None:
                try:
                    bytes(part.data).decode(self._charset)
                except (UnicodeDecodeError, LookupError):
                    raise ApiError(
                        400, f"multipart field {part.field_name!r} is not valid {self._charset.upper()}"
                    ) from None
            super().on_part_end()

    return StrictFieldParser


async def _multipart(headers, body: bytes) -> tuple[dict, bytes]:
    """Every field of the form, repeated ones included: `query` / `queries` may repeat (each value is
    one query; a single `queries` value may also be a JSON list), anything else may not."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    async def stream():
        yield body

    try:
        form = await strict_multipart_parser()(headers, stream(), max_files=4, max_fields=128).parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "a multipart field is not valid UTF-8") from None
    items = form.multi_items()
    names = [k for k, _ in items]
    for name in dict.fromkeys(names):
        if name not in ("image", "query", "queries", *MULTIPART_SINGLE):
            raise ApiError(422, f"unknown multipart field {name!r}")
        if name not in ("query", "queries") and names.count(name) > 1:
            raise ApiError(422, f"multipart field {name!r} given {names.count(name)} times: give it once")
    if "query" in names and "queries" in names:
        raise ApiError(422, "give the queries as repeated 'query' fields or as 'queries', not both")
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "multipart field 'image' (a file) is required")
    fields = {}
    for name, value in items:
        if name == "image":
            continue
        if not isinstance(value, str):
            raise ApiError(422, f"multipart field {name!r} must be text, not a file")
        if name in ("query", "queries"):
            fields.setdefault("queries", []).extend(_multipart_queries(value, names.count(name) == 1))
        elif name == "box":
            fields["box"] = _multipart_box(value)
        else:
            fields[name] = value
    return fields, await upload.read()


def _multipart_queries(value: str, only_one: bool) -> list:
    if only_one and value.lstrip().startswith("["):  # one field holding a JSON list of queries
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise ApiError(422, "field 'queries' starts with '[' but is not a JSON list of strings") from None
        if isinstance(parsed, list):
            return parsed
    return [value]


def _multipart_box(value: str):
    """The form's `box` field: JSON text of one box or a list of boxes (checked by check_boxes)."""
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        parsed = None
    if parsed is None:  # a `box` field given is box-prompt mode: `null` is no box either
        raise ApiError(
            422, "field 'box' must be JSON: [x0, y0, x1, y1] or a list of such boxes, e.g. [10, 20, 80, 70]"
        )
    return parsed


def _no_duplicate_keys(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ApiError(422, f"JSON field {key!r} given {keys.count(key)} times: give it once")
    return dict(pairs)


def _json(body: bytes) -> tuple[dict, bytes]:
    try:
        fields = json.loads(body, object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "body is JSON nested too deeply") from None
    if not isinstance(fields, dict):
        raise ApiError(422, "the JSON body must be an object")
    unknown = [k for k in fields if k not in JSON_FIELDS]
    if unknown:
        raise ApiError(422, f"unknown JSON field {unknown[0]!r}; the fields are {', '.join(JSON_FIELDS)}")
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
    unknown = [k for k in returns if k not in RETURN_FIELDS]
    if unknown:
        raise ApiError(422, f"unknown field 'return.{unknown[0]}'; it takes {', '.join(RETURN_FIELDS)}")
    return {**{k: v for k, v in fields.items() if k != "return"}, **returns}, data


def check_queries(queries, args: AppArgs) -> list[str]:
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not queries:
        raise ApiError(
            422,
            "at least one query is required ('queries': [...] or repeated 'query' fields), "
            "or a 'box' for box-prompt mode",
        )
    if len(queries) > args.max_queries:
        raise ApiError(422, f"{len(queries)} queries: at most {args.max_queries} per request")
    out = []
    for q in queries:
        if not isinstance(q, str) or not q.strip():
            raise ApiError(422, "every query must be a non-empty string")
        if len(q) > args.max_query_chars:
            raise ApiError(422, f"a query of {len(q)} characters: at most {args.max_query_chars}")
        if reserved := reserved_tokens(q):
            raise ApiError(422, f"a query holds {reserved[0]!r}, a token reserved by the model's template")
        out.append(q.strip())
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_boxes(value, args: AppArgs) -> list[list[float]]:
    """`box` as one box [x0, y0, x1, y1] or a list of boxes -> the list of boxes, at most
    `max_boxes`, each a list of JSON numbers; the rest of the check (four finite numbers, order, inside
    the image) is `check_box`'s, once the image's size is known."""
    if not isinstance(value, list) or not value:
        raise ApiError(
            422, f"box must be [x0, y0, x1, y1] or a list of such boxes, got {json.dumps(value)[:100]}"
        )
    boxes = value if all(isinstance(b, list) for b in value) else [value]
    if len(boxes) > args.max_boxes:
        raise ApiError(422, f"{len(boxes)} boxes: at most {args.max_boxes} per request")
    for box in boxes:
        if not all(_is_number(v) for v in box):  # json's strings and booleans are no coordinates
            raise ApiError(
                422, f"box must be four finite numbers [x0, y0, x1, y1], got {json.dumps(box)[:100]}"
            )
    return boxes


def _text(value, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ApiError(422, f"{name} must be a string")
    return value


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


def decode_upload(data: bytes, max_pixels: int, max_bytes: int) -> np.ndarray:
    """uint8 H×W×3 of an uploaded file; the size is checked from the header before pixels are decoded."""
    kind = sniff(data)
    if kind == "unknown":
        raise ApiError(
            415, "unsupported image type: send PNG, JPEG, TIFF, BMP or DICOM (with its DICM preamble)"
        )
    if kind == "dicom":
        return _dicom(data, max_pixels, max_bytes)
    from medisee.data.codec import BadRecord, decode_image

    try:
        return decode_image(data, max_pixels)
    except BadRecord as exc:
        status = 413 if exc.reason == "too_large" else 400
        raise ApiError(
            status, f"unreadable {kind} image: {exc.detail}" if status == 400 else exc.detail
        ) from None


def _dicom(data: bytes, max_pixels: int, max_bytes: int) -> np.ndarray:
    """The first frame, the only one decoded, after the header's decoded size (rows × columns ×
    frames × samples × bytes) passed the limits; a deflated file is inflated within those limits."""
    from medisee.data.bounded import InputTooLarge, dicom_first_frame

    try:
        return dicom_first_frame(data, max_pixels, max_bytes)
    except InputTooLarge as exc:
        raise ApiError(413, f"DICOM refused: {exc.detail}") from None
    except Exception as exc:  # pydicom raises many types for damaged or truncated files
        raise ApiError(400, f"unreadable DICOM: {type(exc).__name__}") from None
