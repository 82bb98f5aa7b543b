"""A QLoRA-trained model keeps its profile: its artifact loads with the LM in NF4 again, and its golden
pair (answered at save time by the reloaded, quantized model) holds on load."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from medisee.artifact.golden import check_golden
from medisee.artifact.model_dir import load_model_dir, load_predictor, save_model_dir
from medisee.config import load_config
from medisee.model.build import build_from_config
from medisee.model.quantize import is_quantized, lm_linear_layers


def test_a_quantized_artifact_loads_quantized_and_answers_as_saved(tmp_path):
    cfg = load_config("tiny", ["model.quantize=nf4", "trainer.finetune=lora"])
    model = build_from_config(cfg, training=True, precision="bf16")
    plain = [name for name in lm_linear_layers(model.llava) if "lora_" not in name]
    assert is_quantized(model.llava) and plain == []  # every LM projection in 4 bits, LoRA over them
    save_model_dir(model, cfg, tmp_path / "artifact")

    loaded = load_model_dir(tmp_path / "artifact")
    layers = loaded.model.llava.model.language_model.layers
    assert isinstance(layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert layers[0].mlp.up_proj.weight.dtype == torch.uint8
    for name, value in model.trainable_state_dict().items():  # LoRA, heads, mask decoder as trained
        assert torch.equal(loaded.model.state_dict()[name].cpu(), value), name

    predictor = load_predictor(str(tmp_path / "artifact"))
    assert check_golden(predictor, tmp_path / "artifact")["ok"]  # raises GoldenMismatch otherwise


def test_quantized_weights_cannot_be_fully_fine_tuned():
    import pytest

    from medisee.config import ConfigError

    with pytest.raises(ConfigError, match="finetune=lora"):
        load_config("tiny", ["model.quantize=nf4", "trainer.finetune=full"])
