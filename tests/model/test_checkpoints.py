"""Saved tiny models in every format users have, loaded back from a local path and from S3."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file, save_file

from medisee import storage
from medisee.infer.predictor import Predictor
from medisee.model import build_model
from medisee.model.checkpoint import (
    CheckpointError,
    convert_official_file,
    convert_official_state_dict,
    load_official_release,
    write_torch,
)
from tests.model.conftest import QUERIES


def same_predictions(a, b, images, exact=True):
    """Identical outputs; `exact=False` allows float rounding (a merged LoRA reorders the sums)."""
    queries = [QUERIES] * len(images)
    pa = Predictor(a, early_reject=False).predict_batch(images, queries)
    pb = Predictor(b, early_reject=False).predict_batch(images, queries)
    for x, y in zip(sum(pa, []), sum(pb, []), strict=True):
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
    """A tiny model with non-trivial heads, saved as a LLaVA dir, a SAM .pth and its trained weights
    (as a model artifact's weights.safetensors holds them)."""
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
    save_file(model.trainable_state_dict(), str(root / "trainable.safetensors"))
    return model, root


def test_llava_dir_and_sam_pth_and_trainable_round_trip(saved, images):
    model, root = saved
    loaded = build_model(
        "tiny",
        llava_path=str(root / "llava"),
        sam_checkpoint=str(root / "medsam_vit_b.pth"),
        finetune="full",
        seed=99,
    )
    loaded.load_trainable_state_dict(load_file(str(root / "trainable.safetensors")), "trainable.safetensors")
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
        finetune="full",
        settings=settings,
    )
    weights = storage.read_bytes(storage.join(root_uri, "trainable.safetensors"), settings)
    loaded.load_trainable_state_dict(load(weights), "trainable.safetensors")
    loaded.eval()
    same_predictions(model, loaded, images)


RELEASE_NAMES = [
    (r"^llava\.model\.language_model\.", "model."),
    (r"^llava\.lm_head\.", "lm_head."),
    (r"^llava\.model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^llava\.model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^llava\.model\.vision_tower\.", "model.vision_tower.vision_tower."),
    (r"^sam\.", "model.visual_model."),
    (r"^text_projection\.fc1\.", "model.text_hidden_fcs.0.0."),
    (r"^text_projection\.fc2\.", "model.text_hidden_fcs.0.2."),
    (r"^seg_router\.", "model.router_seg."),
    (r"^box_router\.", "model.router_box."),
    (r"^box_decoder\.", "model.bbox_decoder."),
]


def release_name(key: str) -> str:
    for a, b in RELEASE_NAMES:
        if re.search(a, key):
            return re.sub(a, b, key, count=1)
    return key


HEADS = ("seg_router.", "box_router.", "box_decoder.", "text_projection.")


def release_heads(model) -> dict[str, torch.Tensor]:
    """The heads exactly as the release stores them: its routers see cat([e_bbox, e_seg]) and
    output 0 weights [BBOX], so the gate's input blocks and output rows are the other way round."""
    out = {}
    for key, value in model.state_dict().items():
        if not key.startswith(HEADS):
            continue
        if key.endswith("gate.0.weight"):
            d = value.shape[1] // 2
            value = torch.cat([value[:, d:], value[:, :d]], 1)
        elif ".gate.2." in key:
            value = value.flip(0)
        out[release_name(key)] = value.clone()
    return out


def official_layout(model, lora: bool = True) -> dict[str, torch.Tensor]:
    """The whole model in the release's names and conventions; `lora`: q/v as LoRA-wrapped base layers."""
    out = release_heads(model)
    gen = torch.Generator().manual_seed(0)
    for key, value in model.state_dict().items():
        new = release_name(key)
        if key.startswith(HEADS):
            continue
        if lora and re.search(r"\.(q_proj|v_proj)\.weight$", new) and new.startswith("model.layers"):
            base = new[: -len(".weight")]
            a = torch.randn(8, value.shape[1], generator=gen) * 0.1
            b = torch.randn(value.shape[0], 8, generator=gen) * 0.1
            out[f"base_model.model.{base}.base_layer.weight"] = value - (16 / 8) * (b @ a)
            out[f"base_model.model.{base}.lora_A.default.weight"] = a
            out[f"base_model.model.{base}.lora_B.default.weight"] = b
        else:
            out[new] = value
    return out


def release_router_weights(state: dict[str, torch.Tensor], router: str, e_seg, e_bbox) -> torch.Tensor:
    """The release's gate on cat([e_bbox, e_seg]): sigmoid weights normalised to 1, [w_bbox, w_seg]."""
    p = f"model.{router}.gate."
    x = torch.cat([e_bbox, e_seg], -1)
    hidden = torch.nn.functional.gelu(x @ state[p + "0.weight"].T + state[p + "0.bias"])
    gates = torch.sigmoid(hidden @ state[p + "2.weight"].T + state[p + "2.bias"])
    return gates / gates.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def random_heads():
    """A tiny model whose heads have random, non-trivial weights (the box decoder's last layer too)."""
    model = build_model("tiny", seed=3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.startswith(HEADS):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def test_release_head_names_and_shapes(random_heads):
    release = release_heads(random_heads)
    d = random_heads.seg_router.gate[0].in_features // 2
    assert set(release) == {
        *(
            f"model.router_{r}.gate.{i}.{w}"
            for r in ("seg", "box")
            for i in (0, 2)
            for w in ("weight", "bias")
        ),
        *(f"model.bbox_decoder.layers.{i}.{w}" for i in (0, 1, 2) for w in ("weight", "bias")),
        *(f"model.text_hidden_fcs.0.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")),
    }
    assert release["model.router_seg.gate.0.weight"].shape == (1024, 2 * d)
    assert release["model.router_box.gate.2.weight"].shape == (2, 1024)
    shapes = [tuple(release[f"model.bbox_decoder.layers.{i}.weight"].shape) for i in range(3)]
    assert shapes == [(512, d), (512, 512), (4, 512)]


@pytest.mark.parametrize("via_file", [False, True])
def test_release_converts_to_the_same_tensors_and_heads(random_heads, tmp_path, via_file):
    release = official_layout(random_heads, lora=False)
    write_torch(release, str(tmp_path / "release.pth"))
    source = tmp_path / "release.pth"
    if via_file:
        assert convert_official_file(str(source), str(tmp_path / "converted.pth")) == len(release)
        source = tmp_path / "converted.pth"
    loaded = build_model("tiny", seed=4).eval()
    assert load_official_release(loaded, str(source)) == []
    theirs = loaded.state_dict()
    for key, value in random_heads.state_dict().items():
        assert torch.equal(theirs[key], value), key

    d = random_heads.seg_router.gate[0].in_features // 2
    candidates = torch.randn(5, 2, d, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(random_heads.heads(candidates), loaded.heads(candidates), strict=True):
            assert torch.equal(a, b)
        e_seg, e_bbox = candidates[:, 0], candidates[:, 1]
        for ours, name in (("seg_router", "router_seg"), ("box_router", "router_box")):
            w_bbox, w_seg = release_router_weights(release, name, e_seg, e_bbox).unbind(-1)
            router = getattr(loaded, ours)
            torch.testing.assert_close(router.weights(candidates), torch.stack([w_seg, w_bbox], -1))
            torch.testing.assert_close(router(candidates), w_bbox[:, None] * e_bbox + w_seg[:, None] * e_seg)


def test_lora_wrapped_release_merges_to_the_original_weights(random_heads):
    state = convert_official_state_dict(official_layout(random_heads))
    own = random_heads.state_dict()
    assert set(state) == set(own) and not any(".lora_" in k or "base_layer" in k for k in state)
    for key, value in own.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5)


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
    with pytest.raises(CheckpointError, match="trainable.safetensors.*missing"):
        lora.load_trainable_state_dict(
            load_file(str(root / "trainable.safetensors")), "trainable.safetensors"
        )
