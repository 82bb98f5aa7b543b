"""Paths that index files list stay inside the input: absolute ones, `..` ones (and, for the listed
image-folder, symbolic links leaving it) are quarantined with the reason, never opened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medisee import storage
from medisee.data.sources.files import outside_input
from tests.data.layouts import disk_mask, gray_image, save_png
from tests.data.test_converters import read_output_of

OUTSIDE = ("/etc/passwd", "../x.png")


@pytest.fixture()
def opened(monkeypatch):
    """Every URI read through storage during the test."""
    uris: list[str] = []
    read_bytes = storage.read_bytes

    def spy(uri, *args, **kwargs):
        uris.append(str(uri))
        return read_bytes(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", spy)
    return uris


def good_image(base: Path, image: str, mask: str) -> None:
    save_png(base / image, gray_image(32, 32, 1))
    save_png(base / mask, disk_mask(32, 32, 16, 16, 6))


def bait(root: Path) -> None:
    """A valid image at `../x.png` of the input (so reading it would succeed)."""
    save_png(root / "x.png", gray_image(32, 32, 2))


def sa_med2d(root: Path) -> Path:
    base = root / "in"
    good_image(base, "images/good.png", "masks/good--0003_000.png")
    index = {
        "images/good.png": ["masks/good--0003_000.png", "/etc/passwd", "../x--0003_000.png"],
        "/etc/passwd": ["masks/good--0003_000.png"],
        "../x.png": [],
    }
    (base / "SAMed2D_v1.json").write_text(json.dumps(index))
    (base / "SAMed2D_v1_class_mapping_id.json").write_text(json.dumps({"good--0003_000.png": "liver"}))
    return base


def mlmr_sd(root: Path) -> Path:
    base = root / "in"
    good_image(base, "images/good.png", "masks/good--0001_000.png")
    good_image(base, "images/t.png", "masks/t--0001_000.png")
    train = {
        "images/good.png": {"masks/good--0001_000.png": "liver", "/etc/passwd": "spleen"},
        "../x.png": {"masks/good--0001_000.png": "liver"},
    }
    (base / "train.json").write_text(json.dumps(train))
    lines = [
        {"image": "images/t.png", "mask": "masks/t--0001_000.png", "class_text": "liver", "short": "Which?"},
        {"image": "/etc/passwd", "mask": "masks/t--0001_000.png", "class_text": "kidney", "short": "Which?"},
        {"image": "images/t.png", "mask": "../x.png", "class_text": "spleen", "short": "Which?"},
    ]
    (base / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return base


def sam_med2d_demo(root: Path) -> Path:
    base = root / "in"
    good_image(base, "images/good.png", "masks/good_liver_000.png")
    train = {
        "data_demo/images/good.png": ["data_demo/masks/good_liver_000.png", "../good_spleen_000.png"],
        "/etc/passwd": [],
        "../x.png": ["../x_liver_000.png"],
    }
    (base / "image2label_train.json").write_text(json.dumps(train))
    (base / "label2image_test.json").write_text(
        json.dumps({"/etc/good_kidney_000.png": "data_demo/images/good.png"})
    )
    return base


@pytest.mark.parametrize(
    ("fmt", "layout", "refused"),
    [
        ("sa-med2d", sa_med2d, {"/etc/passwd", "../x--0003_000.png", "../x.png"}),
        ("mlmr-sd", mlmr_sd, {"/etc/passwd", "../x.png"}),
        ("sam-med2d-demo", sam_med2d_demo, {"../good_spleen_000.png", "/etc/passwd", "../x.png", "/etc/good_kidney_000.png"}),
    ],
)  # fmt: skip
def test_index_entries_outside_the_input_are_quarantined_unopened(tmp_path, opened, fmt, layout, refused):
    bait(tmp_path)
    manifest, rows, quarantine = read_output_of(fmt, layout(tmp_path), tmp_path)
    assert rows and quarantine
    assert {q["reason"] for q in quarantine} == {"unsafe_path"}
    named = {q["detail"].split("'")[1] for q in quarantine}
    assert named == refused
    assert not [u for u in opened if u.endswith(("passwd", "/x.png")) or ".." in u]


def test_image_folder_symlinks_leaving_the_input_are_quarantined_unopened(tmp_path, opened):
    base = tmp_path / "in"
    good_image(base, "images/good.png", "masks/good/liver_000.png")
    bait(tmp_path)
    save_png(tmp_path / "mask.png", disk_mask(32, 32, 16, 16, 6))
    (base / "images" / "leak.png").symlink_to(tmp_path / "x.png")
    (base / "masks" / "good" / "spleen_000.png").symlink_to(tmp_path / "mask.png")
    manifest, rows, quarantine = read_output_of("image-folder", base, tmp_path)
    assert rows and {q["reason"] for q in quarantine} == {"symlink_outside_input"}
    assert {q["input_ref"] for q in quarantine} == {"images/leak.png", "masks/good/spleen_000.png"}
    assert not [u for u in opened if u.endswith(("leak.png", "spleen_000.png"))]


@pytest.mark.parametrize(
    "entry", ["/etc/passwd", "../x.png", "images/../../x.png", "s3://other/x.png", "\\\\host\\x.png", ""]
)
def test_the_one_path_check_refuses_what_could_leave_the_input(tmp_path, entry):
    assert outside_input(str(tmp_path), entry).reason == "unsafe_path"
    assert outside_input("s3://bucket/in", entry).reason == "unsafe_path"


def test_the_one_path_check_accepts_paths_inside(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "link.png").symlink_to(tmp_path / "images" / "real.png")
    for entry in ("images/a.png", "images/link.png", "a..b.png", "images/./c.png"):
        assert outside_input(str(tmp_path), entry) is None
    assert outside_input("s3://bucket/in", "images/a b.png") is None
    assert all(outside_input(str(tmp_path), e) is not None for e in OUTSIDE)
