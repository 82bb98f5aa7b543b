"""Every converter on real or format-exact inputs; bad records land in quarantine with a reason."""

import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from medisee import storage
from medisee.config import PrepareConfig
from medisee.data.codec import decode_image, row_mask
from medisee.data.prepare import PrepareError, prepare
from medisee.data.prompts import REASONING_SUFFIXES
from tests.data.layouts import image_folder_layout, mlmr_sd_layout, sa_med2d_layout


def read_output(out):
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(out / shard["path"]).to_pylist()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert manifest["rows_input"] == manifest["rows_written"] + manifest["rows_quarantined"]
    assert len(rows) == manifest["rows_written"] and len(quarantine) == manifest["rows_quarantined"]
    assert len({r["record_id"] for r in rows}) == len(rows)
    for shard in manifest["shards"]:
        import hashlib

        assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    return manifest, rows, quarantine


def test_sam_med2d_demo(shared_data, tmp_path):
    manifest, rows, quarantine = read_output_of("sam-med2d-demo", shared_data / "sam_med2d_demo", tmp_path)
    assert not quarantine
    positives = [r for r in rows if r["query_kind"] == "referring"]
    assert len(positives) == 30  # one per mask in the demo
    names = {r["class_name"] for r in positives}
    assert {"lung lower lobe left", "inferior vena cava", "vertebrae t9"} & {n.lower() for n in names}
    hips = [r for r in positives if r["class_name"] == "hip left"]
    assert len(hips) == 2 and {r["record_id"].split("/")[3] for r in hips} == {"000", "001"}
    assert {r["split"] for r in positives} == {"train", "test"}
    false = [r for r in rows if r["query_kind"] == "false_query"]
    for row in false:
        same_image = {r["class_name"] for r in positives if r["image_id"] == row["image_id"]}
        assert row["class_name"] not in same_image and row["mask_png"] is None and row["box"] is None
    assert [r for r in rows if r["query_kind"] == "image_only"][0]["modality"] == "mr"
    row = positives[0]
    image, mask = decode_image(row["image_png"]), row_mask(row)
    assert image.shape[:2] == mask.shape == (row["height"], row["width"])
    ys, xs = np.nonzero(mask)
    assert row["box"] == [xs.min(), ys.min(), xs.max(), ys.max()]  # the last pixel included


def read_output_of(fmt, input_path, tmp_path, **kwargs):
    out = tmp_path / "out"
    prepare(fmt, str(input_path), str(out), executor="local", **kwargs)
    return read_output(out)


def test_sa_med2d_release_layout_with_bad_records(tmp_path):
    base = sa_med2d_layout(tmp_path)
    manifest, rows, quarantine = read_output_of(
        "sa-med2d", base, tmp_path, prepare_cfg=PrepareConfig(false_queries_per_image=1)
    )
    reasons = {q["reason"] for q in quarantine}
    assert reasons == {"unreadable_image", "mask_not_binary"}
    refs = {q["reason"]: q["input_ref"] for q in quarantine}
    assert refs["mask_not_binary"].endswith("--0007_000.png")
    ref_rows = [r for r in rows if r["query_kind"] == "referring"]
    assert {r["class_name"] for r in ref_rows} == {"liver", "spleen", "left ventricle"}
    assert {r["modality"] for r in ref_rows} == {"ct", "mr"}
    assert all("[SEG]" in r["answer"] and "[BBOX]" in r["answer"] for r in ref_rows)
    # the MR image has no other MR class to ask about; CT images ask about an absent CT class
    false = [r for r in rows if r["query_kind"] == "false_query"]
    assert all(r["modality"] == "ct" for r in false)


def with_test_boxes(base, boxes):
    """Give the layout's test.jsonl one line per box, each with its own copy of the mask (instances
    000, 001, ...) on the same 50 × 70 (H × W) image."""
    (line,) = [json.loads(t) for t in (base / "test.jsonl").read_text().splitlines()]
    masks = [line["mask"].removesuffix("_000.png") + f"_{i:03d}.png" for i in range(len(boxes))]
    lines = [dict(line, bbox=box, mask=mask) for box, mask in zip(boxes, masks, strict=True)]
    for mask in masks[1:]:
        shutil.copy(base / line["mask"], base / mask)
    (base / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in lines))
    return base


def test_mlmr_sd_train_and_test(tmp_path):
    manifest, rows, quarantine = read_output_of("mlmr-sd", mlmr_sd_layout(tmp_path), tmp_path)
    assert not quarantine
    kinds = {(r["class_name"], r["query_kind"], r["split"]) for r in rows}
    assert (
        ("liver", "reasoning_long", "test") in kinds
        and ("spleen", "reasoning_short", "train") in kinds
        or ("spleen", "reasoning_short", "val") in kinds
    )
    liver_long = [
        r
        for r in rows
        if r["class_name"] == "liver" and r["query_kind"] == "reasoning_long" and r["split"] != "test"
    ][0]
    pair = {"long liver question a?": "Because bile A.", "long liver question b?": "Because bile B."}
    question, suffix = liver_long["query"].split("? ", 1)
    # training rows are lower-cased and draw a suffix; val rows keep the case and use the validation one
    assert pair[question.lower() + "?"] == liver_long["explanation"] and suffix in REASONING_SUFFIXES
    assert liver_long["answer"].startswith(("[SEG]", "It is", "Sure"))
    assert liver_long["answer"].lower().endswith(liver_long["explanation"].lower())
    test_row = [r for r in rows if r["split"] == "test" and r["query_kind"] == "reasoning_short"][0]
    # test.jsonl boxes are normalised; rows keep pixels: x · W, y · H of the 50 × 70 (H × W) image
    assert (test_row["height"], test_row["width"]) == (50, 70)
    assert test_row["box"] == pytest.approx([0.4 * 70, 0.3 * 50, 0.6 * 70, 0.7 * 50], abs=1e-4)
    assert test_row["box"] == pytest.approx([28.0, 15.0, 42.0, 35.0], abs=1e-4)
    normalised = np.asarray(test_row["box"]) / [70, 50, 70, 50]
    assert normalised.tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7], abs=1e-6)


def test_mlmr_sd_refuses_test_boxes_that_are_not_normalised(tmp_path):
    pixels, inverted, good = [26, 16, 45, 35], [0.6, 0.3, 0.4, 0.7], [0.1, 0.2, 0.3, 0.4]
    base = with_test_boxes(mlmr_sd_layout(tmp_path), [pixels, inverted, good])
    manifest, rows, quarantine = read_output_of("mlmr-sd", base, tmp_path)
    refused = {}
    for q in quarantine:
        refused.setdefault(q["input_ref"].rsplit("--", 1)[1], set()).add((q["reason"], q["detail"]))
    assert set(refused) == {"0001_000.png", "0001_001.png"}  # the long and the short query of each
    ((reason, detail),) = refused["0001_000.png"]
    assert reason == "box_not_normalized"
    assert "[26, 16, 45, 35] has a coordinate outside [0, 1]" in detail and "not pixels" in detail
    assert refused["0001_001.png"] == {("bad_box", "[0.6, 0.3, 0.4, 0.7] has x1 < x0 or y1 < y0")}
    assert len(quarantine) == 4
    kept = [r for r in rows if r["split"] == "test" and r["box"] is not None]
    assert {r["input_ref"].rsplit("--", 1)[1] for r in kept} == {"0001_002.png"}
    assert kept[0]["box"] == pytest.approx([7.0, 10.0, 21.0, 20.0], abs=1e-4)  # 0.1·70, 0.2·50, ...


def test_image_folder_quarantines_empty_and_mismatched_masks(tmp_path):
    manifest, rows, quarantine = read_output_of("image-folder", image_folder_layout(tmp_path), tmp_path)
    assert sorted(q["reason"] for q in quarantine) == ["empty_mask", "mask_shape_mismatch"]
    assert {r["class_name"] for r in rows if r["query_kind"] == "referring"} == {"tumour", "cyst"}
    assert {r["modality"] for r in rows} == {"us"}


def test_nifti_totalsegmentator(shared_data, tmp_path):
    ref = shared_data / "totalsegmentator_ref"
    index = {
        "volumes": [
            {
                "image": str(ref / "example_ct_sm.nii.gz"),
                "label": str(ref / "example_seg.nii.gz"),
                "modality": "ct",
                "classes": str(ref / "class_map_total_and_total_mr.json") + "#total",
            },
            {
                "image": str(ref / "example_mr_sm.nii.gz"),
                "label": str(ref / "example_seg_mr.nii.gz"),
                "modality": "mr",
                "classes": str(ref / "class_map_total_and_total_mr.json") + "#total_mr",
            },
        ]
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    manifest, rows, quarantine = read_output_of("nifti", tmp_path, tmp_path)
    assert not quarantine
    ct = [r for r in rows if r["modality"] == "ct" and r["query_kind"] == "referring"]
    mr = [r for r in rows if r["modality"] == "mr" and r["query_kind"] == "referring"]
    assert len(ct) == 767 and len(mr) == 321  # (slice, class) pairs, as the data README counts
    assert len({r["image_id"] for r in ct}) == 30 and len({r["image_id"] for r in mr}) == 20
    assert "spleen" in {r["class_name"] for r in ct}
    assert all(r["height"] == 101 and r["width"] == 122 for r in ct)  # rot90 of a 122x101 slice


def test_dicom_files_and_truncated_file(tmp_path):
    from pydicom.data import get_testdata_file

    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    mask = np.zeros((128, 128), np.uint8)
    mask[40:60, 50:80] = 255
    from PIL import Image

    Image.fromarray(mask).save(folder / "ct_lesion.png")
    (folder / "labels.json").write_text(json.dumps({"CT_small.dcm": {"lesion": "ct_lesion.png"}}))
    manifest, rows, quarantine = read_output_of("dicom", folder, tmp_path)
    assert [q["reason"] for q in quarantine] == ["unreadable_dicom"]
    assert quarantine[0]["input_ref"].endswith("MR_truncated.dcm")
    by_kind = {r["query_kind"]: r for r in rows}
    # mask[40:60, 50:80]: the last foreground pixel is column 79, row 59 (inclusive, as the reference)
    assert by_kind["referring"]["modality"] == "ct" and by_kind["referring"]["box"] == [50, 40, 79, 59]
    assert by_kind["image_only"]["modality"] == "mr"
    image = decode_image(by_kind["referring"]["image_png"])
    assert image.shape == (128, 128, 3) and image.std() > 10  # windowed, not flat


def test_phantom_is_deterministic_and_has_all_query_kinds(tmp_path):
    cfg = PrepareConfig(phantom_images=30, seed=3)
    m1, rows1, q1 = read_output_of("phantom", "-", tmp_path / "a", prepare_cfg=cfg)
    m2, rows2, _ = read_output_of("phantom", "-", tmp_path / "b", prepare_cfg=cfg)
    assert not q1
    assert [r["record_id"] for r in rows1] == [r["record_id"] for r in rows2]
    assert rows1[0]["image_png"] == rows2[0]["image_png"]
    kinds = {r["query_kind"] for r in rows1}
    assert kinds == {"referring", "reasoning_short", "reasoning_long", "false_query"}
    assert any("left of the image" in r["query"] or "largest area" in r["query"] for r in rows1)
    assert {"train", "val"} == {r["split"] for r in rows1}


def test_shards_are_bounded_in_size(tmp_path):
    cfg = PrepareConfig(phantom_images=40, shard_max_bytes=50_000)
    manifest, rows, _ = read_output_of("phantom", "-", tmp_path, prepare_cfg=cfg)
    train_shards = [s for s in manifest["shards"] if s["split"] == "train"]
    assert len(train_shards) > 2
    assert sum(s["rows"] for s in manifest["shards"]) == len(rows)


def test_rle_mask_format(tmp_path):
    cfg = PrepareConfig(phantom_images=3)
    _, png_rows, _ = read_output_of("phantom", "-", tmp_path / "png", prepare_cfg=cfg)
    _, rle_rows, _ = read_output_of("phantom", "-", tmp_path / "rle", prepare_cfg=cfg, mask_format="rle")
    for a, b in zip(png_rows, rle_rows, strict=True):
        if a["query_kind"] != "false_query":
            assert b["mask_png"] is None and b["mask_rle"]
            np.testing.assert_array_equal(row_mask(a), row_mask(b))


def unusable_input(tmp_path, kind: str):
    """An input folder that no format can turn into rows."""
    root = tmp_path / "input"
    if kind == "missing":
        return root
    root.mkdir()
    if kind == "other files":
        for name in ("notes.txt", "README.md", ".DS_Store", "images/scan.txt"):
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_text("not an image")
    if kind == "no volumes":
        (root / "index.json").write_text(json.dumps({"volumes": []}))
    return root


@pytest.mark.parametrize(
    ("fmt", "kind", "message"),
    [
        ("image-folder", "missing", "does not exist"),
        ("image-folder", "empty", "has nothing recognisable; image-folder expects images/<stem>"),
        ("image-folder", "other files", "has nothing recognisable; image-folder expects images/<stem>"),
        ("dicom", "empty", "has nothing recognisable; dicom expects DICOM files"),
        ("dicom", "other files", "has nothing recognisable; dicom expects DICOM files"),
        ("nifti", "no volumes", "has nothing recognisable; nifti expects index.json"),
        ("nifti", "empty", "is unreadable (FileNotFoundError"),
        ("sa-med2d", "other files", "is unreadable (FileNotFoundError"),
        ("mlmr-sd", "empty", "is unreadable (FileNotFoundError: no train.json or test.jsonl"),
        ("sam-med2d-demo", "other files", "has nothing recognisable; sam-med2d-demo expects images/"),
    ],
)
def test_unusable_input_is_an_error_and_writes_nothing(tmp_path, fmt, kind, message):
    source, out = unusable_input(tmp_path, kind), tmp_path / "out"
    with pytest.raises(PrepareError, match=re.escape(message)) as info:
        prepare(fmt, str(source), str(out), executor="local")
    assert f"{fmt} input {source} " in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_unknown_format_and_no_input_are_errors(tmp_path):
    with pytest.raises(PrepareError, match="unknown format 'nope'; choose one of sa-med2d"):
        prepare("nope", str(tmp_path), str(tmp_path / "out"), executor="local")
    with pytest.raises(PrepareError, match="image-folder needs an input"):
        prepare("image-folder", "-", str(tmp_path / "out"), executor="local")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_missing_or_unusable_s3_prefix_is_an_error(s3_bucket):
    settings, root = s3_bucket
    storage.write_bytes(f"{root}/notes/readme.txt", b"no images here", settings)
    for source, message in [
        (f"{root}/nothing", "does not exist"),
        ("s3://no-such-bucket-medisee/x", "does not exist"),
        (f"{root}/notes", "has nothing recognisable"),
    ]:
        with pytest.raises(PrepareError, match=message):
            prepare("image-folder", source, f"{root}/out", settings=settings, executor="local")
    assert storage.list_files(f"{root}/out", (), settings) == []


def test_every_record_bad_is_a_run_with_a_quarantine(tmp_path):
    (tmp_path / "in" / "images").mkdir(parents=True)
    (tmp_path / "in" / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    manifest, rows, quarantine = read_output_of("image-folder", tmp_path / "in", tmp_path)
    assert manifest["rows_written"] == 0 and manifest["shards"] == [] and not rows
    assert [q["reason"] for q in quarantine] == ["unreadable_image"]
