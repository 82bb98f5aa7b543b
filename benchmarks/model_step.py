"""Model step benchmark.

CPU: tiny preset forward+backward samples/s (LoRA recipe) at batch 2 and 8.
Formula: FLOPs per training / inference sample for the medisee-7b architecture
(LLaVA-Med-v1.5-Mistral-7B + CLIP-L/336 + MedSAM ViT-B at 1024).
Last line: {"name": "model_step_tiny_cpu", "value": samples/s at batch 8, "unit": "samples/s", "target": null}
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def transformer_flops(params: float, tokens: int, layers: int, width: int) -> float:
    """Forward FLOPs of a transformer: 2·N·T for the weights + 4·L·T²·d for attention scores and values."""
    return 2 * params * tokens + 4 * layers * tokens * tokens * width


def flops_7b(text_tokens: int = 64) -> dict:
    from medisee.model.mllm import LLAVA_MED_MISTRAL_7B as m

    lm_params = (
        m.layers
        * (
            2 * m.hidden * m.hidden  # q, o
            + 2 * m.hidden * (m.hidden // m.heads * m.kv_heads)  # k, v (grouped-query)
            + 3 * m.hidden * m.intermediate  # gate, up, down
        )
        + 2 * 32000 * m.hidden
    )
    image_tokens = m.num_image_tokens
    seq = image_tokens + text_tokens
    clip_params = m.vision_layers * (4 * m.vision_hidden**2 + 2 * m.vision_hidden * m.vision_intermediate)
    clip = transformer_flops(clip_params, image_tokens + 1, m.vision_layers, m.vision_hidden)
    lm_fwd = transformer_flops(lm_params, seq, m.layers, m.hidden)
    sam_params = 12 * (4 * 768**2 + 2 * 768 * 3072)
    # ViT-B at 1024: 64x64 tokens, windowed (14x14) attention in 8 blocks, global in 4
    sam_tokens = 64 * 64
    sam = 2 * sam_params * sam_tokens + 4 * 4 * sam_tokens**2 * 768 + 4 * 8 * sam_tokens * 196 * 768
    projector = 2 * image_tokens * (m.vision_hidden * m.hidden + m.hidden * m.hidden)
    # LoRA training: frozen towers forward only; LM forward + backward through activations (≈2x forward),
    # weight gradients only for the small adapters, embeddings and heads (neglected).
    train = clip + projector + sam + 3 * lm_fwd
    full_train = clip + projector + sam + 3 * lm_fwd + lm_fwd  # + weight gradients of the LM
    infer = clip + projector + sam + lm_fwd
    return {
        "lm_params_b": round(lm_params / 1e9, 2),
        "seq_len": seq,
        "train_lora_tflop_per_sample": round(train / 1e12, 2),
        "train_full_tflop_per_sample": round(full_train / 1e12, 2),
        "inference_tflop_per_sample": round(infer / 1e12, 2),
        "h100_bf16_dense_peak_tflops": 989,
    }


def reader_batch(batch_size: int, sam_size: int, clip_size: int) -> dict[str, np.ndarray]:
    """A synthetic reader batch (medisee.data.batch.READER_FIELDS), one conversation per image."""
    from medisee.data.batch import READER_FIELDS, pack_masks

    rng = np.random.default_rng(0)
    s, c, n = sam_size, clip_size, batch_size
    batch = {
        "sam_image": rng.integers(0, 255, (n, s, s, 3), dtype=np.uint8),
        "clip_image": rng.integers(0, 255, (n, c, c, 3), dtype=np.uint8),
        "mask_bits": pack_masks(rng.random((n, s, s)) > 0.8),
        "box_sam": np.array([[10, 10, 60, 70]] * n, np.float32),
        "has_target": np.ones(n, bool),
        "resized_hw": np.array([[s, s]] * n, np.int32),
        "original_hw": np.array([[s, s]] * n, np.int32),
        "record_id": np.array([f"r{i}" for i in range(n)], object),
        "image_id": np.array([f"i{i}" for i in range(n)], object),
        "query": np.array(["Can you segment the liver in this image?"] * n, object),
        "answer": np.array(["Sure, it is [SEG] and [BBOX]."] * n, object),
        "query_kind": np.array(["referring"] * n, object),
        "class_name": np.array(["liver"] * n, object),
        "modality": np.array(["CT"] * n, object),
    }
    assert batch.keys() == READER_FIELDS.keys()
    return batch


def bench_tiny(batch_size: int, steps: int) -> float:
    from medisee.data.batch import collate
    from medisee.model import build_model
    from medisee.train.step import train_step

    model = build_model("tiny", finetune="lora")
    model.train()
    batch = collate(reader_batch(batch_size, model.sam_size, model.clip_size), model.text)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(3):  # warm-up
        train_step(model, model, opt, None, [batch], grad_clip=1.0)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, model, opt, None, [batch], grad_clip=1.0)
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {f"tiny_cpu_batch{b}_samples_s": round(bench_tiny(b, args.steps), 1) for b in (2, 8)}
    results["torch_threads"] = torch.get_num_threads()
    results.update(flops_7b())
    print(json.dumps(results), file=sys.stderr)
    print(
        json.dumps(
            {
                "name": "model_step_tiny_cpu",
                "value": results["tiny_cpu_batch8_samples_s"],
                "unit": "samples/s",
                "target": None,
            }
        )
    )


if __name__ == "__main__":
    main()
