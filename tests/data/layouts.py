"""Small dataset layouts written on the fly, in the exact formats the converters read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def disk_mask(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8) * 255


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def gray_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w), dtype=np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def sa_med2d_layout(root: Path) -> Path:
    """SAMed2Dv1 with 2 CT images (one with 2 masks), 1 MR image, a corrupted image and a bad mask."""
    base = root / "SAMed2Dv1"
    index, mapping = {}, {}
    specs = [
        (
            "ct_00--AbdomenCT1K--Case_00011--x_0040",
            64,
            80,
            [("0003_000", "liver", (30, 30, 12)), ("0005_000", "spleen", (20, 60, 8))],
        ),
        ("ct_00--AbdomenCT1K--Case_00012--x_0041", 64, 64, [("0003_000", "liver", (32, 32, 10))]),
        ("mr_00--ACDC--patient001_frame01--z_0000", 48, 48, [("0001_000", "left ventricle", (24, 24, 8))]),
    ]
    for i, (name, h, w, masks) in enumerate(specs):
        save_png(base / "images" / f"{name}.png", gray_image(h, w, i))
        index[f"images/{name}.png"] = []
        for suffix, cls, (cy, cx, r) in masks:
            mask_name = f"{name}--{suffix}.png"
            save_png(base / "masks" / mask_name, disk_mask(h, w, cy, cx, r))
            index[f"images/{name}.png"].append(f"masks/{mask_name}")
            mapping[mask_name] = cls
    # corrupted image
    bad = "ct_00--AbdomenCT1K--Case_00013--x_0001"
    (base / "images" / f"{bad}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    save_png(base / "masks" / f"{bad}--0003_000.png", disk_mask(32, 32, 16, 16, 5))
    index[f"images/{bad}.png"] = [f"masks/{bad}--0003_000.png"]
    mapping[f"{bad}--0003_000.png"] = "liver"
    # non-binary mask on a good image
    name = specs[1][0]
    nb = np.zeros((64, 64), np.uint8)
    nb[10:20, 10:20] = 128
    nb[20:30, 20:30] = 255
    save_png(base / "masks" / f"{name}--0007_000.png", nb)
    index[f"images/{name}.png"].append(f"masks/{name}--0007_000.png")
    mapping[f"{name}--0007_000.png"] = "kidney"
    (base / "SAMed2D_v1.json").write_text(json.dumps(index))
    (base / "SAMed2D_v1_class_mapping_id.json").write_text(json.dumps(mapping))
    return base


def mlmr_sd_layout(root: Path) -> Path:
    base = root / "mlmr"
    train = {}
    for i, (cls, h, w) in enumerate([("liver", 64, 64), ("spleen", 64, 96)]):
        name = f"ct_00--Ds--Case_{i:05d}--x_0001"
        save_png(base / "images" / f"{name}.png", gray_image(h, w, 10 + i))
        save_png(base / "masks" / f"{name}--0001_000.png", disk_mask(h, w, h // 2, w // 2, 10))
        train[f"images/{name}.png"] = {f"masks/{name}--0001_000.png": cls}
    prompts = {
        "liver": {
            "long": ["Long liver question A?", "Long liver question B?"],
            "short": ["Short liver question?"],
            "long_explanation": ["Because bile A.", "Because bile B."],
            "short_explanation": ["It makes bile."],
        },
        "spleen": {"long": ["Long spleen question?"], "short": ["Short spleen question?"]},
    }
    (base / "train.json").write_text(json.dumps(train))
    (base / "prompts.json").write_text(json.dumps(prompts))
    name = "ct_00--Ds--Case_00099--x_0002"
    save_png(base / "images" / f"{name}.png", gray_image(50, 70, 99))
    save_png(base / "masks" / f"{name}--0001_000.png", disk_mask(50, 70, 25, 35, 9))
    line = {
        "image": f"images/{name}.png",
        "mask": f"masks/{name}--0001_000.png",
        "class_text": "liver",
        "long": "Which organ is affected by hepatitis here?",
        "short": "Which organ makes bile?",
        "bbox": [0.4, 0.3, 0.6, 0.7],  # normalised [x0, y0, x1, y1], as the MLMR-SD test file gives it
    }
    (base / "test.jsonl").write_text(json.dumps(line) + "\n")
    return base


def image_folder_layout(root: Path) -> Path:
    base = root / "folder"
    save_png(base / "images" / "a.png", gray_image(40, 60, 1))
    save_png(base / "masks" / "a" / "tumour_000.png", disk_mask(40, 60, 20, 30, 6))
    save_png(base / "masks" / "a" / "cyst.png", disk_mask(40, 60, 10, 10, 4))
    save_png(base / "images" / "b.png", gray_image(30, 30, 2))
    save_png(base / "masks" / "b" / "tumour_000.png", np.zeros((30, 30), np.uint8))  # empty mask
    save_png(base / "images" / "c.png", gray_image(30, 30, 3))
    save_png(base / "masks" / "c" / "tumour_000.png", disk_mask(20, 20, 10, 10, 3))  # wrong shape
    (base / "modality.txt").write_text("us\n")
    return base
