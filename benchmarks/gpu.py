"""GPU benchmark: every GPU figure of the platform side by side, in one run on one device.

The model has the true medisee-7b shapes (LLaVA-Med-v1.5-Mistral-7B + CLIP-L/336 + SAM ViT-B at 1024)
with random weights (`build_model("medisee-7b", random_weights=True)`): speed and memory do not depend
on the values of the weights, and nothing has to be downloaded. The batches are synthetic reader
batches (benchmarks/model_step.py `reader_batch`) collated as the recipe collates them.

Training (`--only train`), each setup through `medisee.train.step.train_step`, AdamW (fused on CUDA),
gradient checkpointing, bf16 compute, at the largest per-GPU batch that fits (CUDA: start from the
memory plan's `largest_batch` for the device's memory, halve on out-of-memory; CPU: batch 2):
  gpu_lora_bf16_train            LoRA, frozen MLLM weights held in bf16 (the medisee-7b profile)
  gpu_lora_bf16_compiled_train   the same model with `compile_language_model`, steps alternated with
  gpu_lora_bf16_compile_speedup  eager ones (`torch.compiler.set_stance("force_eager")`) at one batch
                                 (at most --compile-batch, 32: the ratio hardly depends on it)
  gpu_lora_nf4_train             QLoRA: the LM's linear layers in NF4 (the medisee-7b-24gb profile)
  gpu_lora_nf4_peak_mem          its peak memory at the 24 GB profile's batch, in GB (target: under 22 GB)
  gpu_full_fsdp_train            full fine-tune of the LM under FSDP2 on one rank (medisee-7b-full);
                                 frozen weights not cast (the recipe's FSDP setting). Needs ~124 GiB
                                 by the plan: on an 80 GB GPU it reports value null ("does not fit").
  samples/s = batch × timed steps / seconds between two `torch.cuda.synchronize()` around the
  timed steps (after the warm-up steps);
  MFU = samples/s × model FLOPs per sample / the device's dense bf16 peak FLOP/s. Model FLOPs from
  `flops_7b(text_tokens)` (LoRA: frozen towers forward + 3 LM forwards; full: + the LM's weight
  gradients; the recomputation of gradient checkpointing is not counted). Peak from PEAK_BF16_FLOPS by
  `torch.cuda.get_device_name()`; null for an unknown device, the CPU or the tiny preset.
  peak_mem_gib: `torch.cuda.max_memory_allocated` (reset before each setup) next to `plan_gib`, the
  estimate of `medisee.model.plan` for the same setup and batch; peak_reserved_gib: what the caching
  allocator held. On CPU: the process's max RSS so far.

Inference (`--only infer`), the MLLM in bf16 (frozen weights held in bf16, SAM in fp32), eval mode:
  gpu_infer_teacher_forced_batch{1,8,32}  MLLMStage, teacher-forced (target 30 samples/s at 32)
  gpu_infer_generate_batch{1,8,32}        MLLMStage, greedy generation of 32 new tokens
  gpu_infer_decoder_batch{8,32}           DecoderStage on the MLLM stage's candidate states
  gpu_predictor_p50_latency               Predictor.predict(one image, one query), median ms
  samples/s = images (one query each) per call / median seconds of a call.

Output: one JSON object per figure on stdout (name, value, unit, target and context: batch,
peak_mem_gib, plan_gib, precision, device...), progress on stderr. The last line is the headline
{"name": "gpu_lora_bf16_train", "value": <samples/s>, "unit": "samples/s", "target": 16, ...}
(with `--only infer`: gpu_infer_teacher_forced_batch32). A figure that failed has value null and an
"error"; the exit code is 1 when one failed for another reason than not fitting in memory.

    python benchmarks/gpu.py --only train        # on one GPU, each half meant for one 10-minute call
    python benchmarks/gpu.py --only infer
    python benchmarks/gpu.py --only lora-bf16,compile     # or single setups: lora-nf4, full-fsdp
    python benchmarks/gpu.py --preset tiny --device cpu --quick    # a smoke run without a GPU
Timed steps: --steps (default 5) after --warmup (default 2); --quick: 1 and 1, fewer inference calls.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import re
import resource
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from model_step import flops_7b, reader_batch  # noqa: E402

GIB = 1024**3
# Dense bf16 tensor-core peak FLOP/s by device name, first match wins (A100 before A10, L40S before L4).
PEAK_BF16_FLOPS = [
    (r"H100.*PCIe", 756e12),
    (r"H100", 989e12),
    (r"H200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bA10\b", 125e12),
    (r"\bL4\b", 121e12),
    (r"RTX 4090", 165e12),
]
HEADLINE = "gpu_lora_bf16_train"
TRAIN_TARGET = 16  # samples/s, LoRA bf16 on one H100
TEACHER_FORCED_TARGET = 30  # samples/s at batch 32
NF4_PEAK_TARGET_GB = 22  # the "< 22 GB": decimal gigabytes
NF4_PROFILE = "medisee-7b-24gb"  # the profile whose batch the NF4 peak memory is measured at
CPU_BATCH = 2
INFER_BATCHES = (1, 8, 32)
DECODER_BATCHES = (8, 32)
NEW_TOKENS = 32
GRAD_CLIP = 1.0
# Compiled vs eager at this batch at most: the ratio hardly depends on the batch once the GEMMs are
# large (32 × ~600 tokens), and 4x fewer samples per step keeps the training half within 10 minutes.
COMPILE_BATCH = 32
QUERIES = [
    "Can you segment the liver in this image?",
    "Where is the spleen?",
    "Please outline the left kidney.",
    "Segment the aorta.",
    "Show me the pancreas.",
    "Can you find the stomach here?",
    "Segment the right kidney in this slice.",
    "Which organ stores bile? Segment it.",
]
TRAIN_PARTS = ("lora-bf16", "compile", "lora-nf4", "full-fsdp")
# each part's figures: (name, unit, target)
FIGURES = {
    "lora-bf16": [(HEADLINE, "samples/s", TRAIN_TARGET)],
    "compile": [
        ("gpu_lora_bf16_compiled_train", "samples/s", None),
        ("gpu_lora_bf16_compile_speedup", "x", None),
    ],
    "lora-nf4": [
        ("gpu_lora_nf4_peak_mem", "GB", NF4_PEAK_TARGET_GB),
        ("gpu_lora_nf4_train", "samples/s", None),
    ],
    "full-fsdp": [("gpu_full_fsdp_train", "samples/s", None)],
    "infer": [
        *[(f"gpu_infer_teacher_forced_batch{b}", "samples/s", None) for b in INFER_BATCHES[:-1]],
        (f"gpu_infer_teacher_forced_batch{INFER_BATCHES[-1]}", "samples/s", TEACHER_FORCED_TARGET),
        *[(f"gpu_infer_generate_batch{b}", "samples/s", None) for b in INFER_BATCHES],
        *[(f"gpu_infer_decoder_batch{b}", "samples/s", None) for b in DECODER_BATCHES],
        ("gpu_predictor_p50_latency", "ms", None),
    ],
}
PARTS = {"train": TRAIN_PARTS, "infer": ("infer",), **{p: (p,) for p in (*TRAIN_PARTS, "infer")}}


def log(*parts) -> None:
    print("[gpu-bench]", *parts, file=sys.stderr, flush=True)


def significant(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


# ----- the run's settings and its output ------------------------------------------------------------
@dataclass
class Bench:
    preset: str
    device: torch.device
    quick: bool
    steps: int
    warmup: int
    max_batch: int | None
    compile_backend: str = "inductor"
    device_name: str = ""
    peak_flops: float | None = None
    total_gib: float | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        """CUDA: peak allocated since the last reset. CPU: the process's max RSS so far (never reset)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    def peak_reserved_gib(self) -> float | None:
        """What the caching allocator held at its peak (what a smaller GPU must have room for)."""
        return torch.cuda.max_memory_reserved(self.device) / GIB if self.cuda else None

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / GIB if self.cuda else None

    @property
    def memory_measure(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.cuda else "host max RSS of the process so far"


@dataclass
class Report:
    """Prints each figure as it is measured; the headline is held back to be the last line."""

    headline: str
    held: dict | None = None
    failed: bool = False
    names: list[str] = field(default_factory=list)

    def emit(self, figure: dict) -> None:
        self.names.append(figure["name"])
        if figure["name"] == self.headline:
            self.held = figure
            return
        print(json.dumps(figure), flush=True)

    def finish(self) -> None:
        if self.held is not None:
            print(json.dumps(self.held), flush=True)


def figure(name: str, value: float | None, unit: str, target: float | None, bench: Bench, **context) -> dict:
    rounded = {k: significant(v) if isinstance(v, float) else v for k, v in context.items()}
    return {
        "name": name,
        "value": significant(value),
        "unit": unit,
        "target": target,
        **rounded,
        "preset": bench.preset,
        "device": bench.device_name,
    }


class DoesNotFit(Exception):
    """Out of memory even at batch 1."""


def guarded(report: Report, bench: Bench, figures: list[tuple[str, str, float | None]], run) -> None:
    """Run one setup; on failure report each of its figures not yet reported (name, unit, target)
    with value null and the error."""
    started = time.perf_counter()
    try:
        run()
    except DoesNotFit as error:
        log(f"does not fit: {error}")
        for name, unit, target in figures:
            if name not in report.names:
                report.emit(figure(name, None, unit, target, bench, error=f"does not fit: {error}"))
    except Exception as error:  # a benchmark reports every figure it can, and what stopped the others
        traceback.print_exc(file=sys.stderr)
        report.failed = True
        for name, unit, target in figures:
            if name not in report.names:
                report.emit(figure(name, None, unit, target, bench, error=f"{type(error).__name__}: {error}"))
    finally:
        free_memory(bench)
        log(f"  ({time.perf_counter() - started:.0f} s)")


def free_memory(bench: Bench) -> None:
    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()


def peak_bf16_flops(device_name: str) -> float | None:
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


# ----- building ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New tensors on `device` in `dtype`: the 7B built in place, never as 29 GB of fp32 on the host."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build(
    bench: Bench, finetune: str | None, quantize: str = "none", hold_bf16: bool = True, checkpointing=True
):
    """The model as the recipe builds it, made on the device. `hold_bf16`: frozen MLLM weights in bf16
    (cast_frozen); the model is then built in bf16 and the decoder side returned to fp32, as
    build_model holds it. Without it (FSDP) everything is built in fp32."""
    from medisee.model import build_model

    if bench.cuda:  # what an earlier setup left behind would count in this one's peak
        log(f"  {bench.allocated_gib():.2f} GiB allocated before building")
    started = time.perf_counter()
    with built_on(bench.device, torch.bfloat16 if hold_bf16 else torch.float32):
        model = build_model(
            bench.preset,
            random_weights=True,
            finetune=finetune,
            compute_dtype=torch.bfloat16,
            cast_frozen=hold_bf16,
            quantize=quantize,
            device=bench.device,
            gradient_checkpointing=checkpointing,
            seed=0,
        )
    if hold_bf16:
        for name, child in model.named_children():
            if name != "llava":  # SAM and the heads: fp32, as build_model keeps them
                child.float()
        check_held_dtypes(model, torch.bfloat16)
    log(
        f"  built {bench.preset} finetune={finetune} quantize={quantize}"
        f" in {time.perf_counter() - started:.1f} s"
    )
    return model


def check_held_dtypes(model, dtype: torch.dtype) -> None:
    """Trainable parameters and SAM in fp32, frozen floating-point MLLM weights in `dtype`."""
    wrong = [
        f"{name}: {param.dtype}"
        for name, param in model.named_parameters()
        if param.is_floating_point()
        and param.dtype != (dtype if name.startswith("llava.") and not param.requires_grad else torch.float32)
    ]
    if wrong:
        raise AssertionError(f"parameters held in the wrong dtype: {wrong[:5]} ({len(wrong)} in all)")


def plan_for(bench: Bench, finetune: str | None, text_tokens: int, quantize="none", strategy="ddp"):
    from medisee.model.plan import Setup, plan

    return plan(
        Setup(
            preset=bench.preset,
            finetune=finetune,
            strategy=strategy,
            workers=1,
            batch_size=1,
            precision="bf16",
            quantize=quantize,
            gradient_checkpointing=finetune is not None,
            text_tokens=text_tokens,
        )
    )


def text_tokens_of(model, input_ids: torch.Tensor) -> int:
    return input_ids.shape[1] - model.text.num_image_tokens


# ----- training -----------------------------------------------------------------------------------------
def training_batch(bench: Bench, model, size: int):
    from medisee.data.batch import collate

    return collate(reader_batch(size, model.sam_size, model.clip_size), model.text, bench.device)


def adamw(bench: Bench, module) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=bench.cuda, foreach=not bench.cuda
    )


def throughput(bench: Bench, model, module, optimizer, size: int) -> dict:
    """samples/s of `bench.steps` train steps after `bench.warmup`, peak memory since the start."""
    from medisee.train.step import as_numbers, train_step

    bench.reset_peak()
    batch = training_batch(bench, module, size)
    for _ in range(bench.warmup):
        train_step(model, module, optimizer, None, [batch], GRAD_CLIP)
    bench.sync()
    start = time.perf_counter()
    for _ in range(bench.steps):
        losses = train_step(model, module, optimizer, None, [batch], GRAD_CLIP)
    bench.sync()
    seconds = time.perf_counter() - start
    loss = as_numbers(losses)["loss"]
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss {loss} at batch {size}")
    samples_s = size * bench.steps / seconds
    log(f"  batch {size}: {samples_s:.2f} samples/s, {seconds / bench.steps:.2f} s/step, loss {loss:.3f}")
    return {
        "batch": size,
        "samples_s": samples_s,
        "step_s": seconds / bench.steps,
        "loss": loss,
        "peak_mem_gib": bench.peak_gib(),
        "peak_reserved_gib": bench.peak_reserved_gib(),
        "seq_len": batch.input_ids.shape[1],
        "text_tokens": text_tokens_of(module, batch.input_ids),
    }


def largest_fitting(bench: Bench, start: int, measure: Callable[[int], dict], on_oom=None) -> dict:
    """CUDA: measure at `start` (the plan's largest batch), halving on out-of-memory; CPU: CPU_BATCH."""
    if not bench.cuda:
        return measure(CPU_BATCH)
    size = max(1, min(start, bench.max_batch or start))
    while True:
        try:
            return measure(size)
        except torch.cuda.OutOfMemoryError:
            log(f"  batch {size}: out of memory")
        if on_oom is not None:
            on_oom()
        free_memory(bench)
        if size == 1:
            raise DoesNotFit(f"out of memory at batch 1 on {bench.total_gib:.0f} GiB")
        size //= 2


def start_batch(bench: Bench, plan) -> int:
    return plan.largest_batch(bench.total_gib) if bench.cuda else CPU_BATCH


def mfu(bench: Bench, samples_s: float, tflop_per_sample: float | None) -> float | None:
    if tflop_per_sample is None or bench.peak_flops is None:
        return None
    return samples_s * tflop_per_sample * 1e12 / bench.peak_flops


def tflop_per_sample(bench: Bench, text_tokens: int, finetune: str) -> float | None:
    """Model FLOPs of the 7B architecture (benchmarks/model_step.py); none for other presets."""
    if bench.preset != "medisee-7b":
        return None
    key = "train_full_tflop_per_sample" if finetune == "full" else "train_lora_tflop_per_sample"
    return flops_7b(text_tokens)[key]


def train_figure(name: str, bench: Bench, result: dict, plan, finetune: str, target=None, **context) -> dict:
    tflop = tflop_per_sample(bench, result["text_tokens"], finetune)
    return figure(
        name,
        result["samples_s"],
        "samples/s",
        target,
        bench,
        batch=result["batch"],
        step_s=result["step_s"],
        mfu=mfu(bench, result["samples_s"], tflop),
        tflop_per_sample=tflop,
        peak_mem_gib=result["peak_mem_gib"],
        peak_reserved_gib=result["peak_reserved_gib"],
        plan_gib=plan.total_gib(result["batch"]),
        plan_largest_batch=plan.largest_batch(bench.total_gib) if bench.total_gib else None,
        memory=bench.memory_measure,
        precision="bf16",
        finetune=finetune,
        seq_len=result["seq_len"],
        steps=bench.steps,
        warmup=bench.warmup,
        loss=result["loss"],
        **context,
    )


def bench_lora_bf16(bench: Bench, report: Report, parts: set[str], compile_batch: int) -> None:
    """LoRA with bf16 frozen weights; then, on the same model, compiled against eager steps."""
    model = build(bench, "lora")
    model.train()
    optimizer = adamw(bench, model)
    text_tokens = text_tokens_of(model, training_batch(bench, model, 1).input_ids)
    plan = plan_for(bench, "lora", text_tokens)
    start = start_batch(bench, plan)
    on_oom = functools.partial(optimizer.zero_grad, set_to_none=True)
    if "lora-bf16" in parts:
        log(f"LoRA bf16: from batch {start}")
        result = largest_fitting(
            bench, start, lambda b: throughput(bench, model, model, optimizer, b), on_oom
        )
        report.emit(train_figure(HEADLINE, bench, result, plan, "lora", TRAIN_TARGET, quantize="none"))
        start = result["batch"]
    if "compile" in parts:
        start = min(start, compile_batch) if compile_batch else start
        log(f"LoRA bf16, compiled vs eager: from batch {start}")
        compiled = compile_comparison(bench, model, optimizer, start, on_oom)
        report.emit(
            train_figure(
                "gpu_lora_bf16_compiled_train",
                bench,
                compiled,
                plan,
                "lora",
                eager_samples_s=compiled["eager_samples_s"],
                first_compiled_step_s=compiled["first_step_s"],
                layers_compiled=compiled["layers_compiled"],
                timing="steps alternated with eager ones, median step time",
            )
        )
        speedup = compiled["samples_s"] / compiled["eager_samples_s"]
        report.emit(
            figure(
                "gpu_lora_bf16_compile_speedup",
                speedup,
                "x",
                None,
                bench,
                batch=compiled["batch"],
                compiled_samples_s=compiled["samples_s"],
                eager_samples_s=compiled["eager_samples_s"],
                first_compiled_step_s=compiled["first_step_s"],
                steps=bench.steps,
            )
        )


def compile_comparison(bench: Bench, model, optimizer, start: int, on_oom) -> dict:
    """`compile_language_model`, then compiled and eager steps alternated on the same model and batch
    (eager = the compiled layers run under `torch.compiler.set_stance("force_eager")`)."""
    from medisee.model.build import compile_language_model
    from medisee.train.step import as_numbers, train_step

    layers = compile_language_model(model, bench.compile_backend)
    first: list[float] = []

    def measure(size: int) -> dict:
        bench.reset_peak()
        batch = training_batch(bench, model, size)

        last_losses: list[dict] = []

        def timed_step(eager: bool) -> float:
            stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
            with stance:
                bench.sync()
                began = time.perf_counter()
                last_losses[:] = [train_step(model, model, optimizer, None, [batch], GRAD_CLIP)]
                bench.sync()
            return time.perf_counter() - began

        first.append(timed_step(eager=False))  # compiles (or recompiles for a new batch size)
        log(f"  batch {size}: first compiled step {first[-1]:.1f} s")
        for _ in range(max(0, bench.warmup - 1)):
            timed_step(eager=False)
        timed_step(eager=True)
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(bench.steps):
            for eager in (False, True) if rep % 2 == 0 else (True, False):
                times[eager].append(timed_step(eager))
        loss = as_numbers(last_losses[0])["loss"]
        compiled_s, eager_s = statistics.median(times[False]), statistics.median(times[True])
        log(f"  batch {size}: compiled {size / compiled_s:.2f} samples/s, eager {size / eager_s:.2f}")
        return {
            "batch": size,
            "samples_s": size / compiled_s,
            "step_s": compiled_s,
            "eager_samples_s": size / eager_s,
            "eager_step_s": eager_s,
            "first_step_s": first[0],
            "layers_compiled": layers,
            "loss": loss,
            "peak_mem_gib": bench.peak_gib(),
            "peak_reserved_gib": bench.peak_reserved_gib(),
            "seq_len": batch.input_ids.shape[1],
            "text_tokens": text_tokens_of(model, batch.input_ids),
        }

    return largest_fitting(bench, start, measure, on_oom)


def bench_lora_nf4(bench: Bench, report: Report) -> None:
    """QLoRA: peak memory at the 24 GB profile's batch, then samples/s at the largest batch."""
    from medisee.config import load_config

    model = build(bench, "lora", quantize="nf4")
    model.train()
    optimizer = adamw(bench, model)
    text_tokens = text_tokens_of(model, training_batch(bench, model, 1).input_ids)
    plan = plan_for(bench, "lora", text_tokens, quantize="nf4")
    profile_batch = load_config(NF4_PROFILE).data.batch_size if bench.cuda else CPU_BATCH
    log(f"LoRA NF4: peak memory at the {NF4_PROFILE} batch {profile_batch}")
    at_profile = throughput(bench, model, model, optimizer, profile_batch)
    report.emit(
        figure(
            "gpu_lora_nf4_peak_mem",
            at_profile["peak_mem_gib"] * GIB / 1e9,
            "GB",
            NF4_PEAK_TARGET_GB,
            bench,
            batch=profile_batch,
            profile=NF4_PROFILE,
            peak_reserved_gib=at_profile["peak_reserved_gib"],
            plan_gib=plan.total_gib(profile_batch),
            plan_note="plan without the profile's image-embedding cache budget",
            memory=bench.memory_measure,
            samples_s=at_profile["samples_s"],
            quantize="nf4",
        )
    )
    result = at_profile  # the CPU's one small batch
    if bench.cuda:
        start = start_batch(bench, plan)
        log(f"LoRA NF4: from batch {start}")
        on_oom = functools.partial(optimizer.zero_grad, set_to_none=True)
        result = largest_fitting(
            bench, start, lambda b: throughput(bench, model, model, optimizer, b), on_oom
        )
    report.emit(train_figure("gpu_lora_nf4_train", bench, result, plan, "lora", quantize="nf4"))


@contextlib.contextmanager
def single_rank_group(bench: Bench) -> Iterator[None]:
    """A one-process default group on a free loopback port (nccl on CUDA, gloo on CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if bench.cuda:
        torch.cuda.set_device(bench.device)
    torch.distributed.init_process_group("nccl" if bench.cuda else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bench_full_fsdp(bench: Bench, report: Report) -> None:
    """Full fine-tune of the LM, FSDP2 with bf16 layers on one rank; frozen weights stay fp32."""
    with single_rank_group(bench):
        result, plan = sharded_full_finetune(bench)
    report.emit(
        train_figure("gpu_full_fsdp_train", bench, result, plan, "full", strategy="fsdp", layer_dtype="bf16")
    )


def sharded_full_finetune(bench: Bench) -> tuple[dict, object]:
    from medisee.train import parallel

    module = build(bench, "full", hold_bf16=False)
    module.train()
    text_tokens = text_tokens_of(module, training_batch(bench, module, 1).input_ids)
    plan = plan_for(bench, "full", text_tokens, strategy="fsdp")
    # parallel.wrap returns the bare module for a world of one: shard it as wrap does for more workers
    model = parallel.shard(module.to(bench.device), bench.device, layer_dtype=torch.bfloat16)
    optimizer = adamw(bench, module)
    start = start_batch(bench, plan)
    log(
        f"full fine-tune, FSDP on one rank: from batch {max(1, start)}"
        f" (plan: {plan.total_gib(1):.0f} GiB at batch 1)"
    )
    on_oom = functools.partial(optimizer.zero_grad, set_to_none=True)
    result = largest_fitting(bench, start, lambda b: throughput(bench, model, module, optimizer, b), on_oom)
    return result, plan


# ----- inference ----------------------------------------------------------------------------------------
def seconds_per_call(bench: Bench, call: Callable[[], object], reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        bench.sync()
        began = time.perf_counter()
        call()
        bench.sync()
        times.append(time.perf_counter() - began)
    return times


@dataclass
class Inputs:
    images: list[np.ndarray]  # one query about each
    queries: list[list[str]]
    side: int
    reps: int
    warmup: int


def bench_inference(bench: Bench, report: Report) -> None:
    """The MLLM stage (teacher-forced, then generating), the decoder stage, the Predictor."""
    model = build(bench, None, checkpointing=False).eval()
    side = 512 if bench.preset == "medisee-7b" else 128
    rng = np.random.default_rng(0)
    count = max(INFER_BATCHES)
    inputs = Inputs(
        images=[rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(count)],
        queries=[[QUERIES[i % len(QUERIES)]] for i in range(count)],
        side=side,
        reps=1 if bench.quick else 3,
        warmup=1,
    )
    candidates = bench_mllm_stage(bench, report, model, inputs)
    bench_decoder_stage(bench, report, model, inputs, candidates)
    bench_predictor(bench, report, model, inputs)


def stage_figure(bench: Bench, name: str, size: int, times: list[float], target=None, **context) -> dict:
    samples_s = size / statistics.median(times)
    log(f"  {name}: {samples_s:.2f} samples/s")
    return figure(
        name,
        samples_s,
        "samples/s",
        target,
        bench,
        batch=size,
        median_call_s=statistics.median(times),
        reps=len(times),
        peak_mem_gib=bench.peak_gib(),
        memory=bench.memory_measure,
        precision="bf16",
        **context,
    )


def bench_mllm_stage(bench: Bench, report: Report, model, inputs: Inputs) -> np.ndarray:
    """Teacher-forced and generating MLLMStage at each batch; returns the candidate states of every
    query (teacher-forced), for the decoder stage."""
    from medisee.data.prompts import FIXED_ANSWER
    from medisee.infer.mllm_stage import MLLMStage

    images, queries = inputs.images, inputs.queries
    tokenized = model.text.batch([q[0] for q in queries], [FIXED_ANSWER] * len(queries))
    text_tokens = text_tokens_of(model, tokenized["input_ids"])
    plan = plan_for(bench, None, text_tokens)
    log("MLLM stage, teacher-forced")
    teacher_forced = MLLMStage(model, "teacher_forced")
    for size in INFER_BATCHES:
        bench.reset_peak()
        call = functools.partial(teacher_forced, images[:size], queries[:size])
        times = seconds_per_call(bench, call, inputs.reps, inputs.warmup)
        target = TEACHER_FORCED_TARGET if size == max(INFER_BATCHES) else None
        name = f"gpu_infer_teacher_forced_batch{size}"
        report.emit(stage_figure(bench, name, size, times, target, plan_gib=plan.total_gib(size)))

    log(f"MLLM stage, generating {NEW_TOKENS} new tokens")
    plan = plan_for(bench, None, text_tokens + NEW_TOKENS)
    generating = MLLMStage(model, "generate", max_new_tokens=NEW_TOKENS)
    new_tokens = count_new_tokens(model)
    try:
        for size in INFER_BATCHES:
            bench.reset_peak()
            new_tokens.clear()
            call = functools.partial(generating, images[:size], queries[:size])
            times = seconds_per_call(bench, call, inputs.reps, inputs.warmup)
            tokens_s = size * max(new_tokens) / statistics.median(times)
            name = f"gpu_infer_generate_batch{size}"
            context = {"max_new_tokens": NEW_TOKENS, "new_tokens": max(new_tokens), "tokens_per_s": tokens_s}
            report.emit(stage_figure(bench, name, size, times, plan_gib=plan.total_gib(size), **context))
    finally:
        del model.generate  # the instance's counting wrapper: back to the class's method
    return np.stack([e.candidates for e in teacher_forced(images, queries)])


def bench_decoder_stage(bench: Bench, report: Report, model, inputs: Inputs, candidates: np.ndarray) -> None:
    """DecoderStage on what the MLLM stage hands it: the images and each query's candidate states."""
    from medisee.infer.decoder_stage import DecoderStage

    log("decoder stage, on the teacher-forced candidate states")
    decoder = DecoderStage(model)
    for size in DECODER_BATCHES:
        bench.reset_peak()
        call = functools.partial(decoder, inputs.images[:size], list(range(size)), candidates[:size])
        times = seconds_per_call(bench, call, inputs.reps, inputs.warmup)
        name = f"gpu_infer_decoder_batch{size}"
        report.emit(stage_figure(bench, name, size, times, image_side=inputs.side))


def bench_predictor(bench: Bench, report: Report, model, inputs: Inputs) -> None:
    """p50 latency of one request (one image, one query) through the Predictor, every stage run."""
    from medisee.infer.predictor import Predictor

    log("Predictor, one image and one query per call")
    predictor = Predictor(model, early_reject=False)  # every query decoded: the full path
    bench.reset_peak()
    timings: list[dict] = []

    def predict_one() -> None:
        timings.append(predictor.predict(inputs.images[0], inputs.queries[0][0])[0].timings)

    reps, warmup = (3, 1) if bench.quick else (20, 2)
    times = seconds_per_call(bench, predict_one, reps, warmup)
    p50_ms = statistics.median(times) * 1000
    log(f"  p50 {p50_ms:.1f} ms")
    stages_ms = {  # "mllm_s" -> "p50_mllm_ms"
        f"p50_{key[:-2]}_ms": statistics.median(t[key] for t in timings[warmup:]) * 1000 for key in timings[0]
    }
    report.emit(
        figure(
            "gpu_predictor_p50_latency",
            p50_ms,
            "ms",
            None,
            bench,
            reps=reps,
            p90_ms=float(np.percentile(times, 90)) * 1000,
            mode="teacher_forced",
            image_side=inputs.side,
            peak_mem_gib=bench.peak_gib(),
            memory=bench.memory_measure,
            precision="bf16",
            **stages_ms,
        )
    )


def count_new_tokens(model) -> list[int]:
    """Wraps the model's `generate` (on the instance) to record how many tokens each call produced:
    random weights may emit EOS before max_new_tokens."""
    counts: list[int] = []
    original = model.generate

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        counts.append(out.tokens.shape[1])
        return out

    model.generate = counting
    return counts


# ----- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="medisee-7b", choices=["medisee-7b", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 1 timed step / call each")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated: train, infer or training setups {', '.join(TRAIN_PARTS)} (default: all)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 5; --quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up train steps (default 2; --quick 1)")
    parser.add_argument("--max-batch", type=int, default=None, help="cap the batch search (CUDA)")
    parser.add_argument(
        "--compile-batch",
        type=int,
        default=COMPILE_BATCH,
        help=f"compiled vs eager at most at this batch (default {COMPILE_BATCH}; 0: the LoRA bf16 batch)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (the CPU smoke test uses aot_eager: no C++ kernel compilation)",
    )
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else ["train", "infer"]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(PARTS)}")
    args.parts = {p for n in names for p in PARTS[n]}
    return args


def make_bench(args: argparse.Namespace) -> Bench:
    device = torch.device(args.device)
    bench = Bench(
        preset=args.preset,
        device=device,
        quick=args.quick,
        steps=args.steps or (1 if args.quick else 5),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        max_batch=args.max_batch,
        compile_backend=args.compile_backend,
    )
    if bench.cuda:
        device = bench.device = torch.device("cuda", torch.cuda.current_device())
        bench.device_name = torch.cuda.get_device_name(device)
        bench.peak_flops = peak_bf16_flops(bench.device_name)
        bench.total_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    else:
        bench.device_name = f"cpu ({torch.get_num_threads()} threads)"
    return bench


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu.py: --device cuda but no CUDA device is available (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}). Run on a GPU machine, or check the script on CPU with "
            "--preset tiny --device cpu --quick.",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu" and args.preset == "medisee-7b":
        log("warning: the 7B preset on CPU needs ~30 GB of memory and hours; --preset tiny checks the script")
    torch.manual_seed(0)
    bench = make_bench(args)
    log(
        f"{bench.preset} on {bench.device_name}: parts {sorted(args.parts)},"
        f" {bench.warmup} warm-up + {bench.steps} timed steps"
    )
    headline = (
        HEADLINE if "lora-bf16" in args.parts else f"gpu_infer_teacher_forced_batch{max(INFER_BATCHES)}"
    )
    report = Report(headline)
    setups = [
        ({"lora-bf16", "compile"}, lambda: bench_lora_bf16(bench, report, args.parts, args.compile_batch)),
        ({"lora-nf4"}, lambda: bench_lora_nf4(bench, report)),
        ({"full-fsdp"}, lambda: bench_full_fsdp(bench, report)),
        ({"infer"}, lambda: bench_inference(bench, report)),
    ]
    for parts, run in setups:
        if parts & args.parts:
            figures = [f for part in sorted(parts & args.parts) for f in FIGURES[part]]
            guarded(report, bench, figures, run)
    report.finish()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
