"""Every hostile and real-sized input of the bad-input suite, built at test time (nothing large is
committed), next to the outcome the documentation promises for it.

FILES     inputs that are files: the `image` of POST /v1/segment, and a file in the folder that
          `medisee score` scores. Each case has its expected HTTP status and batch outcome; both
          front ends iterate this one list.
REQUESTS  request-level cases (bodies, fields, repeated fields, queries): HTTP only.

A file case is a function returning (file name, payload): the file's bytes, or a writer that makes
the file itself at a given path (a symlink). Payloads are built once per process.

A case that shows a bug not fixed yet describes it in `xfail_http` / `xfail_batch`: its test is marked
xfail(strict=True), so the fix turns it into a failure (then drop the mark).
"""

from __future__ import annotations

import base64
import functools
import gzip
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

RESULTS = "results"  # batch: result rows for every query of every image the file holds

QUERIES = ["Segment the liver.", "Where is the spleen?"]
_LONG_TEMPLATE = (
    "Please look for the {class} in this image and outline it precisely, "
    + "leaving out the surrounding tissue and any overlapping structure, " * 5
    + "then segment it."
)
BATCH_CLASSES = ["liver", "肝臓 – foie ✓ Leber"]  # no comma: the template's class separator
BATCH_QUERY_SPEC = f"template={_LONG_TEMPLATE};classes={','.join(BATCH_CLASSES)}"
BATCH_QUERIES = [_LONG_TEMPLATE.replace("{class}", name) for name in BATCH_CLASSES]

Payload = bytes | Callable[[Path], None]


# ----- the catalogue's machinery -------------------------------------------------------------------
@dataclass(frozen=True)
class FileCase:
    builder: Callable[[], tuple[str, Payload]]
    http: int | None  # status of POST /v1/segment with this file as `image`; None: not sent
    batch: str | None  # RESULTS or the error row's reason; None: not in the batch folder
    hw: tuple[int, int] | None = None  # a 200 / RESULTS: the (height, width) answered (upright)
    images: int = 1  # RESULTS: the images it holds (DICOM frames, NIfTI slices)
    large: bool = False  # a real-sized image: the HTTP answer must also equal the Predictor's
    xfail_http: str = ""  # a known bug of the HTTP answer (see the module's docstring)
    xfail_batch: str = ""

    @property
    def id(self) -> str:
        return self.builder.__name__

    @property
    def name(self) -> str:
        return _built(self.builder)[0]

    def data(self) -> bytes:
        payload = _built(self.builder)[1]
        if callable(payload):
            raise TypeError(f"{self.id} makes its own file: it has no bytes to upload")
        return payload

    def write_into(self, folder: Path) -> Path:
        name, payload = _built(self.builder)
        if callable(payload):
            payload(folder / name)
        else:
            (folder / name).write_bytes(payload)
        return folder / name


@functools.cache
def _built(builder: Callable[[], tuple[str, Payload]]) -> tuple[str, Payload]:
    return builder()


FILES: list[FileCase] = []


def file_case(http: int | None, batch: str | None, **expected):
    def register(builder):
        FILES.append(FileCase(builder, http, batch, **expected))
        return builder

    return register


# ----- images ----------------------------------------------------------------------------------------
def scan(height: int, width: int, index: int = 0) -> np.ndarray:
    """A phantom slice (uint8) at any size: smooth when scaled up, so large ones stay small as PNG."""
    from medisee.data import phantom

    base = phantom.generate(seed=19, index=index, size=128 if max(height, width) <= 128 else 256)[0]
    if base.shape == (height, width):
        return base
    return np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))


def encoded(image: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def small_png(index: int) -> bytes:
    return encoded(scan(128, 128, index), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    """A side × side 1-bit PNG of zeros, compressed row by row (never held decoded): a few hundred kB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed pixels
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


# ----- DICOM and NIfTI -------------------------------------------------------------------------------
def dicom_dataset(rows: int, columns: int, frames: int, transfer_syntax: str):
    """A 16-bit MONOCHROME2 multi-frame secondary-capture header (no pixel data yet)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = sop_class, transfer_syntax
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"sop-{rows}-{frames}"])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"study-{rows}-{frames}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"series-{rows}-{frames}"])
    ds.Modality, ds.PatientID, ds.InstanceNumber = "OT", "bad-input-suite", 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multiframe_dicom(side: int, frames: int) -> bytes:
    """Uncompressed (explicit VR little endian), one phantom per frame."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = dicom_dataset(side, side, frames, ExplicitVRLittleEndian)
    pixels = np.stack([scan(side, side, index=k).astype(np.uint16) * 16 for k in range(frames)])
    ds.PixelData = pixels.tobytes()
    return dicom_bytes(ds)


def deflated_dicom_bomb(side: int, frames: int) -> bytes:
    """Deflated explicit VR little endian whose pixel data (zeros) inflate to side² × frames × 2 bytes;
    the deflate stream is written piece by piece, never holding the inflated bytes."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dicom_dataset(side, side, frames, DeflatedExplicitVRLittleEndian)
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_bytes = side * side * frames * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, as DICOM has it
    chunk = bytes(1 << 20)
    stream = [deflate.compress(body.getvalue() + pixel_header)]
    stream += [deflate.compress(chunk) for _ in range(pixel_bytes // len(chunk))]
    stream += [deflate.compress(bytes(pixel_bytes % len(chunk))), deflate.flush()]
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + b"".join(stream)


def nifti_gz(volume: np.ndarray) -> bytes:
    import nibabel as nib

    return gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes(), compresslevel=6)


def small_volume(index: int) -> np.ndarray:
    return np.stack([scan(64, 64, index=index + k) for k in range(2)], axis=2)


# ----- the file cases ----------------------------------------------------------------------------------
@file_case(http=400, batch="unreadable_image")
def truncated_png():
    data = encoded(scan(256, 256), "PNG")
    return "truncated.png", data[: len(data) // 2]


@file_case(http=400, batch="unreadable_image")
def truncated_jpeg():
    data = encoded(scan(256, 256), "JPEG", quality=90)
    return "truncated.jpg", data[: len(data) // 2]


@file_case(http=400, batch="unreadable_dicom")
def truncated_dicom():
    from pydicom.data import get_testdata_file

    return "truncated.dcm", Path(get_testdata_file("MR_truncated.dcm")).read_bytes()


@file_case(http=400, batch="unreadable_dicom")
def dicom_without_pixel_data():
    from pydicom.uid import ExplicitVRLittleEndian

    return "no_pixels.dcm", dicom_bytes(dicom_dataset(64, 64, 1, ExplicitVRLittleEndian))


# a 0-byte upload has no type to sniff: 415 like any other unknown content (batch goes by the name)
@file_case(http=415, batch="unreadable_image")
def empty_file():
    return "empty.png", b""


@file_case(http=415, batch="unreadable_image")
def text_named_png():
    return "notes.png", b"Patient notes, typed into the wrong field: not an image.\n" * 8


@file_case(http=415, batch="unsupported_format")
def pdf_header():
    return "report.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"


@file_case(http=415, batch="unsupported_format")
def gif_image():
    return "scan.gif", encoded(scan(64, 64, index=21), "GIF")


@file_case(http=413, batch="too_large")
def decompression_bomb_png():
    return "bomb.png", bomb_png(30_000)  # 900 M pixels


@file_case(http=413, batch="too_large")
def over_pixel_limit_png():
    # 56 M pixels: over the 50 M limit, under PIL's own bomb warning (89 M)
    image = np.zeros((7000, 8000), np.uint8)
    image[3000:4000, 3000:5000] = 200
    return "huge.png", encoded(image, "PNG")


@file_case(http=413, batch="too_large")
def deflated_dicom_multiframe_bomb():
    return "deflated_bomb.dcm", deflated_dicom_bomb(2048, 96)  # 768 MiB of pixels in under 1 MB


@file_case(http=413, batch="too_large")
def dicom_claiming_a_million_frames():
    """8 kB of pixel data under a header that says 1 000 000 frames (8 GB decoded)."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = dicom_dataset(64, 64, 1_000_000, ExplicitVRLittleEndian)
    ds.PixelData = scan(64, 64, index=22).astype(np.uint16).tobytes()
    return "million_frames.dcm", dicom_bytes(ds)


@file_case(http=200, batch=RESULTS, hw=(1, 1))
def one_pixel():
    return "one_pixel.png", encoded(np.full((1, 1), 128, np.uint8), "PNG")


@file_case(http=200, batch=RESULTS, hw=(1, 20_000))  # its short side is kept at 1 px in the SAM frame
def one_pixel_high_strip():
    return "strip.png", encoded(np.full((1, 20_000), 128, np.uint8), "PNG")


@file_case(http=200, batch=RESULTS, hw=(2048, 2048), large=True)
def png_2048():
    return "chest_2048.png", encoded(scan(2048, 2048, index=1), "PNG")


@file_case(http=200, batch=RESULTS, hw=(3072, 4096), large=True)
def rgba_png_4096x3072():
    gray = scan(3072, 4096, index=2)
    alpha = np.linspace(128, 255, 4096, dtype=np.float32).astype(np.uint8)[None, :].repeat(3072, 0)
    return "mammo_rgba.png", encoded(np.dstack([gray, gray, gray, alpha]), "PNG")


@file_case(http=200, batch=RESULTS, hw=(2500, 3000), large=True)
def gray16_png_3000x2500():
    image = scan(2500, 3000, index=3).astype(np.float32)
    detail = np.linspace(0, 15, 3000, dtype=np.float32)[None, :]  # low bits that an 8-bit image lacks
    return "radiograph_16bit.png", encoded((image * 256 + detail).astype(np.uint16), "PNG")


@file_case(http=200, batch=RESULTS, hw=(1024, 1024), images=8, large=True)
def multiframe_dicom_1024x8():
    return "multiframe.dcm", multiframe_dicom(1024, 8)  # 16 MiB: under the 20 MiB upload limit


@file_case(http=200, batch=RESULTS, hw=(200, 240))
def palette_png():
    rgb = Image.fromarray(scan(200, 240, index=4)).convert("RGB")
    return "palette.png", encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")


@file_case(http=200, batch=RESULTS, hw=(256, 256))
def tiff_16bit():
    return "gray16.tif", encoded(scan(256, 256, index=5).astype(np.uint16) * 257, "TIFF")


@file_case(http=200, batch=RESULTS, hw=(256, 256))
def tiff_float32():
    return "float32.tiff", encoded(scan(256, 256, index=6).astype(np.float32) / 255.0, "TIFF")


@file_case(http=200, batch=RESULTS, hw=(320, 240))  # stored 240 high × 320 wide, shown upright
def exif_rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return "rotated.jpg", encoded(scan(240, 320, index=7), "JPEG", quality=92, exif=exif)


@file_case(http=200, batch=RESULTS, hw=(96, 112))
def cmyk_jpeg():
    return "cmyk.jpg", encoded(Image.fromarray(scan(96, 112, index=23)).convert("CMYK"), "JPEG")


@file_case(http=200, batch=RESULTS, hw=(100, 90))
def bmp_image():
    return "scan.bmp", encoded(scan(100, 90, index=24), "BMP")


# names: over HTTP only the upload's file name, in batch names that once collided in one partition key
@file_case(http=200, batch=RESULTS, hw=(128, 128))
def unicode_name():
    return "肝臓 снимок caf\u00e9.png", small_png(9)  # é composed (NFC)


@file_case(http=200, batch=RESULTS, hw=(128, 128))
def decomposed_unicode_name():
    return "肝臓 снимок cafe\u0301.png", small_png(10)  # the same name with é decomposed (NFD)


@file_case(http=None, batch=RESULTS, hw=(128, 128))
def upper_case_name():
    return "A.png", small_png(11)


@file_case(http=None, batch=RESULTS, hw=(128, 128))
def lower_case_name():
    return "a.png", small_png(12)


@file_case(http=200, batch=RESULTS, hw=(128, 128))
def space_in_name():
    return "a b.png", small_png(13)


@file_case(http=None, batch=RESULTS, hw=(128, 128))
def underscore_in_name():
    return "a_b.png", small_png(14)


@file_case(http=200, batch=RESULTS, hw=(128, 128))
def dots_in_name():
    return "x..y.png", small_png(15)


@file_case(http=None, batch="unsupported_format")
def not_dicom_with_space():
    return "bad x.dcm", b"not a DICOM file, one\n" * 8


@file_case(http=None, batch="unsupported_format")
def not_dicom_with_underscore():
    return "bad_x.dcm", b"not a DICOM file, two\n" * 8


@file_case(http=None, batch=RESULTS, hw=(64, 64), images=2)
def nifti_with_space():
    return "a b.nii.gz", nifti_gz(small_volume(16))


@file_case(http=None, batch=RESULTS, hw=(64, 64), images=2)
def nifti_with_underscore():
    return "a_b.nii.gz", nifti_gz(small_volume(18))


@file_case(http=None, batch="too_large")
def nifti_8000_slice():
    volume = np.zeros((8000, 8000, 1), np.uint8)  # 64 M pixels in one slice, about 70 kB gzipped
    volume[2000:6000, 3000:5000] = 100
    return "wide_slice.nii.gz", nifti_gz(volume)


@file_case(http=None, batch="symlink_outside_input")
def symlink_out_of_the_input():
    """A link to a readable image beside the input folder: it must not be read (no result rows)."""

    def write(path: Path) -> None:
        outside = path.parent.parent / "outside-the-input"
        outside.mkdir(exist_ok=True)
        (outside / "secret.png").write_bytes(small_png(20))
        path.symlink_to(outside / "secret.png")

    return "link.png", write


# ----- request-level cases (HTTP only) -----------------------------------------------------------------
@dataclass(frozen=True)
class RequestContext:
    png: bytes  # a small valid image
    versions: tuple[str, ...]  # the served model versions
    max_upload_bytes: int
    max_queries: int
    max_query_chars: int

    @property
    def b64(self) -> str:
        return base64.b64encode(self.png).decode()

    def upload(self, name: str = "scan.png") -> dict:
        return {"image": (name, self.png, "image/png")}


@dataclass(frozen=True)
class RequestCase:
    builder: Callable[[RequestContext], dict]  # keyword arguments of httpx.post, the API key aside
    status: tuple[int, ...]  # any of these
    mentions: str = ""  # a word the error message must contain (the field it is about)
    answers: tuple[str, ...] = ()  # a 200: the queries of its results, in order
    xfail_http: str = ""  # a known bug (see the module's docstring)

    @property
    def id(self) -> str:
        return self.builder.__name__


REQUESTS: list[RequestCase] = []


def request_case(*status: int, mentions: str = "", answers: tuple[str, ...] = (), xfail_http: str = ""):
    def register(builder):
        REQUESTS.append(RequestCase(builder, status, mentions, answers, xfail_http))
        return builder

    return register


def json_body(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


@request_case(400)
def malformed_json(ctx):
    return json_body('{"image": "' + ctx.b64[:40] + '", "queries": [')


@request_case(400)
def deeply_nested_json(ctx):
    return json_body("[" * 100_000)


@request_case(400, mentions="base64")
def invalid_base64(ctx):
    return {"json": {"image": "iVBORw0KGgo*&^%$#@!", "queries": QUERIES}}


@request_case(415)
def text_plain_request(ctx):
    return {"content": b"Segment the liver.", "headers": {"content-type": "text/plain"}}


@request_case(413)
def body_over_upload_limit(ctx):
    big = b"\x89PNG\r\n\x1a\n" + bytes(ctx.max_upload_bytes)
    return {"files": {"image": ("big.png", big, "image/png")}, "data": {"query": QUERIES[0]}}


@request_case(422)
def no_queries_json(ctx):
    return {"json": {"image": ctx.b64, "queries": []}}


@request_case(422)
def no_queries_multipart(ctx):
    return {"files": ctx.upload()}


@request_case(422)
def empty_query(ctx):
    return {"json": {"image": ctx.b64, "queries": [QUERIES[0], "   "]}}


@request_case(422)
def too_many_queries(ctx):
    return {
        "json": {"image": ctx.b64, "queries": [f"Where is organ {i}?" for i in range(ctx.max_queries + 1)]}
    }


@request_case(422)
def query_over_the_limit(ctx):
    return {"json": {"image": ctx.b64, "queries": ["Segment the liver. " + "x" * ctx.max_query_chars]}}


def repeated_field(ctx, name: str, values: list[str]) -> dict:
    return {"files": ctx.upload(), "data": {"query": QUERIES[0], name: values}}


@request_case(422, mentions="model_version")
def repeated_model_version(ctx):
    return repeated_field(ctx, "model_version", list(ctx.versions[:2]))


@request_case(422, mentions="mask_format")
def repeated_mask_format(ctx):
    return repeated_field(ctx, "mask_format", ["rle", "png"])


@request_case(422, mentions="heatmap")
def repeated_heatmap(ctx):
    return repeated_field(ctx, "heatmap", ["true", "false"])


@request_case(422, mentions="overlay")
def repeated_overlay(ctx):
    return repeated_field(ctx, "overlay", ["false", "true"])


@request_case(422, mentions="image")
def repeated_image(ctx):
    files = [("image", ("one.png", ctx.png, "image/png")), ("image", ("two.png", small_png(1), "image/png"))]
    return {"files": files, "data": {"query": QUERIES[0]}}


@request_case(422, mentions="model_version")
def repeated_json_key(ctx):
    first, second = (json.dumps(v) for v in ctx.versions[:2])
    return json_body(
        f'{{"image": "{ctx.b64}", "queries": ["a"], "model_version": {first}, "model_version": {second}}}'
    )


@request_case(422, mentions="model_version")
def unknown_model_version(ctx):
    """Also checked: the message lists no path or URI of the served versions."""
    return {"json": {"image": ctx.b64, "queries": QUERIES, "model_version": "no-such-version"}}


@request_case(400, mentions="UTF-8")  # Starlette would re-read it as Latin-1 and answer it rewritten
def non_utf8_query(ctx):
    return {"files": ctx.upload(), "data": {"query": b"Segment the \xff\xfe liver \xc3("}}


@request_case(400, mentions="JSON")
def non_utf8_json_query(ctx):
    body = b'{"image": "%s", "queries": ["Segment the \xff\xfe liver"]}' % ctx.b64.encode()
    return {"content": body, "headers": {"content-type": "application/json"}}


@request_case(400, mentions="multipart")
def multipart_without_boundary(ctx):
    request = httpx.Request("POST", "http://x", files=ctx.upload(), data={"query": QUERIES[0]})
    return {"content": request.read(), "headers": {"content-type": "multipart/form-data"}}


@request_case(422, mentions="query")
def query_sent_as_a_file(ctx):
    files = {**ctx.upload(), "query": ("query.txt", QUERIES[0].encode(), "text/plain")}
    return {"files": files}


@request_case(422, mentions="query")
def queries_not_strings(ctx):
    return {"json": {"image": ctx.b64, "queries": [1, {"organ": "liver"}]}}


@request_case(200, answers=(QUERIES[0],))
def upload_name_leaving_its_folder(ctx):
    return {"files": ctx.upload("../../../etc/passwd.png"), "data": {"query": QUERIES[0]}}


IMAGE_TOKEN_QUERY = "Where is the liver? <image>"


@request_case(422, mentions="reserved")  # a second <image> would break the MLLM's image-feature scatter
def query_holding_the_image_token(ctx):
    return {"files": ctx.upload(), "data": {"query": IMAGE_TOKEN_QUERY}}


def serving_default(limit: str) -> int:
    from medisee.serving.args import AppArgs

    return AppArgs.model_fields[limit].default


LONG_QUERY = ("Segment the liver, the large organ in the upper right of the abdomen. " * 8)[
    : serving_default("max_query_chars")
]


@request_case(200, answers=(LONG_QUERY,))
def long_query_under_the_limit(ctx):
    return {"json": {"image": ctx.b64, "queries": [LONG_QUERY]}}


UNICODE_QUERIES = (
    "Où se trouve le foie ?",
    "肝臓を区分してください。",
    "Где селезёнка? 🫁",
    "ﬁnd the left kidney",
)


@request_case(200, answers=UNICODE_QUERIES)
def unicode_queries(ctx):
    return {"files": ctx.upload("肝臓.png"), "data": {"query": list(UNICODE_QUERIES)}}


@request_case(200, answers=tuple(QUERIES))
def queries_field_repeated(ctx):
    return {"files": ctx.upload(), "data": {"queries": QUERIES}}


@request_case(200, answers=tuple(QUERIES))
def query_field_repeated(ctx):
    return {"files": ctx.upload(), "data": {"query": QUERIES}}
