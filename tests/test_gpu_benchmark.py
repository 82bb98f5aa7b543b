"""benchmarks/gpu.py works before a GPU is ever lent: the whole run on CPU with the tiny preset.

The figures' values mean nothing here (tiny model, a CPU thread); what is checked is that every
setup runs through the real code paths and prints its figure.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
EXPECTED = {
    "gpu_lora_bf16_train",
    "gpu_lora_bf16_compiled_train",
    "gpu_lora_bf16_compile_speedup",
    "gpu_lora_nf4_train",
    "gpu_lora_nf4_peak_mem",
    "gpu_full_fsdp_train",
    "gpu_infer_teacher_forced_batch1",
    "gpu_infer_teacher_forced_batch8",
    "gpu_infer_teacher_forced_batch32",
    "gpu_infer_generate_batch1",
    "gpu_infer_generate_batch8",
    "gpu_infer_generate_batch32",
    "gpu_infer_decoder_batch8",
    "gpu_infer_decoder_batch32",
    "gpu_predictor_p50_latency",
}


def run_script(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_runs_every_setup_on_cpu_with_the_tiny_preset():
    """Both halves as `make bench-gpu` runs them, side by side on one thread each: one run on two
    threads leaves a core mostly idle (the tiny model's operations are too small to split)."""
    smoke = ["--preset", "tiny", "--device", "cpu", "--quick", "--compile-backend", "aot_eager"]
    one_thread = os.environ | {"OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(2) as pool:
        runs = pool.map(lambda part: run_script(*smoke, "--only", part, env=one_thread), ("train", "infer"))
        done = dict(zip(("train", "infer"), runs, strict=True))
    for run in done.values():
        assert run.returncode == 0, run.stderr[-4000:]
    output = {
        part: [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
        for part, run in done.items()
    }
    lines = output["train"] + output["infer"]
    names = Counter(line["name"] for line in lines)
    assert set(names) == EXPECTED and max(names.values()) == 1, names
    for line in lines:
        assert {"name", "value", "unit", "target"} <= line.keys(), line
        assert math.isfinite(line["value"]) and line["value"] > 0, line
        assert line["preset"] == "tiny" and line["device"].startswith("cpu"), line
    by_name = {line["name"]: line for line in lines}
    # each half's headline is held back to be its last line
    assert output["train"][-1]["name"] == "gpu_lora_bf16_train"
    assert output["infer"][-1]["name"] == "gpu_infer_teacher_forced_batch32"
    assert (by_name["gpu_lora_bf16_train"]["unit"], by_name["gpu_lora_bf16_train"]["target"]) == (
        "samples/s",
        16,
    )
    assert (by_name["gpu_lora_nf4_peak_mem"]["unit"], by_name["gpu_lora_nf4_peak_mem"]["target"]) == (
        "GB",
        22,
    )
    assert by_name["gpu_infer_teacher_forced_batch32"]["target"] == 30
    assert by_name["gpu_infer_generate_batch8"]["new_tokens"] <= 32
    for name in ("gpu_lora_bf16_train", "gpu_lora_nf4_train", "gpu_full_fsdp_train"):
        assert math.isfinite(by_name[name]["loss"]) and by_name[name]["plan_gib"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_asking_for_cuda_without_one_exits_2_with_a_message():
    done = run_script("--only", "infer", timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and done.stdout == ""


@pytest.fixture()
def gpu(monkeypatch):
    """benchmarks/gpu.py as a module."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_model_built_in_place_in_bf16_holds_its_weights_as_build_model_does(gpu):
    """The benchmark builds the 7B on the device in bf16 (no fp32 copy on the host); the dtypes and
    what is trainable must come out as build_model's own cast_frozen path leaves them."""
    from medisee.model import build_model

    def layout(model):
        tensors = [*model.named_parameters(), *model.named_buffers()]
        return {name: (t.dtype, t.requires_grad, tuple(t.shape)) for name, t in tensors}

    bench = gpu.Bench("tiny", torch.device("cpu"), quick=True, steps=1, warmup=1, max_batch=None)
    for finetune in ("lora", None):
        in_place = gpu.build(bench, finetune)
        assert torch.get_default_dtype() == torch.float32
        reference = build_model(
            "tiny",
            finetune=finetune,
            compute_dtype=torch.bfloat16,
            cast_frozen=True,
            gradient_checkpointing=True,
        )
        assert layout(in_place) == layout(reference)


def test_the_batch_search_halves_on_out_of_memory_down_to_one(gpu):
    """The CUDA path of the search, with a measurement that runs out of memory above 5 samples."""
    bench = gpu.Bench(
        "tiny", torch.device("cuda"), quick=True, steps=1, warmup=1, max_batch=None, total_gib=80
    )
    tried, freed = [], []

    def measure(size: int) -> dict:
        tried.append(size)
        if size > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"batch": size}

    assert gpu.largest_fitting(bench, 24, measure, on_oom=lambda: freed.append(1)) == {"batch": 3}
    assert tried == [24, 12, 6, 3] and len(freed) == 3
    bench.max_batch = 4
    assert gpu.largest_fitting(bench, 24, measure)["batch"] == 4
    with pytest.raises(gpu.DoesNotFit, match="batch 1"):
        gpu.largest_fitting(bench, 0, lambda size: measure(size * 100))


@pytest.mark.parametrize(
    ("device_name", "flops"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_name(gpu, device_name, flops):
    assert gpu.peak_bf16_flops(device_name) == flops
