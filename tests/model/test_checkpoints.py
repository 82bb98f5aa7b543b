"""Saved tiny models in every format users have, loaded back from a local path and from S3."""

import re

import numpy as np
import pytest
import torch

from medisee import storage
from medisee.model import build_model
from medisee.model.checkpoint import CheckpointError, load_trainable, save_trainable, write_torch
from tests.model.conftest import QUERIES


def same_predictions(a, b, images, exact=True):
    """Identical outputs; `exact=False` allows float rounding (a merged LoRA reorders the sums)."""
    pa, pb = a.predict(images, QUERIES), b.predict(images, QUERIES)
    for x, y in zip(pa, pb, strict=True):
        if exact:
            assert (
                x.box == y.box
                and np.array_equal(x.mask, y.mask)
                and np.array_equal(x.similarity, y.similarity)
            )
        else:
            assert np.allclose(x.box, y.box, atol=1e-3) and np.allclose(
                x.similarity, y.similarity, rtol=1e-4, atol=1e-4
            )
            assert (x.mask == y.mask).mean() > 0.999


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model with non-trivial heads, saved as a LLaVA dir, a SAM .pth and our trainable file."""
    root = tmp_path_factory.mktemp("saved")
    model = build_model("tiny", seed=7, finetune="full")
    with torch.no_grad():
        for module in (model.box_decoder, model.seg_router, model.box_router, model.text_projection):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.llava.save_pretrained(root / "llava")
    model.text.tokenizer.save_pretrained(root / "llava")
    torch.save(model.sam.state_dict(), root / "medsam_vit_b.pth")
    save_trainable(model, str(root / "trainable.pt"), "tiny")
    return model, root


def test_llava_dir_and_sam_pth_and_trainable_round_trip(saved, images):
    model, root = saved
    loaded = build_model(
        "tiny",
        llava_path=str(root / "llava"),
        sam_checkpoint=str(root / "medsam_vit_b.pth"),
        medisee_checkpoint=str(root / "trainable.pt"),
        finetune="full",
        seed=99,
    )
    loaded.eval()
    same_predictions(model, loaded, images)


def test_trainable_checkpoint_only_holds_what_is_trained(saved):
    model, root = saved
    lora = build_model("tiny", finetune="lora")
    state = lora.trainable_state_dict()
    assert all(not k.startswith("sam.image_encoder") and "vision_tower" not in k for k in state)
    total = sum(p.numel() for p in lora.parameters())
    assert sum(v.numel() for v in state.values()) < 0.6 * total


@pytest.mark.integration
def test_loaders_read_from_s3(saved, s3_bucket, images):
    settings, root_uri = s3_bucket
    model, root = saved
    storage.upload_dir(root, root_uri, settings)
    loaded = build_model(
        "tiny",
        llava_path=storage.join(root_uri, "llava"),
        sam_checkpoint=storage.join(root_uri, "medsam_vit_b.pth"),
        medisee_checkpoint=storage.join(root_uri, "trainable.pt"),
        finetune="full",
        settings=settings,
    )
    loaded.eval()
    same_predictions(model, loaded, images)


def official_layout(model) -> dict[str, torch.Tensor]:
    """Our state dict written with the official release's key names, q/v as LoRA-wrapped base layers."""
    renames = [
        (r"^llava\.model\.language_model\.", "model."),
        (r"^llava\.lm_head\.", "lm_head."),
        (r"^llava\.model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
        (r"^llava\.model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
        (r"^llava\.model\.vision_tower\.", "model.vision_tower.vision_tower."),
        (r"^sam\.", "model.visual_model."),
        (r"^text_projection\.fc1\.", "model.text_hidden_fcs.0.0."),
        (r"^text_projection\.fc2\.", "model.text_hidden_fcs.0.2."),
        (r"^(seg_router|box_router|box_decoder)\.", r"model.\1."),
    ]
    out = {}
    gen = torch.Generator().manual_seed(0)
    for key, value in model.state_dict().items():
        new = key
        for a, b in renames:
            if re.search(a, new):
                new = re.sub(a, b, new, count=1)
                break
        if re.search(r"\.(q_proj|v_proj)\.weight$", new) and new.startswith("model.layers"):
            base = new[: -len(".weight")]
            a = torch.randn(8, value.shape[1], generator=gen) * 0.1
            b = torch.randn(value.shape[0], 8, generator=gen) * 0.1
            out[f"base_model.model.{base}.base_layer.weight"] = value - (16 / 8) * (b @ a)
            out[f"base_model.model.{base}.lora_A.default.weight"] = a
            out[f"base_model.model.{base}.lora_B.default.weight"] = b
        else:
            out[new] = value
    return out


def test_official_release_layout_loads_and_matches(saved, images, tmp_path):
    model, _ = saved
    write_torch(official_layout(model), str(tmp_path / "medisee_official.pth"))
    # tokenizer + architecture come from the LLaVA dir; every weight from the release
    loaded = build_model(
        "tiny", llava_path=str(saved[1] / "llava"), official_release=str(tmp_path / "medisee_official.pth")
    )
    loaded.eval()
    same_predictions(model, loaded, images, exact=False)


def test_convert_checkpoint_cli(saved, images, tmp_path):
    from typer.testing import CliRunner

    from medisee.cli import app

    model, root = saved
    write_torch(official_layout(model), str(tmp_path / "official.pth"))
    result = CliRunner().invoke(
        app, ["convert-checkpoint", "-i", str(tmp_path / "official.pth"), "-o", str(tmp_path / "conv.pth")]
    )
    assert result.exit_code == 0, result.output
    loaded = build_model("tiny", llava_path=str(root / "llava"), official_release=str(tmp_path / "conv.pth"))
    loaded.eval()
    same_predictions(model, loaded, images, exact=False)


def test_missing_and_mismatched_checkpoints_are_clear_errors(saved, tmp_path):
    model, root = saved
    with pytest.raises(CheckpointError, match="nope.pth"):
        build_model("tiny", sam_checkpoint=str(tmp_path / "nope.pth"))
    state = dict(model.sam.state_dict())
    state.pop("mask_decoder.iou_token.weight")
    state["image_encoder.pos_embed"] = torch.zeros(1, 2, 2, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointError,
        match=r"bad\.pth.*missing \(1\): mask_decoder\.iou_token\.weight.*image_encoder\.pos_embed",
    ):
        build_model("tiny", sam_checkpoint=str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match="config.json"):
        build_model("tiny", llava_path=str(tmp_path))
    with pytest.raises(CheckpointError, match="needs model.llava_path"):
        build_model("medisee-7b")
    lora = build_model("tiny", finetune="lora")
    with pytest.raises(CheckpointError, match="trainable.pt"):
        load_trainable(lora, str(root / "trainable.pt"))
