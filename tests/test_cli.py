"""`medisee prepare` from the command line: unusable inputs fail clearly and write nothing."""

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from medisee.cli import app
from tests.data.layouts import disk_mask, gray_image, save_png


def run_prepare(fmt: str, *args: str):
    return CliRunner().invoke(app, ["prepare", fmt, *args, "--executor", "local"])


def tiny_image_folder(root):
    save_png(root / "images" / "a.png", gray_image(32, 32, 1))
    save_png(root / "masks" / "a" / "lesion.png", disk_mask(32, 32, 16, 16, 5))
    save_png(root / "images" / "b.png", gray_image(24, 40, 2))
    return root


def unusable_input(root, kind: str):
    if kind == "missing":
        return root / "does-not-exist"
    if kind == "text files":
        (root / "images").mkdir(parents=True)
        (root / "images" / "scan.txt").write_text("not an image")
        (root / "notes.txt").write_text("not DICOM either")
    if kind == "no volumes":
        root.mkdir()
        (root / "index.json").write_text(json.dumps({"volumes": []}))
    root.mkdir(exist_ok=True)
    return root


@pytest.mark.parametrize(
    ("fmt", "kind", "message"),
    [
        ("image-folder", "missing", "does not exist"),
        ("image-folder", "empty", "has nothing recognisable; image-folder expects images/<stem>"),
        ("image-folder", "text files", "has nothing recognisable; image-folder expects images/<stem>"),
        ("dicom", "text files", "has nothing recognisable; dicom expects DICOM files"),
        ("nifti", "no volumes", "has nothing recognisable; nifti expects index.json"),
    ],
)
def test_unusable_input_exits_2_and_writes_nothing(tmp_path, fmt, kind, message):
    source, out = unusable_input(tmp_path / "in", kind), tmp_path / "out"
    result = run_prepare(fmt, "--input", str(source), "--output", str(out))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and f"{fmt} input {source}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout
    assert not out.exists()


def test_unknown_format_or_no_input_exits_2(tmp_path):
    out = tmp_path / "out"
    result = run_prepare("nope", "--input", str(tmp_path), "--output", str(out))
    assert result.exit_code == 2 and "unknown format 'nope'" in result.stderr
    result = run_prepare("image-folder", "--output", str(out))
    assert result.exit_code == 2 and "image-folder needs an input" in result.stderr
    assert not out.exists()


def test_good_image_folder_is_prepared(tmp_path):
    source, out = tiny_image_folder(tmp_path / "in"), tmp_path / "out"
    result = run_prepare("image-folder", "--input", str(source), "--output", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["rows_written"] == manifest["rows_written"] > 0
    assert summary["rows_quarantined"] == 0 and (out / "quarantine.parquet").exists()


def test_phantom_needs_no_input(tmp_path):
    result = run_prepare("phantom", "--output", str(tmp_path / "out"), "prepare.phantom_images=2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows_written"] > 0


def test_every_record_bad_exits_1_after_writing_the_quarantine(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    save_png(source / "images" / "a.png", gray_image(16, 16))
    save_png(source / "masks" / "a" / "lesion.png", np.zeros((16, 16), np.uint8))  # empty mask
    (source / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    result = run_prepare("image-folder", "--input", str(source), "--output", str(out))
    assert result.exit_code == 1, result.output
    assert "no rows written" in result.stderr and "quarantine.parquet" in result.stderr
    assert json.loads((out / "manifest.json").read_text())["rows_quarantined"] > 0


def test_commands_apply_the_environment_defaults(monkeypatch):
    from medisee.raylib import RAY_ENV_DEFAULTS

    for key in RAY_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert {k: os.environ.get(k) for k in RAY_ENV_DEFAULTS} == RAY_ENV_DEFAULTS
