"""Prepare through Ray Data onto the moto S3, then stream the shards back with the reader."""

import json

import numpy as np
import pytest

from medisee import storage
from medisee.config import DataConfig, PrepareConfig
from medisee.data.batch import unpack_masks
from medisee.data.prepare import prepare
from medisee.data.reader import mix_fractions, shard_dataset, shard_files
from tests.data.layouts import sa_med2d_layout

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_prepare_on_ray_to_s3_and_stream_back(ray_local, s3_bucket, tmp_path):
    settings, root = s3_bucket
    # the input itself lives on S3 too
    base = sa_med2d_layout(tmp_path)
    storage.upload_dir(base, storage.join(root, "raw"), settings)
    out_sa = storage.join(root, "shards", "sa-med2d")
    manifest = prepare(
        "sa-med2d", storage.join(root, "raw"), out_sa, PrepareConfig(val_fraction=0.0), settings
    )
    assert manifest["rows_input"] == manifest["rows_written"] + manifest["rows_quarantined"]
    # the unreadable image takes its target and its false query with it; one mask is not binary
    assert manifest["quarantine_reasons"] == {"unreadable_image": 2, "mask_not_binary": 1}
    stored = json.loads(storage.read_text(storage.join(out_sa, "manifest.json"), settings))
    assert stored["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        assert (
            storage.sha256(storage.read_bytes(storage.join(out_sa, shard["path"]), settings))
            == shard["sha256"]
        )

    out_ph = storage.join(root, "shards", "phantom")
    prepare("phantom", "-", out_ph, PrepareConfig(phantom_images=12, val_fraction=0.0), settings)

    cfg = DataConfig(sam_image_size=64, clip_image_size=32, batch_size=4, mix={"sa": 1.0, "ph": 1.0})
    ds = shard_dataset(cfg, settings, split="train", uris={"sa": out_sa, "ph": out_ph})
    batches = list(ds.iter_batches(batch_size=4, batch_format="numpy"))
    rows = sum(len(b["record_id"]) for b in batches)
    sa_rows = manifest["rows_written"]
    # equal mix: the phantom source is down-sampled towards the size of the smaller one
    assert 0 < rows < sa_rows + 200
    batch = batches[0]
    assert batch["sam_image"].shape[1:] == (64, 64, 3) and batch["sam_image"].dtype == np.uint8
    assert batch["clip_image"].shape[1:] == (32, 32, 3)
    unscaled = 0
    for batch in batches:
        for i in range(len(batch["record_id"])):
            if batch["has_target"][i]:
                m = unpack_masks(batch["mask_bits"][i : i + 1], 64)[0]
                ys, xs = np.nonzero(m)
                # boxes include the mask's last pixel; exact where the image is not resized
                exact = max(batch["original_hw"][i]) == 64
                unscaled += exact
                error = np.abs(batch["box_sam"][i] - [xs.min(), ys.min(), xs.max(), ys.max()])
                assert error.max() <= (1e-4 if exact else 2)
    assert unscaled  # the 64 × 64 SA-Med2D image


def test_mix_fractions_follow_the_ratio():
    fractions = mix_fractions({"sa-med2d": 1000, "mlmr-sd": 100}, {"sa-med2d": 7, "mlmr-sd": 3})
    assert fractions["mlmr-sd"] == 1.0
    kept = {s: n * fractions[s] for s, n in {"sa-med2d": 1000, "mlmr-sd": 100}.items()}
    assert kept["sa-med2d"] / kept["mlmr-sd"] == pytest.approx(7 / 3)
    assert mix_fractions({"a": 10}, {}) == {"a": 1.0}


def test_shard_files_by_split(tmp_path):
    out = tmp_path / "o"
    prepare("phantom", "-", str(out), PrepareConfig(phantom_images=20), executor="local")
    settings = storage.StorageSettings()
    assert shard_files(str(out), "val", settings) and all(
        "/val/" in u for u in shard_files(str(out), "val", settings)
    )
