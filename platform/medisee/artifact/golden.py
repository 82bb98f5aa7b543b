"""The golden pair: one image and query whose answer is stored with the artifact when it is saved.

Evaluation and serving run it before they trust a loaded model: a mismatch means the model did not
load as saved (wrong base weights, a broken conversion, a dtype or device that changes results
beyond tolerance). Only model outputs are compared, not the verdict: recalibrating the verifier
later is allowed and changes verdicts.

    <artifact>/golden.png    the image (a 128×128 phantom)
    <artifact>/golden.json   the query and the expected box, mask (RLE), scores, and tolerances
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

GOLDEN_IMAGE, GOLDEN_ANSWER = "golden.png", "golden.json"
GOLDEN_QUERY = "Can you segment and locate the liver in this image?"
TOLERANCE = {"box_px": 1.0, "mask_iou": 0.98, "score": 1e-3}


class GoldenMismatch(RuntimeError):
    """The loaded model does not reproduce the answer stored with its artifact."""


def golden_image() -> np.ndarray:
    from medisee.data import phantom

    image, _ = phantom.generate(seed=0, index=0, size=128)
    return image


def answer_dict(result, mask_rle: str | None) -> dict:
    """What the golden pair compares, from one QueryResult (its mask given as RLE text)."""
    return {
        "query": result.query,
        "found": result.found,
        "box_unclipped": list(result.box_unclipped) if result.box_unclipped else None,
        "mask_rle": mask_rle,
        "strength": result.strength,
        "mask_score": result.mask_score,
        "iou_score": result.iou_score,
        "tolerance": TOLERANCE,
    }


def expected_answer(predictor, image: np.ndarray) -> dict:
    from medisee.data.codec import mask_to_rle

    (result,) = predictor.predict(image, [GOLDEN_QUERY])
    return answer_dict(result, mask_to_rle(result.mask) if result.mask is not None else None)


def write_golden(folder: Path, predictor) -> None:
    from PIL import Image

    image = golden_image()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    (folder / GOLDEN_IMAGE).write_bytes(buffer.getvalue())
    (folder / GOLDEN_ANSWER).write_text(json.dumps(expected_answer(predictor, image), indent=2))


def check_golden(predictor, folder: Path) -> dict:
    """Run the golden pair with an in-process Predictor; GoldenMismatch when missing or different."""
    from medisee.data.codec import decode_image

    if not (folder / GOLDEN_ANSWER).exists():
        raise GoldenMismatch(f"{folder} has no {GOLDEN_ANSWER}: save the artifact again to store one")
    want = json.loads((folder / GOLDEN_ANSWER).read_text())
    return compare_golden(
        expected_answer(predictor, decode_image((folder / GOLDEN_IMAGE).read_bytes())), want
    )


def compare_golden(got: dict, want: dict) -> dict:
    """The comparison as a dict; GoldenMismatch listing every difference beyond tolerance."""
    from medisee.data.codec import rle_to_mask
    from medisee.metrics import mask_iou

    tol = want["tolerance"]
    problems = []
    if got["found"] != want["found"]:
        problems.append(f"found {got['found']} != {want['found']}")
    if want["box_unclipped"] and got["box_unclipped"]:
        worst = float(np.max(np.abs(np.subtract(got["box_unclipped"], want["box_unclipped"]))))
        if worst > tol["box_px"]:
            problems.append(f"box differs by {worst:.2f} px > {tol['box_px']}")
    iou = 1.0
    if want["mask_rle"] and got["mask_rle"]:
        iou = mask_iou(rle_to_mask(got["mask_rle"]), rle_to_mask(want["mask_rle"]))
        if iou < tol["mask_iou"]:
            problems.append(f"mask IoU {iou:.4f} < {tol['mask_iou']}")
    for key in ("strength", "mask_score", "iou_score"):
        if want[key] is not None and got[key] is not None and abs(got[key] - want[key]) > tol["score"]:
            problems.append(f"{key} {got[key]:.5f} != {want[key]:.5f}")
    if problems:
        raise GoldenMismatch("golden pair mismatch: " + "; ".join(problems))
    return {"query": GOLDEN_QUERY, "mask_iou": iou, "ok": True}
