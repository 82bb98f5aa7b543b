"""Box prompts in a query manifest (`{"image": KEY, "box": [x0, y0, x1, y1]}`): parsed, checked against
their image when it is decoded, refused prompts as error rows of their own, and, through the real
`medisee score` pipeline, decoded by `DecoderStage.segment_boxes` exactly as `Predictor.segment_boxes`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medisee.data import phantom
from medisee.scoring import schema
from medisee.scoring.decode import DecodeOptions, decode_partition, output_rows
from medisee.scoring.plan import plan_partitions
from medisee.scoring.queries import BoxPrompt, QuerySpecError, parse_query_spec
from medisee.scoring.stages import error_rows, finish_rows

SIZE = 64


def write_manifest(path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def write_images(folder: Path, count: int, size: int = SIZE) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i in range(count):
        image = phantom.generate(seed=11, index=i, size=size)[0]
        Image.fromarray(image).save(folder / f"p{i}.png")
        images[f"p{i}.png"] = image
    return images


# ----- manifest -----------------------------------------------------------------------------------
def test_a_manifest_line_may_carry_a_box_instead_of_queries(tmp_path):
    spec = write_manifest(
        tmp_path / "q.jsonl",
        [
            {"image": "a.png", "queries": ["Segment the liver."]},
            {"image": f"{tmp_path}/a.png", "box": [1, 2, 30, 40]},
            {"image": "./a.png", "box": [1, 2, 30, 40]},  # the same box again: once
            {"image": "a.png", "box": [5.5, 6, 7, 8], "queries": []},  # an empty query list is no query
            {"image": "b.png", "box": "not a box"},  # refused by check_box once b.png's size is known
            {"image": "b.png", "queries": "Segment the spleen.", "box": [0, 0, 9, 9]},
            {"image": "c.png", "box": [0, 0, 3, 3], "queries": None},
        ],
    )
    plan = parse_query_spec(spec, str(tmp_path))
    assert plan.has_boxes()
    assert plan.for_image(["a.png"]) == ["Segment the liver."]
    assert plan.for_image(["b.png"]) == [] and plan.for_image(["c.png"]) == []
    assert plan.boxes_for_image(["a.png"]) == [BoxPrompt([1, 2, 30, 40], 2), BoxPrompt([5.5, 6, 7, 8], 4)]
    assert plan.boxes_for_image(["b.png"]) == [
        BoxPrompt("not a box", 5),
        BoxPrompt([0, 0, 9, 9], 6, "Segment the spleen."),
    ]
    assert plan.boxes_for_image(["elsewhere.png", "c.png"]) == [BoxPrompt([0, 0, 3, 3], 7)]


def test_a_manifest_of_box_lines_only_is_a_manifest_and_other_specs_have_no_boxes(tmp_path):
    spec = write_manifest(tmp_path / "q.jsonl", [{"image": "a.png", "box": [0, 0, 1, 1]}])
    assert parse_query_spec(spec, str(tmp_path)).boxes_for_image(["a.png"]) == [BoxPrompt([0, 0, 1, 1], 1)]
    assert not parse_query_spec("records", "x").has_boxes()
    assert not parse_query_spec("template=Find the {class}.;classes=liver", "x").has_boxes()


@pytest.mark.parametrize(
    "line",
    [{"image": "a.png"}, {"image": "a.png", "box": None}, {"box": [0, 0, 1, 1]}, [1, 2]],
    ids=["neither", "null-box", "no-image", "not-an-object"],
)
def test_a_line_with_neither_queries_nor_a_box_is_refused_naming_both_forms(tmp_path, line):
    spec = write_manifest(tmp_path / "q.jsonl", [{"image": "b.png", "queries": ["q"]}, line])
    with pytest.raises(QuerySpecError, match=r'line 2: .*"queries".* or .*"box": \[x0, y0, x1, y1\]'):
        parse_query_spec(spec, str(tmp_path))


# ----- decode: boxes checked against their image, refused ones as prompt errors -----------------------
def decoded_rows(tmp_path: Path, lines: list[dict], count: int = 3) -> list[dict]:
    write_images(tmp_path / "in", count)
    (partition,) = plan_partitions(str(tmp_path / "in"))
    queries = parse_query_spec(write_manifest(tmp_path / "q.jsonl", lines), str(tmp_path / "in"))
    return decode_partition(partition, queries, DecodeOptions())


MIXED = [
    {"image": "p0.png", "queries": ["Segment the liver."]},
    {"image": "p0.png", "box": [10, 20, 40, 50]},
    {"image": "p1.png", "box": [0, 0, SIZE - 1, SIZE - 1]},
    {"image": "p1.png", "box": [100, 0, 120, 10]},
    {"image": "p1.png", "box": [3.5, 4, 20, 30.25]},
    {"image": "p2.png", "box": [30, 0, 10, 10]},
    {"image": "p2.png", "queries": ["Segment the spleen."], "box": [1, 1, 5, 5]},
]


def test_decode_keeps_the_usable_boxes_and_refuses_the_others_with_a_reason(tmp_path):
    rows = {r["image_id"]: r for r in decoded_rows(tmp_path, MIXED)}
    p0, p1, p2 = rows["p0.png"], rows["p1.png"], rows["p2.png"]
    assert (p0["queries"], p0["record_ids"]) == (["Segment the liver."], ["p0.png|q0"])
    assert (p0["boxes"], p0["box_record_ids"], p0["prompt_errors"]) == ([[10, 20, 40, 50]], ["p0.png|b0"], [])
    assert p1["queries"] == [] and p1["boxes"] == [[0, 0, SIZE - 1, SIZE - 1], [3.5, 4, 20, 30.25]]
    assert p1["box_record_ids"] == ["p1.png|b0", "p1.png|b2"]  # ids by manifest order, b1 was refused
    (refused,) = p1["prompt_errors"]
    assert (refused["record_id"], refused["reason"]) == ("p1.png|b1", "bad_box")
    assert (
        refused["detail"]
        == f"manifest line 4: box [100.0, 0.0, 120.0, 10.0] lies outside the {SIZE} x {SIZE} image"
    )
    assert p2["queries"] == [] and p2["boxes"] == []  # the image has refused prompts only: still a row
    assert [(e["record_id"], e["reason"], e["query"]) for e in p2["prompt_errors"]] == [
        ("p2.png|b0", "bad_box", None),
        ("p2.png|b1", "query_and_box", "Segment the spleen."),
    ]
    assert "x1 < x0" in p2["prompt_errors"][0]["detail"]
    assert "line 7 gives both a query text and a box" in p2["prompt_errors"][1]["detail"]
    assert [output_rows(r) for r in (p0, p1, p2)] == [2, 3, 2]
    assert p0["partition_rows"] == 7
    schema.table(list(rows.values()), schema.IMAGE_ROW)  # the rows fit the schema between the steps


def test_an_image_without_any_prompt_is_still_skipped(tmp_path):
    rows = decoded_rows(tmp_path, [{"image": "p0.png", "box": [0, 0, 5, 5]}], count=2)
    assert [r["image_id"] for r in rows] == ["p0.png"]
    assert json.loads(rows[0]["partition_skipped"]) == {"images_without_queries": 1}
    assert rows[0]["partition_rows"] == 1


def test_refused_prompts_become_error_rows_and_a_failed_image_accounts_for_every_prompt(tmp_path):
    rows = decoded_rows(tmp_path, MIXED)
    out = finish_rows(
        schema.table([r for r in rows if r["image_id"] == "p2.png"], schema.IMAGE_ROW), None, 224
    )
    assert [(r["status"], r["record_id"], r["prompt"], r["stage"], r["reason"]) for r in out.to_pylist()] == [
        ("error", "p2.png|b0", "box", "decode", "bad_box"),
        ("error", "p2.png|b1", "box", "decode", "query_and_box"),
    ]
    assert out.to_pylist()[1]["query"] == "Segment the spleen."
    failed = next(r for r in rows if r["image_id"] == "p1.png")
    failed.update(error="model_error", error_detail="RuntimeError: boom", error_stage="mllm")
    got = error_rows(failed)
    assert len(got) == output_rows({**failed, "error": None})  # what decode announced for the image
    assert [(r["record_id"], r["prompt"], r["stage"], r["reason"]) for r in got] == [
        ("p1.png|b0", "box", "mllm", "model_error"),
        ("p1.png|b2", "box", "mllm", "model_error"),
        ("p1.png|b1", "box", "decode", "bad_box"),
    ]
    unreadable = {"image_id": "x.png", "source": "x.png", "queries": [], "error": "unreadable_image"}
    assert [r["record_id"] for r in error_rows(unreadable)] == ["x.png"]  # one row for the input


def test_box_rows_are_counted_by_prompt_and_stay_out_of_volume_outputs(tmp_path):
    from medisee.scoring.writer import WriterOptions, partition_summary, write_volume_outputs

    box = {"status": "result", "image_id": "1.2/3", "prompt": "box", "verdict": None, "decided_by": None,
           "decoded": True, "partition_rows": 2, "partition_skipped": "{}"}  # fmt: skip
    text = {**box, "image_id": "1.2/4", "prompt": "text", "verdict": "absent", "decided_by": "rule"}
    summary = partition_summary("dicom-s", [box, text], [box, text], [], {})
    assert (summary["verdicts"], summary["decided_by"]) == ({"absent": 1}, {"rule": 1})
    assert summary["prompts"] == {"box": 1, "text": 1} and summary["decoded"] == 2
    # a series scored with box prompts only has no query to name a segment by: no DICOM SEG
    assert write_volume_outputs("dicom-s", [box], WriterOptions(str(tmp_path), dicom_seg=True)) == {}
    assert not list(tmp_path.iterdir())


def test_via_serve_refuses_a_manifest_with_box_prompts(tmp_path):
    from medisee.config import load_config
    from medisee.scoring.pipeline import score_archive

    write_images(tmp_path / "in", 1)
    cfg = load_config(
        "tiny",
        [
            f"scoring.input={tmp_path / 'in'}",
            f"scoring.output={tmp_path / 'out'}",
            "scoring.via_serve=medisee",
        ],
    )
    cfg.scoring.queries = write_manifest(tmp_path / "q.jsonl", [{"image": "p0.png", "box": [0, 0, 5, 5]}])
    with pytest.raises(QuerySpecError, match="box prompts; the Serve application answers text queries only"):
        score_archive(cfg, log=lambda _: None)
    assert not (tmp_path / "out").exists()


# ----- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_box_rows_through_the_batch_pipeline_equal_the_predictor_and_reconcile(
    ray_local, tiny_artifact, tmp_path
):
    from medisee.artifact.model_dir import load_predictor
    from medisee.config import load_config
    from medisee.data.codec import rle_to_mask
    from medisee.scoring.pipeline import score_archive

    size = 96
    images = write_images(tmp_path / "in", 4, size)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    boxes = {"p0.png": [[10, 20, 80, 70]], "p1.png": [[0, 0, size - 1, size - 1], [30.5, 40, 90, 95.25]]}
    lines = [
        {"image": "p0.png", "queries": ["Segment the liver."]},
        {"image": "p0.png", "box": boxes["p0.png"][0]},
        *({"image": "p1.png", "box": box} for box in boxes["p1.png"]),
        {"image": "p1.png", "box": [200, 0, 300, 10]},  # bad_box
        {"image": "p2.png", "queries": ["Segment the spleen."]},
        {"image": "p2.png", "queries": "Segment the liver.", "box": [1, 2, 3, 4]},  # query_and_box
        {"image": "p3.png", "box": [50, 20, 10, 70]},  # bad_box, the image's only prompt
        {"image": "broken.png", "box": [0, 0, 5, 5]},  # unreadable_image
    ]
    out = tmp_path / "out"
    cfg = load_config(
        "tiny",
        [
            f"scoring.input={tmp_path / 'in'}", f"scoring.output={out}", f"scoring.model={tiny_artifact}",
            "scoring.images_per_partition=2", "scoring.mllm_batch_images=2", "scoring.decoder_batch_images=2",
            "scoring.overlay_fraction=1.0",
        ],
    )  # fmt: skip
    cfg.scoring.queries = write_manifest(tmp_path / "q.jsonl", lines)
    summary = score_archive(cfg, log=lambda _: None)

    assert summary["reconciled"] and summary["partitions_missing"] == []
    assert summary["planned_inputs"] == 5 and summary["unaccounted_inputs"] == 0
    assert (summary["inputs"], summary["results"], summary["errors"]) == (9, 5, 4)
    assert summary["prompts"] == {"text": 2, "box": 3} and sum(summary["verdicts"].values()) == 2
    assert summary["error_reasons"] == {"bad_box": 2, "query_and_box": 1, "unreadable_image": 1}
    results = pq.read_table(out / "results").to_pylist()
    errors = pq.read_table(out / "errors").to_pylist()
    assert sorted((e["record_id"], e["reason"]) for e in errors) == [
        ("broken.png", "unreadable_image"),
        ("p1.png|b2", "bad_box"),
        ("p2.png|b0", "query_and_box"),
        ("p3.png|b0", "bad_box"),
    ]
    text = {r["record_id"]: r for r in results if r["prompt"] == "text"}
    assert set(text) == {"p0.png|q0", "p2.png|q0"} and all(r["verdict"] for r in text.values())
    box_rows = {r["record_id"]: r for r in results if r["prompt"] == "box"}
    assert set(box_rows) == {"p0.png|b0", "p1.png|b0", "p1.png|b1"}

    predictor = load_predictor(str(tiny_artifact))
    for name, image_boxes in boxes.items():
        expected = predictor.segment_boxes([images[name]], [0] * len(image_boxes), image_boxes)
        for k, (box, want) in enumerate(zip(image_boxes, expected, strict=True)):
            row = box_rows[f"{name}|b{k}"]
            mask = rle_to_mask(row["mask_rle"])
            np.testing.assert_array_equal(mask, want.mask)
            assert row["mask_area"] == int(want.mask.sum())
            np.testing.assert_allclose(row["box"], box)
            np.testing.assert_allclose(row["box_unclipped"], box)
            assert row["iou_score"] == pytest.approx(want.iou_score, abs=1e-5)
            assert row["mask_score"] == pytest.approx(want.mask_score, abs=1e-5)
            assert row["area_fraction"] == pytest.approx(want.area_fraction, abs=1e-6)
            assert row["decoded"] and (row["height"], row["width"]) == (size, size)
            nulls = ("query", "answer", "found", "verdict", "decided_by", "judged", "strength", "purity")
            assert [row[k] for k in nulls] == [None] * len(nulls)
    overlays = {p.name.split("-")[0] for p in (out / "overlays").iterdir()}
    assert overlays == {"p0.png", "p2.png"}  # images with a text query (a heatmap to show)
