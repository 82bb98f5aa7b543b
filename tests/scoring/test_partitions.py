"""Partitions and reconciliation: names that slug or case alike never share an output file, every
planned input comes out once, and a summary that cannot account for an input is not reconciled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medisee.scoring.plan import PlanError, plan_partitions
from medisee.scoring.writer import PartitionWriter, WriterOptions
from tests.scoring.test_batch_infer import QUERIES

SLUG_ALIKE_UIDS = ("1.2.3.4 5", "1.2.3.4+5")  # both slug to 1.2.3.4_5
INVALID_UIDS = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # as they are in the wild


def save_volume(path: Path, seed: int) -> None:
    volume = np.zeros((24, 24, 2), np.float32)
    volume[6 + seed : 18, 4:16, :] = 100.0 + seed
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)


def save_dicom(path: Path, series_uid: str) -> None:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
    ds.save_as(path)


def colliding_archive(folder: Path) -> dict[str, str]:
    """Inputs whose names (or series UIDs) slug alike or differ only in case; name -> what it is."""
    folder.mkdir(parents=True)
    for i, name in enumerate(("a b.nii.gz", "a_b.nii.gz")):
        save_volume(folder / name, i)
    for name in ("bad x.dcm", "bad_x.dcm"):
        (folder / name).write_bytes(b"neither DICOM nor anything else" * 4)
    for name, uid in zip(("s 1.dcm", "s_1.dcm"), SLUG_ALIKE_UIDS, strict=True):
        save_dicom(folder / name, uid)
    for i, name in enumerate(("A.png", "a.png", "c d.png", "c_d.png")):
        Image.fromarray(np.full((48, 48), 40 * (i + 1), np.uint8)).save(folder / name)
    return {
        "a b.nii.gz": "nifti", "a_b.nii.gz": "nifti", "bad x.dcm": "unsupported_format",
        "bad_x.dcm": "unsupported_format", "s 1.dcm": "dicom", "s_1.dcm": "dicom",
        "A.png": "image", "a.png": "image", "c d.png": "image", "c_d.png": "image",
    }  # fmt: skip


def planned_rels(partition: dict) -> list[str]:
    return [i["rel"] for i in partition.get("items", [])] or [partition["rel"]]


@INVALID_UIDS
def test_names_that_slug_or_case_alike_get_their_own_partitions(tmp_path):
    inputs = colliding_archive(tmp_path / "in")
    partitions = plan_partitions(str(tmp_path / "in"), images_per_partition=1)
    keys = [p["key"].casefold() for p in partitions]
    assert len(set(keys)) == len(keys) == len(inputs)  # images one per partition here
    assert sorted(r for p in partitions for r in planned_rels(p)) == sorted(inputs)
    series = sorted(p["series_uid"] for p in partitions if p["kind"] == "dicom")
    assert series == sorted(SLUG_ALIKE_UIDS)
    again = plan_partitions(str(tmp_path / "in"), images_per_partition=1)
    assert [p["key"] for p in again] == [p["key"] for p in partitions]  # a rerun finds the same


def test_overlays_of_images_named_alike_are_separate_files(tmp_path):
    names = ["A.png", "a.png", "c d.png", "c_d.png"]
    rows = [
        result_row("images-00000", f"/in/{n}", n, len(names)) | {"overlay_png": n.encode()} for n in names
    ]
    PartitionWriter(WriterOptions(str(tmp_path / "out"))).add("images-00000", rows)
    overlays = sorted((tmp_path / "out" / "overlays").iterdir())
    assert len({p.name.casefold() for p in overlays}) == len(names)
    assert sorted(p.read_bytes() for p in overlays) == sorted(n.encode() for n in names)


def test_a_plan_with_a_key_twice_is_refused_naming_both_inputs():
    from medisee.scoring.plan import check_unique_keys

    twice = [
        {"key": "nifti-a_b.nii.gz", "kind": "nifti", "uri": "/in/a b.nii.gz", "rel": "a b.nii.gz"},
        {"key": "nifti-a_b.nii.gz", "kind": "nifti", "uri": "/in/a_b.nii.gz", "rel": "a_b.nii.gz"},
    ]
    with pytest.raises(PlanError, match="a b.nii.gz and a_b.nii.gz"):
        check_unique_keys(twice)
    case_only = [
        {"key": "file-A.png", "kind": "unreadable", "uri": "/in/A.png", "rel": "A.png"},
        {"key": "file-a.png", "kind": "unreadable", "uri": "/in/a.png", "rel": "a.png"},
    ]
    with pytest.raises(PlanError, match="A.png and a.png"):
        check_unique_keys(case_only)


def test_copies_of_one_dicom_instance_score_once_and_the_copy_is_an_error(tmp_path):
    from pydicom.data import get_testdata_file

    (tmp_path / "in").mkdir()
    for name in ("bad x.dcm", "bad_x.dcm"):
        shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "in" / name)
    partitions = plan_partitions(str(tmp_path / "in"))
    (series,) = [p for p in partitions if p["kind"] == "dicom"]
    (copy,) = [p for p in partitions if p["kind"] == "unreadable"]
    assert [i["rel"] for i in series["items"]] == ["bad x.dcm"]
    assert (copy["rel"], copy["error"]) == ("bad_x.dcm", "duplicate_instance")
    assert "bad x.dcm" in copy["detail"]


# ----- symbolic links ------------------------------------------------------------------------------
def test_a_symlink_leaving_the_input_is_an_error_row_and_never_read(tmp_path, monkeypatch):
    from medisee import storage
    from medisee.scoring.decode import DecodeOptions, decode_partition
    from medisee.scoring.queries import parse_query_spec

    inside, outside = tmp_path / "in", tmp_path / "elsewhere"
    (inside / "sub").mkdir(parents=True)
    (outside / "folder").mkdir(parents=True)
    for path in (inside / "sub" / "real.png", outside / "secret.png", outside / "folder" / "more.png"):
        Image.fromarray(np.full((32, 32), 90, np.uint8)).save(path)
    (inside / "leaves.png").symlink_to(outside / "secret.png")
    (inside / "leaves_dir").symlink_to(outside / "folder")
    (inside / "stays.png").symlink_to(Path("sub") / "real.png")
    partitions = plan_partitions(str(inside))
    refused = sorted((p["rel"], p["error"]) for p in partitions if p["kind"] == "unreadable")
    assert refused == [
        ("leaves.png", "symlink_outside_input"),
        ("leaves_dir/more.png", "symlink_outside_input"),
    ]
    (images,) = [p for p in partitions if p["kind"] == "image"]
    assert sorted(i["rel"] for i in images["items"]) == ["stays.png", "sub/real.png"]

    read = []
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *a: read.append(uri) or b"")
    queries = parse_query_spec(QUERIES, str(inside))
    for p in partitions:
        if p["kind"] == "unreadable":
            (row,) = decode_partition(p, queries, DecodeOptions())
            assert (row["image_id"], row["error"], row["error_stage"]) == (
                p["rel"],
                "symlink_outside_input",
                "plan",
            )
    assert read == []


# ----- reconciliation ----------------------------------------------------------------------------
def result_row(partition: str, uri: str, rel: str, total: int, query: int = 0) -> dict:
    return {
        "status": "result", "record_id": f"{rel}|q{query}", "image_id": rel, "source": uri,
        "partition": partition, "partition_rows": total, "partition_skipped": "{}",
        "query": f"q{query}", "verdict": "absent", "decided_by": "rule", "decoded": False,
    }  # fmt: skip


def commit(output: Path, partition: dict, items: list[dict] | None = None) -> None:
    """Commits one result row per planned input (or per item of `items`) for `partition`."""
    items = items if items is not None else partition.get("items") or [partition]
    rows = [result_row(partition["key"], i["uri"], i["rel"], len(items)) for i in items]
    PartitionWriter(WriterOptions(str(output))).add(partition["key"], rows)


def summary_of(output: Path, partitions: list[dict]) -> dict:
    from medisee.scoring.pipeline import summarize

    return summarize(str(output), partitions, None, 1.0, len(partitions))


@pytest.fixture()
def two_partitions(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((16, 16), 50, np.uint8)).save(tmp_path / name)
    partitions = plan_partitions(str(tmp_path), images_per_partition=1)
    for p in partitions:
        commit(tmp_path / "out", p)
    assert summary_of(tmp_path / "out", partitions)["reconciled"]
    return tmp_path / "out", partitions


def test_a_deleted_result_file_is_not_reconciled(two_partitions):
    output, partitions = two_partitions
    key = partitions[1]["key"]
    (output / "results" / f"{key}.parquet").unlink()
    summary = summary_of(output, partitions)
    assert not summary["reconciled"]
    assert "files hold 0 + 0" in summary["partitions_inconsistent"][key]
    assert summary["unaccounted_examples"] == ["b.png"]


def test_a_marker_claiming_more_rows_than_its_files_is_not_reconciled(two_partitions):
    output, partitions = two_partitions
    marker_path = output / "_done" / f"{partitions[0]['key']}.json"
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps(marker | {"results": marker["results"] + 1}))
    summary = summary_of(output, partitions)
    assert not summary["reconciled"]
    assert list(summary["partitions_inconsistent"]) == [partitions[0]["key"]]


def test_an_overwritten_partition_is_not_reconciled(tmp_path):
    """What colliding keys did: two planned volumes, one key, the second volume's files only."""
    planned = [
        {"key": "nifti-a_b.nii.gz", "kind": "nifti", "uri": f"{tmp_path}/in/{rel}", "rel": rel}
        for rel in ("a b.nii.gz", "a_b.nii.gz")
    ]
    commit(tmp_path / "out", planned[0])
    commit(tmp_path / "out", planned[1])  # same key: overwrites the first one's files and marker
    summary = summary_of(tmp_path / "out", planned)
    assert not summary["reconciled"]
    assert summary["partitions_missing"] == [] and summary["unaccounted_examples"] == ["a b.nii.gz"]


def test_inputs_skipped_for_want_of_queries_still_reconcile(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((16, 16), 50, np.uint8)).save(tmp_path / name)
    (partition,) = plan_partitions(str(tmp_path))
    rows = [result_row(partition["key"], partition["items"][0]["uri"], "a.png", 1)]
    rows[0]["partition_skipped"] = json.dumps({"images_without_queries": 1})
    PartitionWriter(WriterOptions(str(tmp_path / "out"))).add(partition["key"], rows)
    assert summary_of(tmp_path / "out", [partition])["reconciled"]


# ----- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
@INVALID_UIDS
def test_inputs_named_alike_each_come_out_once(ray_local, tiny_artifact, tmp_path):
    from medisee.config import load_config
    from medisee.scoring.pipeline import score_archive

    inputs = colliding_archive(tmp_path / "in")
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp_path / "elsewhere" / "secret.png")
    (tmp_path / "in" / "link.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    inputs["link.png"] = "symlink_outside_input"
    out = tmp_path / "out"
    cfg = load_config(
        "tiny",
        [
            f"scoring.input={tmp_path / 'in'}", f"scoring.output={out}", f"scoring.model={tiny_artifact}",
            "scoring.overlay_fraction=1.0", "scoring.dicom_seg=true", "scoring.nifti_labels=true",
            "scoring.mllm_batch_images=8", "scoring.decoder_batch_images=8",
        ],
    )  # fmt: skip
    cfg.scoring.queries = QUERIES
    summary = score_archive(cfg, log=lambda _: None)

    assert summary["reconciled"] and summary["partitions_missing"] == []
    assert summary["planned_inputs"] == len(inputs) and summary["unaccounted_inputs"] == 0
    results, errors = pq.read_table(out / "results").to_pylist(), pq.read_table(out / "errors").to_pylist()
    assert len({r["record_id"] for r in results}) == len(results) == summary["results"]
    name = lambda row: Path(row["source"]).name  # noqa: E731
    assert sorted((name(e), e["reason"]) for e in errors) == sorted(
        (n, kind) for n, kind in inputs.items() if kind not in ("image", "nifti", "dicom")
    )
    scored = {n for n, kind in inputs.items() if kind in ("image", "nifti", "dicom")}
    assert {name(r) for r in results} == scored
    assert all(len({r["query"] for r in results if name(r) == n}) == 2 for n in scored)  # both queries
    images = {r["image_id"] for r in results}
    assert len(list((out / "overlays").iterdir())) == len(images)
    assert len(list((out / "dicom_seg").glob("*.dcm"))) == 2
    assert len(list((out / "nifti_labels").glob("*.nii.gz"))) == 2
    written = [p.relative_to(out).as_posix().casefold() for p in out.rglob("*") if p.is_file()]
    assert len(written) == len(set(written))  # no two files one name, even case-insensitively
