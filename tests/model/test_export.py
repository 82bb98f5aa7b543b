"""`medisee export`: LoRA merged into the LLaVA directory, SAM and heads as safetensors, strict reload."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medisee.artifact.model_dir import load_predictor
from medisee.infer.predictor import Predictor
from medisee.model import build_model
from medisee.model.checkpoint import CheckpointError
from medisee.model.export import export_model, file_digests, load_export
from medisee.model.text import add_candidate_tokens, build_tiny_tokenizer

QUERIES = ["Can you segment and locate the liver in this image?", "Which organ produces bile?"]


def _predict(model, images, queries):
    """Every query on every image, flattened (decoder outputs kept for every query)."""
    results = Predictor(model, early_reject=False).predict_batch(images, [queries] * len(images))
    return sum(results, [])


def assert_same_predictions(a, b, images):
    for x, y in zip(_predict(a, images, QUERIES), _predict(b, images, QUERIES), strict=True):
        assert np.allclose(x.box, y.box, rtol=1e-5, atol=1e-5)
        assert np.allclose(x.similarity, y.similarity, rtol=1e-5, atol=1e-5)
        assert np.array_equal(x.mask, y.mask)


def randomise(model, names=("lora_B",)):
    """Non-zero LoRA B matrices and heads (both start at zero or at a fresh init)."""
    generator = torch.Generator().manual_seed(1)
    heads = ("seg_router", "box_router", "text_projection", "box_decoder")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(heads) or any(n in name for n in names):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 255, (64, 80, 3), dtype=np.uint8),
        rng.integers(0, 255, (80, 64, 3), dtype=np.uint8),
    ]


@pytest.fixture(scope="module")
def lora_model():
    return randomise(build_model("tiny", finetune="lora", seed=0))


@pytest.fixture(scope="module")
def exported(lora_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "out"
    before = {k: v.clone() for k, v in lora_model.state_dict().items()}
    manifest = export_model(lora_model, folder, max_shard_size="1MB")
    after = lora_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return folder, manifest


def test_lora_export_round_trip(lora_model, exported, images):
    folder, manifest = exported
    assert json.loads((folder / "export.json").read_text()) == manifest
    assert manifest["candidate_tokens"] == ["[SEG]", "[BBOX]"]
    assert manifest["candidate_ids"] == list(lora_model.text.candidate_ids)
    assert len(list((folder / "llava").glob("*.safetensors"))) > 1  # sharded
    assert {"sam.safetensors", "heads.safetensors", "llava/config.json", "llava/tokenizer.json"} <= set(
        manifest["files"]
    )
    assert len(manifest["keys"]["llava"]["lora_merged"]) == 4  # q_proj, v_proj of two layers

    loaded = load_export(folder)
    assert_same_predictions(lora_model, loaded, images)
    assert list(loaded.text.candidate_ids) == manifest["candidate_ids"]


def test_exported_llava_holds_the_merged_weights(lora_model, exported):
    folder, _ = exported
    files = {k for f in (folder / "llava").glob("*.safetensors") for k in load_file(str(f))}
    assert not any("lora" in k or "base_layer" in k for k in files)

    original = lora_model.llava.state_dict()
    state = load_export(folder).llava.state_dict()
    expected = {k: v for k, v in original.items() if "lora_" not in k and "base_layer" not in k}
    for key in original:
        if key.endswith(".base_layer.weight"):
            prefix = key.removesuffix(".base_layer.weight")
            a, b = original[f"{prefix}.lora_A.default.weight"], original[f"{prefix}.lora_B.default.weight"]
            expected[f"{prefix}.weight"] = original[key] + (16 / 8) * b @ a
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(state[key], value, atol=1e-6), key
    assert not torch.equal(
        state["model.language_model.layers.0.self_attn.q_proj.weight"],
        original["model.language_model.layers.0.self_attn.q_proj.base_layer.weight"],
    )


def test_full_finetune_round_trip(images, tmp_path):
    model = randomise(build_model("tiny", finetune="full", seed=1), names=("language_model",))
    manifest = export_model(model, tmp_path / "full")
    assert manifest["keys"]["llava"]["lora_merged"] == []
    loaded = load_export(tmp_path / "full")
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    assert_same_predictions(model, loaded, images)


def test_candidate_token_that_is_not_added_fails(lora_model, monkeypatch, tmp_path):
    tokenizer = build_tiny_tokenizer()
    add_candidate_tokens(tokenizer, 1)  # [SEG] added, [BBOX] not
    monkeypatch.setattr(lora_model.text, "tokenizer", tokenizer)
    with pytest.raises(
        CheckpointError, match=r"'\[BBOX\]' encodes to \[.*\]; expected the single added token"
    ):
        export_model(lora_model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def rewrite(folder, name, state):
    """Replace a file and record its new digest, as a deliberate edit would."""
    save_file(state, str(folder / name), metadata={"format": "pt"})
    manifest = json.loads((folder / "export.json").read_text())
    manifest["files"] = file_digests(folder)
    (folder / "export.json").write_text(json.dumps(manifest))


@pytest.fixture
def copy(exported, tmp_path):
    return shutil.copytree(exported[0], tmp_path / "copy")


def test_tampered_file_fails_the_sha256_check(copy):
    data = bytearray((copy / "heads.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "heads.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="heads.safetensors: sha256 differs"):
        load_export(copy)


def test_module_prefixed_sam_file_loads(copy, lora_model):
    sam = load_file(str(copy / "sam.safetensors"))
    rewrite(copy, "sam.safetensors", {f"module.{k}": v for k, v in sam.items()})
    loaded = load_export(copy)
    own = lora_model.sam.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.sam.state_dict().items())


def test_llava_tensor_missing_from_its_shard_is_reported(copy):
    """transformers would initialise it at random with a warning; the export loader refuses."""
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    shard = json.loads((copy / "llava/model.safetensors.index.json").read_text())["weight_map"][key]
    state = load_file(str(copy / "llava" / shard))
    rewrite(copy, f"llava/{shard}", {k: v for k, v in state.items() if k != key})
    with pytest.raises(
        CheckpointError, match=r"missing \(1\): language_model\.model\.layers\.1\.mlp\.up_proj"
    ):
        load_export(copy)


@pytest.mark.parametrize(
    "edit, report",
    [
        (lambda s: {**s, "box_decoder.extra": torch.zeros(2)}, r"unexpected \(1\): box_decoder\.extra"),
        (
            lambda s: {k: v for k, v in s.items() if k != "seg_router.gate.0.bias"},
            r"missing \(1\): seg_router",
        ),
        (
            lambda s: {**s, "text_projection.fc2.bias": torch.zeros(3)},
            r"shape mismatch \(1\): text_projection",
        ),
    ],
)
def test_heads_key_report(copy, edit, report):
    rewrite(copy, "heads.safetensors", edit(load_file(str(copy / "heads.safetensors"))))
    with pytest.raises(CheckpointError, match=report):
        load_export(copy)


def test_cli_export_of_an_artifact_answers_like_the_artifact(tmp_path):
    """`medisee export --model <artifact>`: the export loads back with the artifact's predictions."""
    from typer.testing import CliRunner

    from medisee.artifact.model_dir import save_model_dir
    from medisee.cli import app
    from medisee.config import load_config
    from medisee.infer import Predictor
    from medisee.model.build import build_from_config

    cfg = load_config("tiny", ["trainer.finetune=lora"])
    model = build_from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_model_dir(model, cfg, tmp_path / "artifact")
    result = CliRunner().invoke(
        app, ["export", "--model", str(tmp_path / "artifact"), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    image = np.random.default_rng(5).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    queries = ["Can you segment and locate the liver in this image?"]
    expected = load_predictor(str(tmp_path / "artifact"), early_reject=False).predict(image, queries)
    got = Predictor(load_export(tmp_path / "out"), early_reject=False).predict(image, queries)
    for a, b in zip(expected, got, strict=True):
        assert np.array_equal(a.mask, b.mask) and np.allclose(a.box, b.box, atol=1e-4)
