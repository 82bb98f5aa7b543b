"""medisee-lite through `medisee score` unchanged: real CT slices scored on Ray Data with the real-weights
model give the in-process Predictor's answers, box rows give LiteMedSAM's masks, and the counts reconcile."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from medisee.data.codec import decode_image, mask_box, rle_to_mask
from tests.lite.conftest import dice

pytestmark = [pytest.mark.slow, pytest.mark.integration]

QUERIES = ["Segment the liver.", "Where is the spleen?"]


def test_real_ct_slices_score_as_the_predictor_answers_and_reconcile(
    ray_local, lite_artifact, ct_slice, shared_data, tmp_path
):
    from medisee.artifact.model_dir import load_predictor
    from medisee.config import load_config
    from medisee.scoring.pipeline import score_archive

    inputs = tmp_path / "in"
    inputs.mkdir()
    second = shared_data / "sam_med2d_demo" / "images" / "s0114_111.png"  # 258 x 181, another patient
    for path in (ct_slice.path, second):
        shutil.copy(path, inputs / path.name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    liver_box = mask_box(ct_slice.masks["liver"])
    lines = [
        {"image": ct_slice.path.name, "queries": QUERIES},
        {"image": ct_slice.path.name, "box": liver_box},
        {"image": second.name, "queries": QUERIES[:1]},
        {"image": "broken.png", "queries": QUERIES[:1]},
    ]
    manifest = tmp_path / "queries.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    cfg = load_config(
        "medisee-lite",
        [f"scoring.input={inputs}", f"scoring.output={out}", f"scoring.model={lite_artifact}",
         "scoring.images_per_partition=2", "scoring.mllm_batch_images=2", "scoring.decoder_batch_images=2"],
    )  # fmt: skip
    cfg.scoring.queries = str(manifest)
    summary = score_archive(cfg, log=lambda _: None)

    assert (
        summary["reconciled"] and summary["partitions_missing"] == [] and summary["unaccounted_inputs"] == 0
    )
    assert (summary["inputs"], summary["results"], summary["errors"]) == (5, 4, 1)
    assert summary["prompts"] == {"text": 3, "box": 1}
    assert summary["error_reasons"] == {"unreadable_image": 1}
    results = {r["record_id"]: r for r in pq.read_table(out / "results").to_pylist()}

    predictor = load_predictor(lite_artifact)
    for path, queries in ((ct_slice.path, QUERIES), (second, QUERIES[:1])):
        image = decode_image(path.read_bytes())
        for k, want in enumerate(predictor.predict(image, queries)):
            row = results[f"{path.name}|q{k}"]
            assert (row["query"], row["answer"], row["verdict"]) == (want.query, want.answer, want.verdict)
            assert row["strength"] == pytest.approx(want.strength, abs=1e-4)
            if want.mask is None:
                assert row["mask_rle"] is None
                continue
            mask = rle_to_mask(row["mask_rle"])
            assert mask.shape == image.shape[:2] and dice(mask, want.mask) >= 0.999

    box_row = results[f"{ct_slice.path.name}|b0"]
    mask = rle_to_mask(box_row["mask_rle"])
    want = predictor.segment_box(decode_image(ct_slice.png), liver_box)
    np.testing.assert_array_equal(mask, want.mask)
    np.testing.assert_allclose(box_row["box"], liver_box)
    score = dice(mask, ct_slice.masks["liver"])
    print(f"LiteMedSAM in batch, liver of {ct_slice.path.name} from its box: Dice {score:.3f}")
    assert score >= 0.80  # LiteMedSAM's own quality on this slice: 0.844
