"""`prepare` (training shards) and batch scoring make the same model input from the same file: a CT
DICOM, NIfTI volumes (CT and MR, with and without a modality given) and a 16-bit PNG, byte for byte.
Both go through medisee.data.display; this checks that neither front end windows on its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medisee.config import PrepareConfig
from medisee.data.display import volume_window
from medisee.data.sources import dicom, image_folder, load_spec, nifti
from medisee.data.sources.context import ConvertContext
from medisee.scoring.decode import DecodeOptions, decode_partition
from medisee.scoring.plan import plan_partitions
from medisee.scoring.queries import parse_query_spec

CT_WINDOW = PrepareConfig().ct_window


def prepared(source, folder: Path) -> list[bytes]:
    ctx = ConvertContext(settings=None, prepare=PrepareConfig(), source="test")
    return [
        image.image.tobytes() for spec in source.specs(str(folder), ctx) for image in load_spec(spec, ctx)
    ]


def scored(folder: Path) -> list[bytes]:
    queries = parse_query_spec("template=Segment the {class}.;classes=liver", str(folder))
    rows = [
        row
        for partition in plan_partitions(str(folder))
        for row in decode_partition(partition, queries, DecodeOptions(keep_empty_slices=True))
    ]
    assert rows and not any(row.get("error") for row in rows), rows
    return [row["image"] for row in sorted(rows, key=lambda r: r.get("slice_index") or 0)]


def test_a_ct_dicom(tmp_path):
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("CT_small.dcm"))
    for folder in ("prepare", "score"):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "ct.dcm")
    assert prepared(dicom, tmp_path / "prepare") == scored(tmp_path / "score")


def volumes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 300, (24, 20, 3)).clip(-1024, 2000).astype(np.int16)  # reaches air
    mr = rng.gamma(2.0, 150.0, (24, 20, 3)).astype(np.float32)
    return {"ct": ct, "mr": mr}


@pytest.mark.parametrize("kind", ["ct", "mr"])
@pytest.mark.parametrize("modality_given", [True, False])
def test_a_nifti_volume(tmp_path, kind, modality_given):
    volume = volumes()[kind]
    for folder in ("prepare", "score"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / folder / "vol.nii.gz")
    entry = {"image": "vol.nii.gz"} | ({"modality": kind} if modality_given else {})
    (tmp_path / "prepare" / "index.json").write_text(json.dumps({"volumes": [entry]}))
    assert prepared(nifti, tmp_path / "prepare") == scored(tmp_path / "score")
    # and the window is the one the rule gives: CT for the volume that reaches air
    expected = CT_WINDOW if kind == "ct" else tuple(np.percentile(volume.astype(np.float32), [0.5, 99.5]))
    assert volume_window(volume.astype(np.float32), None, CT_WINDOW) == pytest.approx(expected)


def test_a_16_bit_png(tmp_path):
    pixels = (np.arange(40 * 56, dtype=np.uint32).reshape(40, 56) * 29 % 65536).astype(np.uint16)
    (tmp_path / "prepare" / "images").mkdir(parents=True)
    (tmp_path / "score").mkdir()
    for path in (tmp_path / "prepare" / "images" / "x.png", tmp_path / "score" / "x.png"):
        Image.fromarray(pixels).save(path)
    assert prepared(image_folder, tmp_path / "prepare") == scored(tmp_path / "score")
