"""The memory plan: exact parameter counts, and the activation formula against what autograd saves."""

from __future__ import annotations

import pytest
import torch

from medisee.model.plan import GPU_SIZES_GIB, Setup, count_parameters, lm_layer_activation_bytes, plan

MISTRAL_7B_PARAMETERS = 7_241_732_096  # Mistral-7B-v0.1 as published (embeddings and LM head included)
CLIP_VIT_L_336_PARAMETERS = 303_507_456  # openai/clip-vit-large-patch14-336 vision tower


def saved_activation_bytes(layer, tokens: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one forward of `layer`."""
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    weights = {p.data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    x = torch.randn(1, tokens, hidden, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rotary = MistralRotaryEmbedding(layer.self_attn.config)(x, positions)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_activation_formula_equals_what_a_real_mistral_layer_saves(dtype):
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    hidden, intermediate, heads, kv_heads, tokens = 256, 896, 8, 2, 48  # 7B's ratios, small widths
    config = MistralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    config._attn_implementation = "sdpa"
    layer = MistralDecoderLayer(config, 0).to(dtype)
    measured = saved_activation_bytes(layer, tokens, hidden, dtype)
    estimated = lm_layer_activation_bytes(hidden, intermediate, kv_heads, heads, tokens, dtype.itemsize)
    assert estimated == pytest.approx(measured, rel=0.02)


def test_7b_parameter_counts_match_the_published_models():
    counts = count_parameters("medisee-7b", finetune=None)
    assert counts.lm_linear + counts.lm_other == MISTRAL_7B_PARAMETERS
    assert counts.vocab == 32000
    assert counts.encoders > CLIP_VIT_L_336_PARAMETERS  # plus the projector and SAM's image encoder
    assert counts.trainable == 0


def test_tiny_counts_equal_the_built_model():
    from medisee.model.build import build_model

    model = build_model("tiny", finetune="lora")
    counts = count_parameters("tiny", finetune="lora")
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_plan_orders_the_profiles_as_their_memory_must():
    lora = plan(Setup("medisee-7b", "lora", batch_size=4))
    qlora = plan(Setup("medisee-7b", "lora", quantize="nf4", batch_size=4))
    no_checkpointing = plan(Setup("medisee-7b", "lora", batch_size=4, gradient_checkpointing=False))
    full_1 = plan(Setup("medisee-7b", "full", "fsdp", workers=1, batch_size=2))
    full_8 = plan(Setup("medisee-7b", "full", "fsdp", workers=8, batch_size=2))

    assert qlora.weights_gib < lora.weights_gib / 3  # 4-bit LM linear weights
    assert qlora.trainable_state_gib == lora.trainable_state_gib
    assert no_checkpointing.activations_gib_per_sample > 5 * lora.activations_gib_per_sample
    assert full_1.trainable_state_gib == pytest.approx(8 * full_8.trainable_state_gib)
    assert full_1.verdicts()["80 GB"] == "does not fit"  # ~16 bytes per LM parameter: ~108 GiB
    assert qlora.verdicts()["24 GB"] == "fits"


def test_largest_batch_is_the_last_that_fits():
    memory = plan(Setup("medisee-7b", "lora", batch_size=1))
    for size in GPU_SIZES_GIB.values():
        batch = memory.largest_batch(size)
        assert batch == 0 or memory.total_gib(batch) <= size
        assert memory.total_gib(batch + 1) > size


def test_plan_command_reports_the_presets_setup():
    import json

    from typer.testing import CliRunner

    from medisee.cli import app

    result = CliRunner().invoke(app, ["plan", "-c", "medisee-7b-full"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["setup"] == {
        **report["setup"],
        "finetune": "full",
        "strategy": "fsdp",
        "workers": 8,
        "precision": "bf16",
    }
    expected = plan(Setup(**report["setup"]))
    assert report["total_gib"] == round(expected.total_gib(), 2)
    assert report["verdicts"] == expected.verdicts()


def test_the_24gb_profile_plans_to_fit_under_22_gb():
    import json

    from typer.testing import CliRunner

    from medisee.cli import app

    train = json.loads(CliRunner().invoke(app, ["plan", "-c", "medisee-7b-24gb"]).output)
    assert train["setup"] == {
        **train["setup"],
        "quantize": "nf4",
        "precision": "bf16",
        "gradient_checkpointing": True,
        "image_cache_gib": 1.0,
    }
    assert train["verdicts"]["24 GB"] == "fits" and train["total_gib"] * 1024**3 < 22e9  # the 22 GB
    assert train["largest_batch"]["24 GB"] >= train["setup"]["batch_size"]
    serve = json.loads(CliRunner().invoke(app, ["plan", "-c", "medisee-7b-24gb", "--inference"]).output)
    assert serve["setup"]["finetune"] is None and serve["setup"]["precision"] == "bf16"
    assert serve["verdicts"]["24 GB"] == "fits"
    lora_80 = json.loads(CliRunner().invoke(app, ["plan", "-c", "medisee-7b"]).output)
    assert lora_80["verdicts"] == {**lora_80["verdicts"], "24 GB": "does not fit", "80 GB": "fits"}
