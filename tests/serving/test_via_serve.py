"""`medisee score --via-serve`: the running application scores a batch; rows equal the actor-pool path."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medisee.config import load_config
from medisee.data import phantom
from medisee.data.codec import rle_to_mask

pytestmark = [pytest.mark.slow, pytest.mark.integration]
QUERIES = "template=Segment the {class}.;classes=liver,spleen"
SMALL = [  # beside the session's Serve replicas on 2 CPUs
    "scoring.decode_num_cpus=0.05", "scoring.task_num_cpus=0.05", "scoring.mllm_num_cpus=0.1", "scoring.decoder_num_cpus=0.1",
    "scoring.images_per_partition=3",
]  # fmt: skip


def score(inputs, output, **options) -> tuple[dict, list[dict]]:
    from medisee.scoring.pipeline import score_archive

    cfg = load_config("tiny", [f"scoring.input={inputs}", f"scoring.output={output}", *SMALL])
    cfg.scoring.queries = QUERIES
    for key, value in options.items():
        setattr(cfg.scoring, key, value)
    summary = score_archive(cfg)
    rows = sorted(pq.read_table(output / "results").to_pylist(), key=lambda r: r["record_id"])
    return summary, rows


def test_via_serve_rows_equal_the_actor_pool_rows(served, tmp_path):
    inputs = tmp_path / "images"
    inputs.mkdir()
    for i in range(5):
        Image.fromarray(phantom.generate(seed=17, index=i, size=128)[0]).save(inputs / f"s{i}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    via, via_rows = score(inputs, tmp_path / "via", via_serve=served.app_name)
    pool, pool_rows = score(inputs, tmp_path / "pool", model=served.v1)
    assert via["reconciled"] and pool["reconciled"]
    assert (via["results"], via["errors"]) == (pool["results"], pool["errors"]) == (10, 1)
    assert pq.read_table(tmp_path / "via" / "errors").to_pylist()[0]["reason"] == "unreadable_image"
    for a, b in zip(via_rows, pool_rows, strict=True):
        same = (
            "record_id",
            "image_id",
            "query",
            "answer",
            "found",
            "verdict",
            "decided_by",
            "decoded",
            "model_sha256",
        )
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
        assert a["strength"] == pytest.approx(b["strength"], abs=1e-4)
        if a["mask_rle"] is None:
            assert b["mask_rle"] is None
            continue
        np.testing.assert_allclose(a["box"], b["box"], atol=1e-3)
        assert (rle_to_mask(a["mask_rle"]) != rle_to_mask(b["mask_rle"])).mean() < 1e-3
