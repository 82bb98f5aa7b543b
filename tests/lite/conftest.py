"""One medisee-lite artifact (real SmolLM2 and LiteMedSAM weights, untrained heads) for the tests that
run it through the platform's front ends, and the real CT slice they ask about."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CT = "amos_0004_75"  # sam_med2d_demo: a 512 x 512 abdominal CT slice with liver, aorta and IVC masks


@dataclass
class CtSlice:
    path: Path
    png: bytes
    masks: dict[str, np.ndarray]  # class name -> ground-truth mask


@pytest.fixture(scope="package")
def lite_artifact(lite_lm_folder, tmp_path_factory) -> str:
    """The lite model saved as an artifact; its LM is the run's converted SmolLM2 folder, named in the
    config, so Ray workers started before the run's MEDISEE_CACHE was set load the same weights."""
    from medisee.artifact.model_dir import save_model_dir
    from medisee.config import load_config
    from medisee.model.build import build_from_config

    cfg = load_config("medisee-lite", [f"model.llava_path={lite_lm_folder}"])
    model = build_from_config(cfg)
    model.eval()
    folder = tmp_path_factory.mktemp("lite-artifact") / "model"
    save_model_dir(model, cfg, folder, golden=False)
    return str(folder)


@pytest.fixture(scope="package")
def ct_slice(shared_data) -> CtSlice:
    demo = shared_data / "sam_med2d_demo"
    path = demo / "images" / f"{CT}.png"
    masks = {}
    for mask_path in sorted((demo / "masks").glob(f"{CT}_*_000.png")):
        name = mask_path.stem[len(CT) + 1 : -len("_000")].replace("_", " ")
        masks[name] = np.asarray(Image.open(mask_path)) > 127
    return CtSlice(path, path.read_bytes(), masks)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0
