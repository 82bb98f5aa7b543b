"""`medisee score` end to end: a mixed archive in moto S3 through real Ray, and kill-and-rerun."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medisee import storage
from medisee.artifact.model_dir import load_predictor
from medisee.config import load_config
from medisee.data import phantom
from medisee.data.codec import rle_to_mask

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CLASSES = "liver,spleen"
QUERIES = f"template=Segment the {{class}}.;classes={CLASSES}"


def make_archive(folder: Path, shared_data: Path | None, pngs: int = 4) -> None:
    from pydicom.data import get_testdata_file

    (folder / "png").mkdir(parents=True)
    for i in range(pngs):
        Image.fromarray(phantom.generate(seed=7, index=i, size=128)[0]).save(folder / "png" / f"p{i}.png")
    (folder / "png" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "dicom").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "dicom" / "ct.dcm")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), folder / "dicom" / "truncated.dcm")
    (folder / "dicom" / "mystery.bin").write_bytes(b"no format at all" * 8)
    if shared_data is not None:
        (folder / "nifti").mkdir()
        shutil.copy(
            shared_data / "totalsegmentator_ref" / "example_mr_sm.nii.gz", folder / "nifti" / "mr.nii.gz"
        )


def upload(folder: Path, uri: str, settings) -> None:
    storage.upload_dir(folder, uri, settings)


def read_table(uri: str, settings) -> list[dict]:
    rows = []
    for file in storage.list_files(uri, (".parquet",), settings):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(file, settings))).to_pylist()
    return rows


def test_mixed_archive_in_s3_reconciles_and_equals_the_predictor(
    ray_local, s3_bucket, tiny_artifact, shared_data, tmp_path
):
    from medisee.scoring.pipeline import score_archive

    settings, bucket = s3_bucket
    make_archive(tmp_path / "archive", shared_data)
    upload(tmp_path / "archive", f"{bucket}/archive", settings)
    cfg = load_config(
        "tiny",
        [
            f"scoring.input={bucket}/archive", f"scoring.output={bucket}/out", f"scoring.model={tiny_artifact}",
            f"storage.endpoint={settings.endpoint}", "scoring.overlay_fraction=0.5", "scoring.nifti_labels=true",
            "scoring.dicom_seg=true", "scoring.mllm_batch_images=4", "scoring.decoder_batch_images=4",
        ],
    )  # fmt: skip
    cfg.scoring.queries = QUERIES
    summary = score_archive(cfg, settings)

    assert summary["reconciled"] and summary["partitions_missing"] == []
    assert summary["inputs"] == summary["results"] + summary["errors"]
    errors = read_table(f"{bucket}/out/errors", settings)
    assert {(e["source"].rsplit("/", 1)[-1], e["reason"]) for e in errors} == {
        ("broken.png", "unreadable_image"),
        ("truncated.dcm", "unreadable_dicom"),
        ("mystery.bin", "unsupported_format"),
    }
    results = read_table(f"{bucket}/out/results", settings)
    assert len(results) == summary["results"] and len({r["record_id"] for r in results}) == len(results)
    assert {r["partition"] for r in results} >= {"images-00000", "nifti-nifti_mr-2dad8c0132f1"}
    nifti_images = {r["image_id"] for r in results if r["image_id"].startswith("nifti/")}
    z_slices = nib.load(shared_data / "totalsegmentator_ref" / "example_mr_sm.nii.gz").shape[2]
    assert len(nifti_images) + summary["skipped"].get("empty_slices", 0) == z_slices

    predictor = load_predictor(str(tiny_artifact))
    for i in range(4):
        image = phantom.generate(seed=7, index=i, size=128)[0]
        expected = predictor.predict(image, ["Segment the liver.", "Segment the spleen."])
        got = sorted((r for r in results if r["image_id"] == f"png/p{i}.png"), key=lambda r: r["record_id"])
        for row, want in zip(got, expected, strict=True):
            assert (row["query"], row["verdict"], row["answer"]) == (want.query, want.verdict, want.answer)
            if want.mask is not None:
                mask = rle_to_mask(row["mask_rle"])
                assert (mask != want.mask).mean() < 1e-3 and row["mask_area"] == mask.sum()
                np.testing.assert_allclose(row["box"], want.box, atol=1e-3)
    assert storage.list_files(f"{bucket}/out/overlays", (".png",), settings)
    check_dicom_seg(bucket, settings, results)
    check_label_volume(bucket, settings, results, shared_data)
    assert all(r["model_sha256"] == predictor.artifact.sha256 for r in results)


def run_cli(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medisee.cli", "score", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)  # fmt: skip


def session_pids(ray_tmp: str) -> list[int]:
    """Every process started under this RAY_TMPDIR. Ray's workers rename themselves (`ray::PartitionWriter`),
    so their command lines do not name the session, but their environment does."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in pids if pid != os.getpid()]


def kill_tree(proc: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the driver's process group and every process of its Ray session, and wait until they are
    gone: a writer actor that outlives the count would commit a partition the test did not see."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while (pids := session_pids(ray_tmp)) and time.time() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    assert not session_pids(ray_tmp), "processes of the killed Ray session are still running"


def test_killed_driver_then_rerun_loses_nothing_and_duplicates_nothing(tiny_artifact, tmp_path):
    make_archive(tmp_path / "archive", None, pngs=12)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    args = [
        "--input", str(tmp_path / "archive"), "--queries", QUERIES, "--model", str(tiny_artifact),
        "--output", str(out), "scoring.images_per_partition=2", "scoring.mllm_batch_images=2",
        "scoring.decoder_batch_images=2",
    ]  # fmt: skip
    proc = run_cli(args, env)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "_done").glob("*.json"))) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the first run ended before it could be killed: " + proc.stderr.read()[-2000:]
    kill_tree(proc, ray_tmp)
    done_before = {p.name for p in (out / "_done").glob("*.json")}
    partitions = 7 + 3  # 13 images in chunks of 2; two DICOM series (one truncated); one unsupported file
    assert 2 <= len(done_before) < partitions

    proc = run_cli(args, env)
    stdout, stderr = proc.communicate(timeout=600)
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["partitions_scored_this_run"] == partitions - len(done_before)
    assert summary["reconciled"] and summary["partitions_done"] == partitions
    results = pq.read_table(out / "results").to_pylist()
    ids = [r["record_id"] for r in results]
    assert len(ids) == len(set(ids)) == 13 * 2  # 12 phantoms + CT_small, two queries each
    errors = pq.read_table(out / "errors").to_pylist()
    assert sorted(e["reason"] for e in errors) == [
        "unreadable_dicom",
        "unreadable_image",
        "unsupported_format",
    ]
    assert not list(out.rglob("*.tmp-*"))


def check_dicom_seg(bucket: str, settings, results: list[dict]) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    (seg_uri,) = storage.list_files(f"{bucket}/out/dicom_seg", (".dcm",), settings)
    seg = pydicom.dcmread(io.BytesIO(storage.read_bytes(seg_uri, settings)))
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert seg.Modality == "SEG"
    rows = {r["query"]: r for r in results if r["sop_uid"] == source.SOPInstanceUID}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Segment the liver.", "Segment the spleen."]
    assert [s.SegmentDescription for s in seg.SegmentSequence] == [
        f"verdict={rows[q]['verdict']}" for q in ("Segment the liver.", "Segment the spleen.")
    ]
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def check_label_volume(bucket: str, settings, results: list[dict], shared_data: Path) -> None:
    (volume_uri,) = storage.list_files(f"{bucket}/out/nifti_labels", (".nii.gz",), settings)
    labels = nib.Nifti1Image.from_bytes(
        __import__("gzip").decompress(storage.read_bytes(volume_uri, settings))
    )
    reference = nib.load(shared_data / "totalsegmentator_ref" / "example_mr_sm.nii.gz")
    assert labels.shape == reference.shape and np.allclose(labels.affine, reference.affine)
    sidecar = json.loads(storage.read_text(volume_uri.replace(".nii.gz", ".json"), settings))
    assert [entry["query"] for entry in sidecar["labels"]] == ["Segment the liver.", "Segment the spleen."]
    data = np.asanyarray(labels.dataobj)
    for entry in sidecar["labels"]:
        assert entry["voxels"] == int((data == entry["label"]).sum())
    z = next(
        r["slice_index"]
        for r in results
        if r["image_id"].startswith("nifti/") and r["mask_rle"] and r["query"] == "Segment the spleen."
    )
    mask = rle_to_mask(
        next(
            r["mask_rle"]
            for r in results
            if r["image_id"] == f"nifti/mr.nii.gz#z{z}" and r["query"] == "Segment the spleen."
        )
    )
    assert np.array_equal(np.rot90(data[:, :, z]) == 2, mask)
