"""Precision, 4-bit weights and the sync-free step, on CPU with the tiny preset and real reader batches.

CPU autocast runs bf16 and fp16 as CUDA does, and bitsandbytes quantizes to NF4 on CPU too, so every
path the GPU profiles take runs here; the speed of them is measured on a GPU (benchmarks/gpu.py).
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch

from medisee.data.batch import collate
from medisee.model import build_model
from medisee.model.plan import GIB, Setup, plan
from medisee.model.precision import resolve_precision
from medisee.train.step import as_numbers, loss_scaler, train_step
from tests.train.batches import phantom_rows, reader_batch


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return phantom_rows(tmp_path_factory.mktemp("precision"))


def tiny(**options):
    return build_model("tiny", finetune="lora", seed=0, **options)


def batch_for(model, rows, count: int = 6):
    mixed = [r for r in rows if r["query_kind"] == "false_query"][:1] + [r for r in rows if r["box"]][
        : count - 1
    ]
    return collate(reader_batch(mixed, model.sam_size, model.clip_size), model.text)


def one_step(model, batch, scaler=None) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    return train_step(model, model, optimizer, None, [batch], grad_clip=1.0, scaler=scaler)


def test_auto_precision_follows_the_device(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_precision("auto", "cuda") == "fp16"
    assert loss_scaler("fp16", "cpu") is not None and loss_scaler("bf16", "cpu") is None
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_bf16_holds_frozen_weights_in_bf16_and_trains_fp32_masters(rows):
    model = tiny(compute_dtype=torch.bfloat16, cast_frozen=True)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {dtypes[n] for n in trainable} == {torch.float32}
    frozen_llava = {dtypes[n] for n in dtypes if n.startswith("llava.") and n not in trainable}
    assert frozen_llava == {torch.bfloat16}
    assert {dtypes[n] for n in dtypes if n.startswith("sam.")} == {torch.float32}

    reference = tiny()
    batch = batch_for(model, rows)
    with torch.no_grad():
        low, full = model.eval()(batch), reference.eval()(batch)
    assert low["loss"].dtype == torch.float32 and torch.isfinite(low["loss"])
    assert float(low["ce"]) == pytest.approx(float(full["ce"]), rel=0.05)
    assert float(low["dice"]) == pytest.approx(float(full["dice"]), rel=0.05)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = one_step(model, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_" in n for n in changed) and any("mask_decoder" in n for n in changed)


def test_fp16_scales_the_loss_and_skips_a_step_that_overflowed(rows):
    model = tiny(compute_dtype=torch.float16, cast_frozen=True)
    batch = batch_for(model, rows)
    scaler = loss_scaler("fp16", "cpu")
    losses = one_step(model, batch, scaler)
    assert all(torch.isfinite(v) for v in losses.values())
    assert scaler.get_scale() == 2.0**16  # no overflow: the scale stays

    lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
    before = lora.detach().clone()
    hook = lora.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    one_step(model, batch, scaler)
    hook.remove()
    assert torch.equal(lora, before), "a step with infinite gradients must not move the weights"
    assert scaler.get_scale() == 2.0**15  # and the scale backs off


def test_nf4_quantizes_the_lm_layers_and_lora_trains_over_them(rows):
    import bitsandbytes as bnb

    plain = tiny(compute_dtype=torch.bfloat16, cast_frozen=True)
    quantized = tiny(compute_dtype=torch.bfloat16, cast_frozen=True, quantize="nf4")
    layers = quantized.llava.model.language_model.layers
    kinds = {
        type(m).__name__ for m in layers.modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))
    }
    assert "Linear4bit" in kinds
    q_proj = layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.dtype == torch.uint8
    assert isinstance(layers[0].mlp.down_proj, bnb.nn.Linear4bit)

    batch = batch_for(plain, rows)
    with torch.no_grad():
        a, b = plain.eval()(batch), quantized.eval()(batch)
    assert float(b["ce"]) == pytest.approx(float(a["ce"]), rel=0.05)  # 4-bit weights, nearly the same LM

    losses = one_step(quantized, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for n, p in quantized.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("setup", [{"quantize": "none"}, {"quantize": "nf4"}], ids=["bf16", "nf4"])
def test_the_plans_weight_bytes_are_what_the_built_model_holds(setup):
    """The plan's weights term against the bytes of every frozen tensor of a real build (NF4 block
    scales included): the arithmetic the 7B figures rest on, checked on the tiny shapes."""
    model = tiny(compute_dtype=torch.bfloat16, cast_frozen=True, **setup)
    held = 0
    for param in model.parameters():
        if not param.requires_grad:
            held += param.numel() * param.element_size()
            state = getattr(param, "quant_state", None)
            if state is not None:
                held += state.absmax.numel() * state.absmax.element_size()
                if state.state2 is not None:
                    held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    estimated = plan(Setup("tiny", "lora", precision="bf16", **setup)).weights_gib * GIB
    assert estimated == pytest.approx(held, rel=0.02)


def test_the_step_never_reads_a_device_value(rows):
    """No .item(), float(), bool() or .tolist() on a tensor in our step: each would make the host wait
    for the GPU. The optimiser's CPU step counters and transformers' padding-mask check are not ours."""
    model = tiny()
    batch = batch_for(model, rows)
    one_step(model, batch)  # warm
    ours = []
    originals = {}

    def spy(name):
        original = getattr(torch.Tensor, name)
        originals[name] = original

        def call(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "/medisee/" in caller:
                ours.append((name, traceback.format_stack(limit=3)[0]))
            return original(self, *args, **kwargs)

        return call

    names = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__"]
    try:
        for name in names:
            setattr(torch.Tensor, name, spy(name))
        losses = one_step(model, batch)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    assert ours == []
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in losses.values())
    numbers = as_numbers(losses | {"lr": 0.1})
    assert list(numbers) == [*losses, "lr"] and all(isinstance(v, float) for v in numbers.values())


def test_masked_target_losses_equal_the_losses_of_the_target_rows_alone(rows):
    """Every row is decoded and the non-target rows weighted out: the same numbers as a batch of the
    target rows only."""
    model = tiny().eval()
    with_targets = [r for r in rows if r["box"]][:4]
    false = [r for r in rows if r["query_kind"] == "false_query"][:2]
    mixed = collate(reader_batch(false + with_targets, model.sam_size, model.clip_size), model.text)
    only = collate(reader_batch(with_targets, model.sam_size, model.clip_size), model.text)
    with torch.no_grad():
        a, b = model(mixed), model(only)
    for key in ("bce", "dice", "box_l1", "box_giou"):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), key
    only_false = collate(reader_batch(false, model.sam_size, model.clip_size), model.text)
    with torch.no_grad():
        none = model(only_false)
    assert float(none["bce"]) == 0.0 and float(none["box_giou"]) == 0.0


def test_language_model_uses_fused_attention():
    model = tiny()
    assert model.llava.config.text_config._attn_implementation == "sdpa"


def test_compiled_layers_give_the_eager_losses(rows):
    """Dynamo traces every LM layer and AOT autograd runs the graphs; inductor's kernels (a minute of
    C++ compilation on this CPU) are measured on a GPU by benchmarks/gpu.py instead."""
    from medisee.model.build import compile_language_model

    eager = tiny().eval()
    compiled = copy.deepcopy(eager)
    assert compile_language_model(compiled, "aot_eager") == len(compiled.llava.model.language_model.layers)
    batch = batch_for(eager, rows)
    with torch.no_grad():
        a, b = eager(batch), compiled(batch)
    for key in ("ce", "dice", "box_l1"):
        assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4), key
