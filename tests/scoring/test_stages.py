"""The batch steps, called in-process on real rows, equal the Predictor; decode and plan edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medisee.artifact.model_dir import describe_model, load_predictor
from medisee.data import phantom
from medisee.data.codec import rle_to_mask
from medisee.scoring import schema
from medisee.scoring.decode import DecodeOptions, decode_partition
from medisee.scoring.plan import classify, plan_partitions
from medisee.scoring.queries import QuerySpecError, parse_query_spec
from medisee.scoring.stages import DecoderStep, MLLMStep, ModelSpec, finish_rows, screen_rows

QUERIES = "template=Segment the {class}.;classes=liver,spleen,left_kidney"


def write_images(folder, count: int) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        image, _ = phantom.generate(seed=5, index=i, size=128)
        Image.fromarray(image).save(folder / f"img{i}.png")
        images.append(image)
    return images


def run_steps(rows: list[dict], spec: ModelSpec, early_reject: bool = True):
    table = schema.table(rows, schema.IMAGE_ROW)
    table = MLLMStep(spec)(table)
    clip_size = describe_model(spec.ref)["inputs"]["clip_size"]
    table = screen_rows(table, None, clip_size)
    table = DecoderStep(spec, early_reject=early_reject)(table)
    return finish_rows(
        table,
        None,
        clip_size,
        early_reject=early_reject,
        model_info={"name": "m", "version": "1", "sha256": "x"},
    )


def test_batch_steps_equal_the_predictor(tmp_path, tiny_artifact):
    images = write_images(tmp_path / "in", 3)
    partitions = plan_partitions(str(tmp_path / "in"), images_per_partition=8)
    queries = parse_query_spec(QUERIES, str(tmp_path / "in"))
    rows = decode_partition(partitions[0], queries, DecodeOptions())
    out = run_steps(rows, ModelSpec(str(tiny_artifact))).to_pylist()
    predictor = load_predictor(str(tiny_artifact))
    expected = [r for image in images for r in predictor.predict(image, queries.template_queries)]
    assert [r["status"] for r in out] == ["result"] * 9
    assert [r["record_id"] for r in out] == [f"img{i}.png|q{j}" for i in range(3) for j in range(3)]
    for got, want in zip(out, expected, strict=True):
        assert (got["query"], got["answer"], got["found"]) == (want.query, want.answer, want.found)
        assert (got["verdict"], got["decided_by"]) == (want.verdict, want.decided_by)
        assert got["strength"] == pytest.approx(want.strength, abs=1e-4)
        if want.mask is None:
            assert got["mask_rle"] is None and got["box"] is None
            continue
        np.testing.assert_allclose(got["box"], want.box, atol=1e-3)
        mask = rle_to_mask(got["mask_rle"])
        assert mask.shape == want.mask.shape
        assert (mask != want.mask).mean() < 1e-3  # a pixel may flip at the threshold under padding
        assert got["mask_area"] == int(mask.sum())
        assert got["iou_score"] == pytest.approx(want.iou_score, abs=1e-4)


def test_rejected_queries_skip_the_decoder_and_show_no_mask(tmp_path, tiny_artifact, monkeypatch):
    write_images(tmp_path / "in", 1)
    partitions = plan_partitions(str(tmp_path / "in"))
    rows = decode_partition(partitions[0], parse_query_spec(QUERIES, str(tmp_path / "in")), DecodeOptions())
    from medisee.infer import verifier_stage

    def all_absent(self, encodings):
        from medisee.infer.results import Screening

        return [Screening(0.0, 0.0, 0.0, "absent") for _ in encodings]

    monkeypatch.setattr(verifier_stage.VerifierStage, "screen", all_absent)
    out = run_steps(rows, ModelSpec(str(tiny_artifact))).to_pylist()
    assert [(r["verdict"], r["decoded"], r["mask_rle"], r["box"]) for r in out] == [
        ("absent", False, None, None)
    ] * 3
    kept = run_steps(rows, ModelSpec(str(tiny_artifact)), early_reject=False).to_pylist()
    assert all(r["decoded"] and r["mask_rle"] for r in kept)


def test_a_failing_image_becomes_error_rows_and_the_others_go_on(tmp_path, tiny_artifact, monkeypatch):
    write_images(tmp_path / "in", 2)
    partitions = plan_partitions(str(tmp_path / "in"))
    rows = decode_partition(partitions[0], parse_query_spec(QUERIES, str(tmp_path / "in")), DecodeOptions())
    step = MLLMStep(ModelSpec(str(tiny_artifact)))
    real = step.stage.__class__.encode

    def flaky(self, images, queries, mode=None):
        if any(im.shape[0] == 128 and im[0, 0, 0] == 255 for im in images):
            raise RuntimeError("boom")
        return real(self, images, queries, mode)

    rows[1]["image"] = np.full((128, 128, 3), 255, np.uint8).tobytes()
    monkeypatch.setattr(step.stage.__class__, "encode", flaky)
    clip_size = describe_model(str(tiny_artifact))["inputs"]["clip_size"]
    table = screen_rows(step(schema.table(rows, schema.IMAGE_ROW)), None, clip_size)
    table = DecoderStep(ModelSpec(str(tiny_artifact)))(table)
    out = finish_rows(table, None, clip_size).to_pylist()
    assert [r["status"] for r in out] == ["result"] * 3 + ["error"] * 3
    assert {(r["reason"], r["stage"]) for r in out[3:]} == {("model_error", "mllm")}
    assert [r["record_id"] for r in out[3:]] == [f"img1.png|q{j}" for j in range(3)]


def test_decode_errors_name_their_input(tmp_path):
    folder = tmp_path / "in"
    write_images(folder, 1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(folder / "big.png")
    Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30).save(folder / "deep.png")
    Image.fromarray(np.zeros((20, 30, 4), np.uint8)).save(folder / "rgba.png")
    partition = plan_partitions(str(folder))[0]
    rows = decode_partition(
        partition, parse_query_spec(QUERIES, str(folder)), DecodeOptions(max_image_pixels=200 * 200)
    )
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["broken.png"]["error"] == "unreadable_image"
    assert by_id["big.png"]["error"] == "too_large"
    assert by_id["deep.png"].get("error") is None and (
        by_id["deep.png"]["height"],
        by_id["deep.png"]["width"],
    ) == (40, 50)
    assert by_id["rgba.png"].get("error") is None
    assert rows[0]["partition_rows"] == 3 * 3 + 2  # three images with 3 queries, two error rows


def test_query_specs(tmp_path):
    assert parse_query_spec("template=Find the {class}.;classes=liver,left_kidney", "x").template_queries == [
        "Find the liver.",
        "Find the left kidney.",
    ]
    manifest = tmp_path / "q.jsonl"
    manifest.write_text(
        json.dumps({"image": f"{tmp_path}/a.png", "queries": ["q1", "q2"]}) + "\n"
        + json.dumps({"image": "1.2.3", "queries": "q3"}) + "\n"
    )  # fmt: skip
    plan = parse_query_spec(str(manifest), str(tmp_path))
    assert plan.for_image(["a.png"]) == ["q1", "q2"]
    assert plan.for_image(["b.png", "1.2.3"]) == ["q3"]
    for bad in ("nonsense", "template=no class;classes=a", "template=the {class}"):
        with pytest.raises(QuerySpecError):
            parse_query_spec(bad, "x")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(QuerySpecError, match="line 1"):
        parse_query_spec(str(tmp_path / "bad.jsonl"), str(tmp_path))
    with pytest.raises(QuerySpecError, match="reserved"):
        parse_query_spec("template=Where is the {class} <image>?;classes=liver", "x")
    (tmp_path / "tokens.jsonl").write_text('{"image": "a.png", "queries": ["Segment [SEG] it"]}\n')
    with pytest.raises(QuerySpecError, match="line 1: '\\[SEG\\]' is reserved"):
        parse_query_spec(str(tmp_path / "tokens.jsonl"), str(tmp_path))


def test_classify_and_plan_a_mixed_folder(tmp_path, shared_data):
    import shutil

    from pydicom.data import get_testdata_file

    write_images(tmp_path / "png", 3)
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "mystery.xyz").write_bytes(b"nothing recognisable")
    shutil.copy(shared_data / "totalsegmentator_ref" / "example_mr_sm.nii.gz", tmp_path / "mr.nii.gz")
    assert [classify(n) for n in ("a.PNG", "b.nii.gz", "c.parquet", "d.json", ".hidden", "e")] == [
        "image", "nifti", "shard", None, None, "dicom",
    ]  # fmt: skip
    kinds = {p["key"]: p["kind"] for p in plan_partitions(str(tmp_path), images_per_partition=2)}
    assert kinds == {
        "images-00000": "image",
        "images-00001": "image",
        "nifti-mr-9696d5dd8c96": "nifti",
        "dicom-1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322-5713db53730f": "dicom",
        "file-mystery.xyz-76a121292551": "unreadable",
    }


def test_dicom_series_are_ordered_by_position(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    for name, z in (("a.dcm", 30.0), ("b.dcm", -10.0), ("c.dcm", 5.0)):
        source.SeriesInstanceUID, source.SOPInstanceUID = series, generate_uid()
        source.ImagePositionPatient = [0.0, 0.0, z]
        source.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        source.save_as(tmp_path / name)
    (partition,) = plan_partitions(str(tmp_path))
    assert [i["rel"] for i in partition["items"]] == ["b.dcm", "c.dcm", "a.dcm"]
    rows = decode_partition(partition, parse_query_spec(QUERIES, str(tmp_path)), DecodeOptions())
    assert [r["slice_index"] for r in rows] == [0, 1, 2]
    assert all(r["series_uid"] == series and r.get("error") is None for r in rows)


def test_nifti_slices_skip_empty_ones_and_resample(tmp_path):
    import nibabel as nib

    volume = np.zeros((20, 10, 4), np.float32)
    volume[5:15, 2:8, 1:3] = 100.0
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 2.0, 3.0, 1.0])), tmp_path / "v.nii.gz")
    (partition,) = plan_partitions(str(tmp_path))
    queries = parse_query_spec(QUERIES, str(tmp_path))
    rows = decode_partition(partition, queries, DecodeOptions())
    assert [r["image_id"] for r in rows] == ["v.nii.gz#z1", "v.nii.gz#z2"]
    assert json.loads(rows[0]["partition_skipped"]) == {"empty_slices": 2}
    assert (rows[0]["height"], rows[0]["width"]) == (10, 20)  # display: rot90 of the (x, y) slice
    resampled = decode_partition(
        partition, queries, DecodeOptions(resample_spacing=True, keep_empty_slices=True)
    )
    assert len(resampled) == 4
    assert (resampled[0]["height"], resampled[0]["width"]) == (20, 20)  # y spacing 2 -> twice the rows
    assert resampled[0]["native_hw"] == [10, 20]


def test_score_command_refuses_bad_input_queries_and_a_foreign_output(tmp_path, tiny_artifact):
    from typer.testing import CliRunner

    from medisee.cli import app

    write_images(tmp_path / "in", 1)

    def score(*args):
        base = ["score", "--model", str(tiny_artifact), "--output", str(tmp_path / "out")]
        return CliRunner().invoke(app, [*base, *args])

    missing = score("--input", str(tmp_path / "nope"), "--queries", QUERIES)
    assert missing.exit_code == 2 and "does not exist" in missing.output
    records = score("--input", str(tmp_path / "in"))
    assert (
        records.exit_code == 2 and "queries=records takes the queries from parquet shards" in records.output
    )
    bad_spec = score("--input", str(tmp_path / "in"), "--queries", "segment everything")
    assert bad_spec.exit_code == 2 and "expected 'records'" in bad_spec.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_job.json").write_text('{"input": "somewhere else"}')
    foreign = score("--input", str(tmp_path / "in"), "--queries", QUERIES)
    assert foreign.exit_code == 2 and "holds the output of another job" in foreign.output
    assert not (tmp_path / "out" / "results").exists()


def test_decode_and_writer_steps_import_no_torch():
    """Decode workers and the writer start without torch (seconds per process on 2 cores)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import medisee.scoring.decode, medisee.scoring.writer, medisee.scoring.stages\n"
        "from medisee.infer import VerifierStage\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
