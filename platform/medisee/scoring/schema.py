"""What flows between the batch-scoring steps and what lands in the output tables.

Between steps, one row per image (all its queries together, so that each image is encoded once
and a row cannot be split): IMAGE_ROW, grown by each stage. At the end, one row per query or box
prompt in RESULT_SCHEMA, or one row per failed input, query or box prompt in ERROR_SCHEMA.

An image's prompts are its text queries (`queries`, ids `<image>|q<j>`) and then its box prompts
(`boxes`, ids `<image>|b<k>`: no MLLM, no verifier, `DecoderStage.segment_boxes`). The DECODED lists
hold one entry per prompt in that order: the text queries, then the boxes.
"""

from __future__ import annotations

import pyarrow as pa

_floats = pa.list_(pa.float32())

# A prompt refused once its image is known (bad_box, query_and_box): an error row of its own.
PROMPT_ERROR = pa.struct(
    [("record_id", pa.string()), ("query", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)

IMAGE_ROW = pa.schema(
    [
        ("partition", pa.string()),
        ("partition_rows", pa.int64()),  # output rows this image's partition will produce in all
        ("partition_skipped", pa.string()),  # JSON counts of what the partition skipped (empty slices...)
        ("image_id", pa.string()),
        ("kind", pa.string()),  # shard | image | dicom | nifti | skip (a partition that scores nothing)
        ("source", pa.string()),  # the input file
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("slice_index", pa.int32()),  # DICOM frame / position in the series, NIfTI slice
        ("native_hw", pa.list_(pa.int32())),  # NIfTI: slice size before resampling
        ("image", pa.binary()),  # raw uint8 H×W×3
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("queries", pa.list_(pa.string())),
        ("record_ids", pa.list_(pa.string())),
        ("boxes", pa.list_(pa.list_(pa.float64()))),  # box prompts: pixel xyxy, last pixel inclusive
        ("box_record_ids", pa.list_(pa.string())),
        ("prompt_errors", pa.list_(PROMPT_ERROR)),  # prompts of a readable image that cannot be scored
        ("error", pa.string()),
        ("error_detail", pa.string()),
        ("error_stage", pa.string()),
        ("t_decode", pa.float64()),
    ]
)

ENCODED = [
    ("answers", pa.list_(pa.string())),
    ("found", pa.list_(pa.bool_())),
    ("candidates", pa.binary()),  # float32 (Q, n, d)
    ("candidate_shape", pa.list_(pa.int32())),
    ("similarity", pa.binary()),  # float32 (Q, side, side)
    ("similarity_side", pa.int32()),
    # medisee-lite: the SAM image embedding the MLLM computed, float32 (P, g, g), for the decoder
    # step to reuse (each image encoded once); emptied once decoded
    ("image_embedding", pa.large_binary()),
    ("image_embedding_shape", pa.list_(pa.int32())),
    ("t_mllm", pa.float64()),
]

SCREENED = [
    ("strength", _floats),
    ("compactness", _floats),
    ("purity", _floats),
    ("rule", pa.list_(pa.string())),
    ("t_verifier", pa.float64()),
]

DECODED = [
    ("box", pa.list_(_floats)),
    ("box_unclipped", pa.list_(_floats)),
    ("mask_rle", pa.list_(pa.string())),
    ("mask_score", _floats),
    ("iou_score", _floats),
    ("area_fraction", _floats),
    ("t_decoder", pa.float64()),
]

ENCODED_ROW = pa.schema(list(IMAGE_ROW) + ENCODED)
SCREENED_ROW = pa.schema(list(ENCODED_ROW) + SCREENED)
DECODED_ROW = pa.schema(list(SCREENED_ROW) + DECODED)

RESULT_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("image_id", pa.string()),
        ("partition", pa.string()),
        ("source", pa.string()),
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("slice_index", pa.int32()),
        ("prompt", pa.string()),  # text | box (box prompt: query, answer, found, verdict ... S/C/P null)
        ("query", pa.string()),
        ("answer", pa.string()),
        ("found", pa.bool_()),
        ("verdict", pa.string()),  # present | absent | uncertain
        ("decided_by", pa.string()),  # rule | judge | fallback | answer
        ("judged", pa.bool_()),
        ("strength", pa.float32()),
        ("compactness", pa.float32()),
        ("purity", pa.float32()),
        ("mask_score", pa.float32()),
        ("iou_score", pa.float32()),
        ("area_fraction", pa.float32()),
        ("decoded", pa.bool_()),  # false: rejected early, the decoder did not run
        ("box", _floats),  # pixel xyxy in the image (clipped; a box prompt as given); null if rejected
        ("box_unclipped", _floats),
        ("mask_rle", pa.string()),  # COCO RLE (pycocotools) as JSON; null when rejected
        ("mask_area", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("t_decode_s", pa.float64()),  # per-image share of each stage's batch time
        ("t_mllm_s", pa.float64()),
        ("t_verifier_s", pa.float64()),
        ("t_decoder_s", pa.float64()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("model_sha256", pa.string()),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),  # the query's record, or the image's id when it never got that far
        ("image_id", pa.string()),
        ("partition", pa.string()),
        ("source", pa.string()),
        ("slice_index", pa.int32()),
        ("query", pa.string()),
        ("prompt", pa.string()),  # text | box; null when the input failed before its prompts were known
        ("stage", pa.string()),  # plan | decode | mllm | decoder
        ("reason", pa.string()),  # unreadable_image, unsupported_format, too_large, model_error, bad_box, ...
        ("detail", pa.string()),
    ]
)

# What the last step hands the writer: a result, an error, or a partition's placeholder.
OUTPUT_ROW = pa.schema(
    [("status", pa.string()), ("partition_rows", pa.int64()), ("partition_skipped", pa.string())]
    + [f for f in RESULT_SCHEMA if f.name not in ("partition",)]
    + [f for f in ERROR_SCHEMA if f.name not in RESULT_SCHEMA.names]
    + [("partition", pa.string()), ("overlay_png", pa.binary())]
)


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
