"""Partition -> image rows (CPU tasks): read, decode and window every image, attach its queries.

Every failure becomes an error row that names its input; a partition that scores nothing still
emits one placeholder row, so that the writer can mark it finished. An image's box prompts are
checked here against its size (`check_box`): a refused one is carried as a prompt error of the
image (one error row), the others as `boxes`.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from medisee import storage
from medisee.config import MAX_DICOM_BYTES, MAX_FILE_BYTES, MAX_IMAGE_PIXELS, MAX_VOLUME_BYTES
from medisee.data.bounded import Limits, read_nifti_image, read_stored
from medisee.data.codec import BadRecord, as_rgb, decode_image, window_to_uint8
from medisee.data.display import volume_slice, volume_window
from medisee.infer.results import BadBox, check_box
from medisee.scoring import schema
from medisee.scoring.queries import BoxPrompt, QueryPlan
from medisee.storage import StorageSettings


@dataclass(frozen=True)
class DecodeOptions:
    settings: StorageSettings | None = None
    max_file_bytes: int = MAX_FILE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    slice_axis: int = 2
    resample_spacing: bool = False
    keep_empty_slices: bool = False
    ct_window: tuple[float, float] = (-160.0, 240.0)
    max_dicom_bytes: int = MAX_DICOM_BYTES
    max_volume_bytes: int = MAX_VOLUME_BYTES


def decode_batch(batch: pa.Table, queries: QueryPlan, opts: DecodeOptions) -> pa.Table:
    """The Ray Data step: partitions (JSON) in, image rows out. Imports no torch: a decode worker
    starts in a fraction of the time a model worker does."""
    rows = [
        r
        for p in batch.column("partition").to_pylist()
        for r in decode_partition(json.loads(p), queries, opts)
    ]
    return schema.table(rows, schema.IMAGE_ROW)


def decode_partition(partition: dict, queries: QueryPlan, opts: DecodeOptions) -> list[dict]:
    started = time.perf_counter()
    skipped: Counter = Counter()
    reader = READERS[partition["kind"]]
    rows = [r for r in reader(partition, queries, opts, skipped) if r is not None]
    rows = [r for r in rows if _keep(r, skipped)]
    if not rows:
        rows = [{"kind": "skip", "image_id": partition["key"], "source": partition.get("uri", "")}]
    per_image = (time.perf_counter() - started) / len(rows)
    total = sum(output_rows(r) for r in rows)
    for r in rows:
        r.update(partition=partition["key"], partition_rows=total, t_decode=per_image)
        r["partition_skipped"] = json.dumps(dict(skipped), sort_keys=True)
    return rows


def output_rows(row: dict) -> int:
    """The output rows an image row becomes: one per prompt (query, box, refused prompt), or one for
    an input that failed or a partition's placeholder (`stages.error_rows`, `stages.output_table`)."""
    if row["kind"] == "skip" or row.get("error"):
        return 1
    return len(row["queries"]) + len(row.get("boxes") or []) + len(row.get("prompt_errors") or [])


def _keep(row: dict, skipped: Counter) -> bool:
    if row.get("error") or row["kind"] == "skip" or output_rows(row):
        return True
    skipped["images_without_queries"] += 1
    return False


def image_row(
    image: np.ndarray, queries: list[str], record_ids: list[str], box_prompts: list[BoxPrompt] = (), **fields
) -> dict:
    image = as_rgb(image)
    return {
        **fields,
        "image": image.tobytes(),
        "height": image.shape[0],
        "width": image.shape[1],
        "queries": queries,
        "record_ids": record_ids,
        **checked_boxes(box_prompts, fields["image_id"], image.shape[:2]),
    }


def checked_boxes(prompts: list[BoxPrompt], image_id: str, image_hw: tuple[int, int]) -> dict:
    """Box prompts of one image (ids `<image>|b<k>` by manifest order): the usable ones as `boxes`,
    the others as `prompt_errors` (a line with a query text too, a box `check_box` refuses)."""
    boxes, ids, errors = [], [], []
    for k, prompt in enumerate(prompts):
        record_id = f"{image_id}|b{k}"
        if prompt.query is not None:
            errors.append(
                {"record_id": record_id, "query": prompt.query, "reason": "query_and_box",
                 "detail": f"manifest line {prompt.line} gives both a query text and a box: a line is "
                           "either a text query or a box prompt; give them on separate lines"}
            )  # fmt: skip
            continue
        try:
            check_box(prompt.box, image_hw)
        except BadBox as err:
            errors.append(
                {"record_id": record_id, "query": None, "reason": "bad_box",
                 "detail": f"manifest line {prompt.line}: {err}"[:300]}
            )  # fmt: skip
            continue
        boxes.append([float(v) for v in np.asarray(prompt.box, dtype=np.float64).reshape(-1)])
        ids.append(record_id)
    return {"boxes": boxes, "box_record_ids": ids, "prompt_errors": errors}


def error_row(kind: str, image_id: str, source: str, err: BadRecord, stage: str = "decode", **fields) -> dict:
    return {
        **fields,
        "kind": kind,
        "image_id": image_id,
        "source": source,
        "queries": [],
        "record_ids": [],
        "error": err.reason,
        "error_detail": err.detail[:300],
        "error_stage": stage,
    }


def query_ids(image_id: str, queries: list[str]) -> list[str]:
    return [f"{image_id}|q{j}" for j in range(len(queries))]


def read_checked(uri: str, opts: DecodeOptions) -> bytes:
    fs, path = storage.filesystem(uri, opts.settings)
    size = fs.get_file_info(path).size
    if size is not None and size > opts.max_file_bytes:
        raise BadRecord("too_large", f"{size} bytes > scoring.max_file_bytes={opts.max_file_bytes}")
    try:  # as stored: a .gz name is inflated by the reader that knows its bound, not by pyarrow
        return read_stored(uri, opts.settings)
    except OSError as exc:
        raise BadRecord("unreadable_file", str(exc)[:200]) from None


# ----- readers -----------------------------------------------------------------------------------
def read_images(partition: dict, queries: QueryPlan, opts: DecodeOptions, skipped: Counter):
    for item in partition["items"]:
        image_id = item["rel"]
        try:  # decode_image checks the pixel count from the header before decoding
            image = decode_image(read_checked(item["uri"], opts), opts.max_image_pixels)
        except BadRecord as err:
            yield error_row("image", image_id, item["uri"], err)
            continue
        keys = [item["rel"], item["uri"]]
        qs = queries.for_image(keys)
        yield image_row(
            image, qs, query_ids(image_id, qs), queries.boxes_for_image(keys), kind="image",
            image_id=image_id, source=item["uri"],
        )  # fmt: skip


def read_shard(partition: dict, queries: QueryPlan, opts: DecodeOptions, skipped: Counter):
    import pyarrow.parquet as pq

    try:
        data = read_checked(partition["uri"], opts)
        table = pq.read_table(
            io.BytesIO(data), columns=["record_id", "image_id", "image_png", "query", "input_ref"]
        )
    except BadRecord as err:
        yield error_row("shard", partition["key"], partition["uri"], err)
        return
    except Exception as exc:  # pyarrow: not parquet, missing columns
        yield error_row(
            "shard", partition["key"], partition["uri"], BadRecord("unreadable_shard", _describe(exc))
        )
        return
    by_image: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_image.setdefault(row["image_id"], []).append(row)
    for image_id, rows in by_image.items():
        source = rows[0]["input_ref"] or partition["uri"]
        try:
            image = decode_image(rows[0]["image_png"])
        except BadRecord as err:
            yield error_row("shard", image_id, source, err)
            continue
        boxes = queries.boxes_for_image([image_id, source])
        if queries.kind == "records":
            pairs = [(r["query"], r["record_id"]) for r in rows if r["query"]]
            qs, ids = [q for q, _ in pairs], [i for _, i in pairs]
        else:
            qs = queries.for_image([image_id, source])
            ids = query_ids(image_id, qs)
        yield image_row(image, qs, ids, boxes, kind="shard", image_id=image_id, source=source)


def read_dicom_series(partition: dict, queries: QueryPlan, opts: DecodeOptions, skipped: Counter):
    from medisee.data.sources.dicom import read_frames

    uid = partition["series_uid"]
    position = 0
    for item in partition["items"]:
        try:  # the header is checked against the limits before any pixel is decoded
            _, frames = read_frames(read_checked(item["uri"], opts), opts.ct_window, Limits.of(opts))
        except BadRecord as err:
            yield error_row(
                "dicom", f"{uid}/{item['sop_uid']}", item["uri"], err, series_uid=uid, sop_uid=item["sop_uid"]
            )
            continue
        except Exception as exc:  # pydicom raises many types for damaged / truncated files
            err = BadRecord("unreadable_dicom", _describe(exc))
            yield error_row(
                "dicom", f"{uid}/{item['sop_uid']}", item["uri"], err, series_uid=uid, sop_uid=item["sop_uid"]
            )
            continue
        keys = [item["rel"], item["uri"], uid]
        qs, boxes = queries.for_image(keys), queries.boxes_for_image(keys)
        for k, frame in enumerate(frames):
            image_id = f"{uid}/{item['sop_uid']}" + (f"#f{k}" if len(frames) > 1 else "")
            yield image_row(
                frame, qs, query_ids(image_id, qs), boxes, kind="dicom", image_id=image_id, source=item["uri"],
                series_uid=uid, sop_uid=item["sop_uid"], slice_index=position if len(frames) == 1 else k,
            )  # fmt: skip
        position += 1


def read_unreadable(partition: dict, queries: QueryPlan, opts: DecodeOptions, skipped: Counter):
    yield error_row(
        "file",
        partition["rel"],
        partition["uri"],
        BadRecord(partition["error"], partition["detail"]),
        stage="plan",
    )


def read_nifti(partition: dict, queries: QueryPlan, opts: DecodeOptions, skipped: Counter):
    rel, uri = partition["rel"], partition["uri"]
    axis = opts.slice_axis
    try:  # the header is checked against the limits before the data is inflated or read
        image = read_nifti_image(read_checked(uri, opts), opts.max_volume_bytes, opts.max_image_pixels, axis)
        shape = image.shape[:3] if image.shape[3:] == (1,) else image.shape
        if len(shape) != 3:
            raise BadRecord("unsupported_format", f"NIfTI volume of shape {image.shape}, expected 3-D")
        in_plane = [z for i, z in enumerate(image.header.get_zooms()[:3]) if i != axis]
        if opts.resample_spacing:
            check_resampled(shape, axis, in_plane, opts)
        volume = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except BadRecord as err:
        yield error_row("nifti", rel, uri, err)
        return
    except Exception as exc:  # nibabel raises many types for damaged files
        yield error_row("nifti", rel, uri, BadRecord("unreadable_volume", _describe(exc)))
        return
    window = volume_window(volume, None, opts.ct_window)  # NIfTI records no modality
    for index in range(volume.shape[axis]):
        native = volume_slice(volume, axis, index)
        if not opts.keep_empty_slices and float(native.max()) == float(native.min()):
            skipped["empty_slices"] += 1
            continue
        shown = window_to_uint8(native, *window)
        if opts.resample_spacing:
            shown = square_pixels(shown, in_plane)
        image_id = f"{rel}#{'xyz'[axis]}{index}"
        keys = [image_id, rel, uri]
        qs = queries.for_image(keys)
        yield image_row(
            shown, qs, query_ids(image_id, qs), queries.boxes_for_image(keys), kind="nifti",
            image_id=image_id, source=uri,
            slice_index=index, native_hw=list(native.shape),
        )  # fmt: skip


def load_nifti(data: bytes):
    """A volume decoded before (its reference for outputs): inflated no further than its header says."""
    return read_nifti_image(data, max_bytes=None)


def square_zoom(in_plane_spacing: list[float]) -> tuple[float, float]:
    """(rows, columns) zoom that makes a pixel as wide as it is tall (the finer spacing wins).

    Display rows run along the second in-plane voxel axis and columns along the first (rot90).
    """
    sx, sy = (float(s) for s in in_plane_spacing)
    if not all(math.isfinite(s) and s > 0 for s in (sx, sy)):
        raise BadRecord(
            "bad_spacing", f"in-plane voxel spacing {sx} × {sy}: cannot resample to square pixels"
        )
    finest = min(sx, sy)
    return sy / finest, sx / finest


def check_resampled(shape: tuple[int, ...], axis: int, in_plane_spacing: list[float], opts: DecodeOptions):
    """Refuse, before reading the data, a volume whose square-pixel slices exceed max_image_pixels."""
    columns, rows = (int(n) for i, n in enumerate(shape) if i != axis)
    zoom = square_zoom(in_plane_spacing)
    height, width = round(rows * zoom[0]), round(columns * zoom[1])
    if height * width > opts.max_image_pixels:
        raise BadRecord(
            "too_large",
            f"slices of {columns}×{rows} pixels resample to {width}×{height} by their spacing "
            f"{in_plane_spacing}: over scoring.max_image_pixels={opts.max_image_pixels}",
        )


def square_pixels(image: np.ndarray, in_plane_spacing: list[float]) -> np.ndarray:
    from scipy import ndimage

    zoom = square_zoom(in_plane_spacing)
    if zoom == (1.0, 1.0):
        return image
    return ndimage.zoom(image, zoom, order=1)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


READERS = {
    "image": read_images,
    "shard": read_shard,
    "dicom": read_dicom_series,
    "nifti": read_nifti,
    "unreadable": read_unreadable,
}
