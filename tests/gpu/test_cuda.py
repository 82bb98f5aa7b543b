"""The training step and the Predictor on a CUDA device, against the same computations on the CPU.

Tiny preset, real reader batches from phantom shards, the code paths training and serving run. Never in
CI: run on a machine with a GPU (`pytest -q -s tests/gpu`), or dry-run the logic on CPU with
MEDISEE_GPU_TESTS_ON=cpu (see conftest.py).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from medisee.data.batch import TrainingBatch, collate
from medisee.data.codec import decode_image
from medisee.infer import Predictor
from medisee.model import build_model
from medisee.model.medisee import MediSee
from medisee.model.quantize import is_quantized
from medisee.train.embedding_cache import ImageEmbeddingCache
from medisee.train.step import as_numbers, loss_scaler, train_step
from medisee.verify.calibrate import CalibratedVerifier
from tests.infer.test_predictor import token_chain_model
from tests.train.batches import phantom_rows, reader_batch

pytestmark = pytest.mark.gpu

LOSSES = ("ce", "bce", "dice", "box_l1", "box_giou", "loss")


# ----- models, batches, steps --------------------------------------------------------------------
@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    return phantom_rows(tmp_path_factory.mktemp("gpu"), images=4)


def tiny(device: torch.device, **options) -> MediSee:
    """The tiny preset built as the recipe builds it (on `device`, then moved there). No LoRA dropout:
    two builds with the same seed then compute the same function on any device."""
    model = build_model("tiny", finetune="lora", lora_dropout=0.0, seed=0, device=device, **options)
    return model.to(device)


def by_image(rows: list[dict]) -> list[list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["image_id"], []).append(row)
    return list(grouped.values())


def batch_on(model: MediSee, rows: list[dict]) -> TrainingBatch:
    """A false query and three rows with targets from each of two images, on the model's device."""
    first, second = by_image(rows)[:2]
    chosen = [r for r in first if r["query_kind"] == "false_query"][:1]
    chosen += [r for r in first if r["box"]][:3] + [r for r in second if r["box"]][:3]
    return collate(reader_batch(chosen, model.sam_size, model.clip_size), model.text, model.device)


def trainable(model: MediSee) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adamw(model: MediSee) -> torch.optim.AdamW:
    """The recipe's optimiser: one fused kernel on CUDA, the foreach path elsewhere."""
    fused = model.device.type == "cuda"
    params = list(trainable(model).values())
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), foreach=not fused, fused=fused)


def step(model: MediSee, batch: TrainingBatch, optimizer, scaler=None) -> dict[str, torch.Tensor]:
    model.train()
    return train_step(model, model, optimizer, None, [batch], grad_clip=1.0, scaler=scaler)


def snapshot(model: MediSee) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainable(model).items()}


def moved(model: MediSee, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in trainable(model).items() if not torch.equal(p, before[name])}


def all_finite(numbers: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in numbers.values())


@dataclass
class Stepped:
    """One fp32 step, read back on the CPU."""

    losses: dict[str, float]  # the step's losses and grad_norm
    weights: dict[str, torch.Tensor]  # trainable weights after the step
    grads: dict[str, torch.Tensor]
    moved: set[str]  # trainable weights the step changed


def fp32_step(device: torch.device, rows: list[dict]) -> Stepped:
    model = tiny(device, compute_dtype=torch.float32)
    before = snapshot(model)
    # SGD: its update is linear in the gradient. AdamW's first update is lr·sign(g), which flips on
    # rounding noise wherever a gradient is near zero, so its weights would not compare across devices.
    optimizer = torch.optim.SGD(list(trainable(model).values()), lr=0.1)
    losses = as_numbers(step(model, batch_on(model, rows), optimizer))
    return Stepped(
        losses,
        {name: p.detach().cpu() for name, p in trainable(model).items()},
        {name: p.grad.cpu() for name, p in trainable(model).items() if p.grad is not None},
        moved(model, before),
    )


@pytest.fixture(scope="module")
def fp32_steps(device, reference, rows) -> tuple[Stepped, Stepped]:
    """The same step (same seed, same batch) on the device and on the reference CPU."""
    return fp32_step(device, rows), fp32_step(reference, rows)


# ----- training step ----------------------------------------------------------------------------
def test_an_fp32_step_on_the_device_equals_the_step_on_cpu(fp32_steps):
    on_device, on_cpu = fp32_steps
    for key in (*LOSSES, "grad_norm"):
        assert on_device.losses[key] == pytest.approx(on_cpu.losses[key], rel=1e-3, abs=1e-6), key
    assert on_device.moved == on_cpu.moved
    assert any("lora_B" in n for n in on_cpu.moved) and any("mask_decoder" in n for n in on_cpu.moved)
    assert on_device.grads.keys() == on_cpu.grads.keys()
    for name, grad in on_cpu.grads.items():
        torch.testing.assert_close(on_device.grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    for name, weight in on_cpu.weights.items():
        torch.testing.assert_close(on_device.weights[name], weight, rtol=0.0, atol=1e-4, msg=name)


def test_a_bf16_step_is_finite_keeps_fp32_masters_and_is_near_the_fp32_step(device, rows, fp32_steps):
    model = tiny(device, compute_dtype=torch.bfloat16, cast_frozen=True)
    frozen_llava = {p.dtype for n, p in model.llava.named_parameters() if not p.requires_grad}
    assert frozen_llava == {torch.bfloat16}  # held in bf16 on the device, as built
    before = snapshot(model)
    losses = as_numbers(step(model, batch_on(model, rows), adamw(model)))
    assert all_finite(losses), losses
    assert {p.dtype for p in trainable(model).values()} == {torch.float32}
    changed = moved(model, before)
    assert any("lora_" in n for n in changed) and any("mask_decoder" in n for n in changed)
    fp32 = fp32_steps[0].losses
    for key in LOSSES:
        assert losses[key] == pytest.approx(fp32[key], rel=0.05), key


def test_an_nf4_step_is_finite_and_trains_the_lora_weights(device, rows, fp32_steps):
    model = tiny(device, quantize="nf4", compute_dtype=torch.bfloat16, cast_frozen=True)
    assert is_quantized(model.llava)
    q_proj = model.llava.model.language_model.layers[0].self_attn.q_proj.base_layer
    assert q_proj.weight.device.type == device.type and q_proj.weight.dtype == torch.uint8
    losses = as_numbers(step(model, batch_on(model, rows), adamw(model)))
    assert all_finite(losses), losses
    grads = {n: p.grad for n, p in trainable(model).items() if "lora_" in n}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(bool(g.abs().sum() > 0) for n, g in grads.items() if "lora_B" in n)
    assert losses["ce"] == pytest.approx(fp32_steps[0].losses["ce"], rel=0.05)  # 4-bit, nearly the same LM


def test_fp16_steps_with_the_loss_scaler_stay_finite(device, rows):
    model = tiny(device, compute_dtype=torch.float16, cast_frozen=True)
    scaler = loss_scaler("fp16", device)
    assert scaler is not None
    batch, optimizer = batch_on(model, rows), adamw(model)
    before = snapshot(model)
    for _ in range(3):
        losses = as_numbers(step(model, batch, optimizer, scaler))
        assert all_finite(losses), losses
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() >= 1.0
    assert moved(model, before), "every step was skipped as overflowed"
    assert all(torch.isfinite(p).all() for p in trainable(model).values())


# ----- host syncs -------------------------------------------------------------------------------
# Where a training step makes the host wait for the GPU, outside our code, per occurrence:
KNOWN_SYNCS = {
    # transformers' SDPA causal-mask shortcut (`_ignore_causal_mask_sdpa`) reads whether the padding mask
    # is all ones: once per LM forward, twice when the batch is padded
    "transformers/masking_utils.py": "up to two per LM forward",
    # segment-anything indexes the device's relative-position table with a CPU index tensor (a blocking
    # copy): twice per image-encoder block (height and width)
    "segment_anything/modeling/image_encoder.py": "two per SAM image-encoder block",
}


def test_a_step_waits_for_the_gpu_only_at_known_third_party_places(device, rows):
    """CUDA's sync debug mode warns at every synchronising call: blocking copies either way, .item(),
    nonzero, stream syncs. Warnings raised in backward are replayed at the `backward()` line of step.py."""
    if device.type != "cuda":
        pytest.skip("CUDA's sync debug mode needs a CUDA device (nothing to check in a CPU dry run)")
    # the recipe's GPU setup: bf16 autocast, frozen MLLM weights held in bf16
    model = tiny(device, compute_dtype=torch.bfloat16, cast_frozen=True)
    batch, optimizer = batch_on(model, rows), adamw(model)
    step(model, batch, optimizer)  # warm: lazy set-up (optimiser state, library handles) is not a step's
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(model, batch, optimizer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    print(f"\nhost syncs in one training step: {len(sites)}")
    for site in sorted(set(sites)):
        print(f"  {sites.count(site)} x {site}")
    unknown = [s for s in sites if not any(known in s for known in KNOWN_SYNCS)]
    assert unknown == [], f"a step waits for the GPU at {sorted(set(unknown))}"
    blocks = len(model.sam.image_encoder.blocks)
    assert len(sites) <= 2 + 2 * blocks, sites


# ----- embedding cache --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.bfloat16,
    ],
    ids=["fp32", "bf16"],
)
def test_cached_image_embeddings_give_the_uncached_losses(device, rows, dtype):
    model = tiny(device, compute_dtype=dtype, cast_frozen=True).eval()
    batch = batch_on(model, rows)
    cache = ImageEmbeddingCache(1.0)
    with torch.no_grad():
        plain = as_numbers(model(batch))
        computed = as_numbers(model(cache.attach(model, batch)))
        cached = as_numbers(model(cache.attach(model, batch)))
    images = len(batch.image_keys)
    assert images == 2 and (cache.misses, cache.hits) == (images, images)
    assert {e.device.type for e in cache.entries.values()} == {device.type}
    for key in plain:
        assert computed[key] == pytest.approx(plain[key], abs=1e-5), key
        assert cached[key] == pytest.approx(plain[key], abs=1e-5), key


# ----- predictions ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images_and_queries(rows) -> tuple[list[np.ndarray], list[list[str]]]:
    """Three phantom images, each with two of its queries and its false query."""
    chosen = by_image(rows)[:3]
    images = [decode_image(image_rows[0]["image_png"]) for image_rows in chosen]
    queries = [
        [r["query"] for r in image_rows if r["box"]][:2]
        + [r["query"] for r in image_rows if r["query_kind"] == "false_query"][:1]
        for image_rows in chosen
    ]
    return images, queries


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_same_results(got, expected) -> None:
    for got_image, expected_image in zip(got, expected, strict=True):
        for g, e in zip(got_image, expected_image, strict=True):
            assert (g.answer, g.found) == (e.answer, e.found)
            for score in ("strength", "compactness", "purity", "mask_score", "iou_score", "area_fraction"):
                a, b = getattr(g, score), getattr(e, score)
                assert (a is None) == (b is None) and (b is None or a == pytest.approx(b, abs=2e-3)), score
            assert (g.similarity is None) == (e.similarity is None)
            if e.similarity is not None:
                np.testing.assert_allclose(g.similarity, e.similarity, rtol=1e-3, atol=1e-3)
            assert (g.box is None) == (e.box is None)
            if e.box is not None:
                np.testing.assert_allclose(g.box, e.box, atol=1.0)
                assert g.mask.shape == e.mask.shape and mask_iou(g.mask, e.mask) > 0.98


def answering_model() -> MediSee:
    """A tiny model whose greedy answer holds both candidate tokens, so generate mode decodes too."""
    return token_chain_model(["[SEG]", "and", "[BBOX]", ".", "</s>"])


@pytest.mark.parametrize("mode", ["teacher_forced", "generate"])
def test_predictions_on_the_device_equal_the_predictions_on_cpu(device, reference, images_and_queries, mode):
    images, queries = images_and_queries
    model = answering_model() if mode == "generate" else build_model("tiny", seed=0).eval()
    model.compute_dtype = torch.float32  # the default on CUDA is bf16, which would not compare

    def predictor(on: torch.device) -> Predictor:
        placed = copy.deepcopy(model).to(on)
        return Predictor(placed, CalibratedVerifier(), mode=mode, max_new_tokens=8, early_reject=False)

    expected = predictor(reference).predict_batch(images, queries)
    got = predictor(device).predict_batch(images, queries)
    assert sum(r.box is not None for per_image in expected for r in per_image) >= 3  # the decoder ran
    assert_same_results(got, expected)
