"""The Predictor's stages as Ray Data steps over image rows (see schema.py).

    MLLMStep      actor: MLLMStage (CLIP once per image + one LM pass over all queries of the batch)
    screen_rows   task:  VerifierStage.screen (MedVeriSeg scores and the rule's verdict)
    DecoderStep   actor: DecoderStage (SAM once per image, or the MLLM's embedding of it when the
                         model shares its image encoder) for the queries that are not rejected,
                         and DecoderStage.segment_boxes for the image's box prompts
    finish_rows   task:  VerifierStage.decide, then one output row per query and box prompt (or
                         per failed input)

The same functions the in-process Predictor uses decide what is decoded (`wants_decoder`) and how
a result is assembled (`assemble`), so batch output equals the Predictor's. Box prompts skip the
MLLM and the verifier (their rows have no query, answer or verdict), as `Predictor.segment_boxes` does.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from medisee.data.codec import mask_to_rle
from medisee.infer.results import Decoded, QueryEncoding, Screening, assemble, wants_decoder
from medisee.scoring import schema


@dataclass(frozen=True)
class ModelSpec:
    """How an actor loads its part of the model, and what the output rows record about it."""

    ref: str
    tracking_uri: str | None = None
    settings: object = None  # medisee.storage.StorageSettings
    name: str = ""
    version: str = ""
    sha256: str = ""
    dtype: str = "float32"
    threads: int = 1
    device: str = "cpu"

    def load(self, part: str):
        import torch

        from medisee.artifact.model_dir import load_model_dir

        torch.set_num_threads(self.threads)
        dtype = None if self.dtype == "float32" else getattr(torch, self.dtype)
        return load_model_dir(
            self.ref, settings=self.settings, tracking_uri=self.tracking_uri, parts=(part,),
            device=self.device, dtype=dtype,
        )  # fmt: skip


def scoreable(row: dict) -> bool:
    """The row has text queries for the MLLM and the verifier."""
    return not row.get("error") and row["kind"] != "skip" and bool(row["queries"])


def has_boxes(row: dict) -> bool:
    """The row has box prompts for the decoder alone."""
    return not row.get("error") and row["kind"] != "skip" and bool(row.get("boxes"))


def image_of(row: dict) -> np.ndarray:
    return np.frombuffer(row["image"], dtype=np.uint8).reshape(row["height"], row["width"], 3)


def _fail(row: dict, stage: str, exc: Exception) -> None:
    row.update(error="model_error", error_detail=f"{type(exc).__name__}: {exc}"[:300], error_stage=stage)


def run_per_image(rows: list[dict], stage: str, fn) -> None:
    """fn(rows) for the whole batch; if it fails, once per image, so one bad image fails alone."""
    try:
        fn(rows)
    except Exception:
        for row in rows:
            try:
                fn([row])
            except Exception as exc:  # any model failure becomes this image's error
                _fail(row, stage, exc)


def share_time(rows: list[dict], column: str, started: float) -> None:
    each = (time.perf_counter() - started) / max(len(rows), 1)
    for row in rows:
        row[column] = each


# ----- MLLM --------------------------------------------------------------------------------------
class MLLMStep:
    def __init__(self, spec: ModelSpec, mode: str = "teacher_forced", max_new_tokens: int = 48):
        from medisee.infer.mllm_stage import MLLMStage

        self.stage = MLLMStage(spec.load("mllm").model, mode, max_new_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        started = time.perf_counter()
        run_per_image([r for r in rows if scoreable(r)], "mllm", self._encode)
        share_time(rows, "t_mllm", started)
        return schema.table(rows, schema.ENCODED_ROW)

    def _encode(self, rows: list[dict]) -> None:
        encodings, embeddings = self.stage.encode([image_of(r) for r in rows], [r["queries"] for r in rows])
        per_image: list[list[QueryEncoding]] = [[] for _ in rows]
        for enc in encodings:
            per_image[enc.image_index].append(enc)
        for i, (row, encs) in enumerate(zip(rows, per_image, strict=True)):
            row.update(pack_encodings(encs, self.stage.model))
            if embeddings is not None:
                embedding = embeddings[i].float().cpu().numpy()
                row.update(image_embedding=embedding.tobytes(), image_embedding_shape=list(embedding.shape))


def pack_encodings(encs: list[QueryEncoding], model) -> dict:
    side = model.grid_side
    found = [e.candidates for e in encs if e.found]
    n, d = found[0].shape if found else (len(model.text.candidate_ids), 1)
    candidates = np.zeros((len(encs), n, d), np.float32)
    similarity = np.zeros((len(encs), side, side), np.float32)
    for j, enc in enumerate(encs):
        if enc.found:
            candidates[j], similarity[j] = enc.candidates, enc.similarity
    return {
        "answers": [e.answer for e in encs],
        "found": [e.found for e in encs],
        "candidates": candidates.tobytes(),
        "candidate_shape": list(candidates.shape),
        "similarity": similarity.tobytes(),
        "similarity_side": side,
    }


def unpack_encodings(row: dict) -> list[QueryEncoding]:
    candidates = np.frombuffer(row["candidates"], np.float32).reshape(row["candidate_shape"])
    side = row["similarity_side"]
    similarity = np.frombuffer(row["similarity"], np.float32).reshape(-1, side, side)
    return [
        QueryEncoding(0, q, a, f, candidates[j] if f else None, similarity[j] if f else None)
        for j, (q, a, f) in enumerate(zip(row["queries"], row["answers"], row["found"], strict=True))
    ]


# ----- verifier ----------------------------------------------------------------------------------
def screen_rows(batch: pa.Table, calibration_json: str | None, clip_size: int) -> pa.Table:
    from medisee.infer.verifier_stage import VerifierStage

    rows = batch.to_pylist()
    started = time.perf_counter()
    stage = VerifierStage.from_json(calibration_json, clip_size)
    for row in rows:
        if not scoreable(row):
            continue
        screenings = stage.screen(unpack_encodings(row))
        row["strength"] = [s.strength if s else None for s in screenings]
        row["compactness"] = [s.compactness if s else None for s in screenings]
        row["purity"] = [s.purity if s else None for s in screenings]
        row["rule"] = [s.rule if s else None for s in screenings]
    share_time(rows, "t_verifier", started)
    return schema.table(rows, schema.SCREENED_ROW)


def screenings_of(row: dict) -> list[Screening | None]:
    return [
        Screening(s, c, p, rule) if rule is not None else None
        for s, c, p, rule in zip(row["strength"], row["compactness"], row["purity"], row["rule"], strict=True)
    ]


# ----- decoder -----------------------------------------------------------------------------------
class DecoderStep:
    def __init__(self, spec: ModelSpec, mask_threshold: float = 0.0, early_reject: bool = True):
        from medisee.infer.decoder_stage import DecoderStage

        self.stage = DecoderStage(spec.load("decoder").model, mask_threshold)
        self.early_reject = early_reject

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        started = time.perf_counter()
        run_per_image([r for r in rows if scoreable(r) or has_boxes(r)], "decoder", self._decode)
        share_time(rows, "t_decoder", started)
        return schema.table(rows, schema.DECODED_ROW)

    def _decode(self, rows: list[dict]) -> None:
        """Text queries from their candidate states, then box prompts (`segment_boxes`); each list
        of DECODED holds the queries' entries, then the boxes'."""
        images, embeddings, image_index, candidates, slots = [], [], [], [], []
        box_index, boxes, box_slots = [], [], []
        for i, row in enumerate(rows):
            images.append(image_of(row))
            embeddings.append(row_embedding(row))
            q = len(row["queries"])
            if q:
                encs = unpack_encodings(row)
                for j, screening in enumerate(screenings_of(row)):
                    if wants_decoder(screening, self.early_reject):
                        image_index.append(i)
                        candidates.append(encs[j].candidates)
                        slots.append((i, j))
            for k, box in enumerate(row.get("boxes") or []):
                box_index.append(i)
                boxes.append(box)
                box_slots.append((i, q + k))
            prompts = q + len(row.get("boxes") or [])
            row.update({k: [None] * prompts for k in DECODED_LISTS})
        for_queries, for_boxes = self.stage.decode(  # each image encoded once for both
            images, image_index, np.stack(candidates) if candidates else None, box_index, boxes, embeddings
        )
        for row in rows:
            row.update(image_embedding=None, image_embedding_shape=None)  # not carried any further
        decoded = for_queries + for_boxes
        for (i, j), d in zip(slots + box_slots, decoded, strict=True):
            row = rows[i]
            row["box"][j], row["box_unclipped"][j] = list(d.box), list(d.box_unclipped)
            row["mask_rle"][j] = mask_to_rle(d.mask)
            row["mask_score"][j], row["iou_score"][j] = d.mask_score, d.iou_score
            row["area_fraction"][j] = d.area_fraction


def row_embedding(row: dict):
    """The SAM embedding the MLLM step left in the row (medisee-lite), as a tensor; else None."""
    if not row.get("image_embedding"):
        return None
    import torch

    data = np.frombuffer(row["image_embedding"], np.float32).reshape(row["image_embedding_shape"])
    return torch.from_numpy(data.copy())


DECODED_LISTS = ("box", "box_unclipped", "mask_rle", "mask_score", "iou_score", "area_fraction")


def decoded_of(row: dict, j: int) -> Decoded | None:
    """The decoder's output for query j, with the mask kept as its RLE text."""
    if row.get("mask_rle") is None or row["mask_rle"][j] is None:
        return None
    return Decoded(
        box=tuple(row["box"][j]),
        box_unclipped=tuple(row["box_unclipped"][j]),
        mask=None,
        mask_rle=row["mask_rle"][j],
        mask_score=row["mask_score"][j],
        iou_score=row["iou_score"][j],
        area_fraction=row["area_fraction"][j],
    )


# ----- decision and output rows ------------------------------------------------------------------
def finish_rows(
    batch: pa.Table,
    calibration_json: str | None,
    clip_size: int,
    judge_config=None,
    early_reject: bool = True,
    model_info: dict | None = None,
    overlay_fraction: float = 0.0,
    padded_map: bool = False,
) -> pa.Table:
    """`clip_size`, `padded_map`: the model's (its artifact's), where the judge's overlays are drawn."""
    from medisee.infer.verifier_stage import VerifierStage

    stage = VerifierStage.from_json(calibration_json, clip_size, judge_config, padded_map)

    def results_of(row: dict) -> list[dict]:
        results = result_rows(row, stage, early_reject, model_info or {}) if row["queries"] else []
        results += box_result_rows(row, model_info or {})
        if overlay_fraction and row["queries"] and sampled(row["image_id"], overlay_fraction):
            from medisee.scoring.overlays import draw_overlay

            results[0]["overlay_png"] = draw_overlay(image_of(row), results, row)
        return results

    return output_table(batch.to_pylist(), results_of)


def output_table(rows: list[dict], results_of) -> pa.Table:
    """Output rows of image rows: a skip marker, the error rows, or `results_of(row)` and the rows of
    its refused prompts; each keeps the partition fields the writer counts by (as many rows as
    `decode.output_rows` announced). Shared by the actor-pool and the Serve path."""
    out: list[dict] = []
    for row in rows:
        common = {k: row.get(k) for k in ("partition", "partition_rows", "partition_skipped")}
        if row["kind"] == "skip":
            out.append({**common, "status": "skip", "image_id": row["image_id"]})
        elif row.get("error"):
            out.extend({**common, **r} for r in error_rows(row))
        else:
            out.extend({**common, **r} for r in results_of(row) + prompt_error_rows(row))
    return schema.table(out, schema.OUTPUT_ROW)


def _error_base(row: dict) -> dict:
    return {
        "status": "error",
        "image_id": row["image_id"],
        "source": row["source"],
        "slice_index": row.get("slice_index"),
    }


def error_rows(row: dict) -> list[dict]:
    """One error row per query and box prompt when the prompts are known (and the image's refused
    prompts with their own reasons), else one for the input."""
    base = {
        **_error_base(row),
        "stage": row.get("error_stage") or "decode",
        "reason": row["error"],
        "detail": row.get("error_detail"),
    }
    refused = prompt_error_rows(row)
    if not row["queries"] and not row.get("boxes") and not refused:
        return [{**base, "record_id": row["image_id"]}]
    return (
        [
            {**base, "record_id": rid, "query": q, "prompt": "text"}
            for rid, q in zip(row["record_ids"], row["queries"], strict=True)
        ]
        + [{**base, "record_id": rid, "prompt": "box"} for rid in row.get("box_record_ids") or []]
        + refused
    )


def prompt_error_rows(row: dict) -> list[dict]:
    """The prompts refused when the image was decoded (bad_box, query_and_box): one error row each."""
    return [
        {**_error_base(row), **e, "prompt": "box", "stage": "decode"} for e in row.get("prompt_errors") or []
    ]


def result_rows(row: dict, stage, early_reject: bool, model_info: dict) -> list[dict]:
    encs, screenings = unpack_encodings(row), screenings_of(row)
    image = None
    out = []
    for j, (enc, screening) in enumerate(zip(encs, screenings, strict=True)):
        decoded = decoded_of(row, j)
        if stage.judge is not None and image is None:
            image = image_of(row)
        verdict, decided_by = stage.decide(screening, decoded, image, enc)
        result = assemble(enc, screening, decoded, verdict, decided_by, early_reject)
        out.append(result_row(row, j, result, decoded is not None, model_info))
    return out


BOX_PROMPT = QueryEncoding(0, None, None, None, None, None)  # what a box prompt has of the MLLM: nothing


def box_result_rows(row: dict, model_info: dict) -> list[dict]:
    """Output rows of the image's box prompts: the decoder's mask for the box, no query, answer or
    verdict (the MLLM and the verifier did not run)."""
    q = len(row["queries"])
    out = []
    for k in range(len(row.get("boxes") or [])):
        decoded = decoded_of(row, q + k)
        result = assemble(BOX_PROMPT, None, decoded, None, None)
        out.append(result_row(row, k, result, decoded is not None, model_info, prompt="box"))
    return out


def result_row(row: dict, j: int, result, decoded: bool, model_info: dict, prompt: str = "text") -> dict:
    """Output row of query j (or box prompt j, `prompt="box"`) of an image row; its mask comes as
    RLE text (None when rejected)."""
    text = prompt == "text"
    return {
        "status": "result",
        "record_id": row["record_ids" if text else "box_record_ids"][j],
        **{
            k: row.get(k)
            for k in ("image_id", "source", "series_uid", "sop_uid", "slice_index", "height", "width")
        },
        "prompt": prompt,
        "query": result.query,
        "answer": result.answer,
        "found": result.found,
        "verdict": result.verdict,
        "decided_by": result.decided_by,
        "judged": result.decided_by == "judge" if text else None,
        "strength": result.strength,
        "compactness": result.compactness,
        "purity": result.purity,
        "mask_score": result.mask_score,
        "iou_score": result.iou_score,
        "area_fraction": result.area_fraction,
        "decoded": decoded,
        "box": list(result.box) if result.box else None,
        "box_unclipped": list(result.box_unclipped) if result.box_unclipped else None,
        "mask_rle": result.mask_rle,
        "mask_area": rle_area(result.mask_rle) if result.mask_rle else None,
        "t_decode_s": row.get("t_decode"),
        "t_mllm_s": row.get("t_mllm"),
        "t_verifier_s": row.get("t_verifier"),
        "t_decoder_s": row.get("t_decoder"),
        "model_name": model_info.get("name"),
        "model_version": model_info.get("version"),
        "model_sha256": model_info.get("sha256"),
    }


def rle_area(rle_text: str) -> int:
    from pycocotools import mask as mask_utils

    rle = json.loads(rle_text)
    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def sampled(image_id: str, fraction: float) -> bool:
    """A stable sample: the same images are drawn on every run."""
    return zlib.crc32(image_id.encode()) / 2**32 < fraction
