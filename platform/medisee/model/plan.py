"""How much GPU memory a training or inference setup needs, estimated before anything is allocated.

Parameter counts are exact: the model is built on the meta device (no memory, ~3 s for the 7B shapes).
Everything else is arithmetic on those counts and the LM's shapes:

- weights: frozen MLLM parameters in the compute dtype (the LM's linear layers in NF4 when quantized:
  4 bits plus bitsandbytes' double-quantized block scales, ~0.127 bits per weight), SAM's in fp32;
  under FSDP every weight is an fp32 shard, plus the two LM layers gathered at a time;
- trainable parameters: fp32 master weights, fp32 gradients and two fp32 AdamW moments (16 bytes
  each), divided by the number of workers under FSDP;
- activations per sample: what autograd saves in one LM decoder layer (see `lm_layer_activation_bytes`)
  for every layer, or, with gradient checkpointing, each layer's input plus one layer recomputed;
  plus the logits of the whole sequence in fp32 (the loss upcasts them);
- inference: the KV cache of the whole sequence and one layer's temporaries;
- SAM's attention scores while it encodes SAM_IMAGES_PER_PASS images (`sam_encoder_peak_bytes`);
- a fixed allowance for the CUDA context, kernels' workspaces and allocator fragmentation;
- the SAM image-embedding cache's budget, when the recipe keeps one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES_PER_WEIGHT = 0.5 + 0.127 / 8
TRAINABLE_BYTES = 4 + 4 + 8  # fp32 master weight, fp32 gradient, AdamW exp_avg + exp_avg_sq
CUDA_OVERHEAD_GIB = 1.5
FRAGMENTATION = 1.10
GPU_SIZES_GIB = {"24 GB": 24, "40 GB": 40, "48 GB": 48, "80 GB": 80, "141 GB": 141}


@dataclass(frozen=True)
class Setup:
    preset: str = "tiny"
    finetune: str | None = "lora"  # lora | full | None (inference)
    strategy: str = "ddp"
    workers: int = 1
    batch_size: int = 1
    precision: str = "bf16"
    quantize: str = "none"  # none | nf4 (the LM's linear layers)
    gradient_checkpointing: bool = True
    text_tokens: int = 128
    lora_r: int = 8
    image_cache_gib: float = 0.0  # trainer.image_embedding_cache_gib


def setup_from_config(cfg, inference: bool = False) -> Setup:
    """The Setup a configuration trains (or, with `inference`, scores) with, on GPUs.

    trainer.precision=auto plans for bf16 on a GPU run (fp16 takes the same memory) and fp32 on CPU;
    inference plans for scoring.dtype.
    """
    import torch

    from medisee.model.precision import PRECISION_DTYPES

    t = cfg.trainer
    if inference:
        infer_dtype = getattr(torch, cfg.scoring.dtype)
        precision = next(name for name, dtype in PRECISION_DTYPES.items() if dtype == infer_dtype)
    elif t.precision == "auto":
        precision = "bf16" if t.use_gpu else "fp32"
    else:
        precision = t.precision
    return Setup(
        preset=cfg.model.preset,
        finetune=None if inference else t.finetune,
        strategy="ddp" if inference else t.strategy,
        workers=1 if inference else t.num_workers,
        batch_size=cfg.scoring.mllm_batch_images if inference else cfg.data.batch_size,
        precision=precision,
        quantize=cfg.model.quantize,
        gradient_checkpointing=t.gradient_checkpointing,
        image_cache_gib=0.0 if inference else t.image_embedding_cache_gib,
    )


@dataclass(frozen=True)
class ParameterCounts:
    vocab: int  # the LM's vocabulary (sizes the logits), not a count of parameters
    lm_linear: int  # the LM decoder layers' linear weights: what NF4 quantizes
    lm_other: int  # embeddings, norms, LM head
    encoders: int  # CLIP tower, projector, SAM image encoder: frozen, never trained
    rest: int  # prompt encoder, mask decoder, routers, box decoder
    trainable: int
    frozen_sam: int = 0  # SAM's frozen parameters: held in fp32 whatever the precision

    @property
    def total(self) -> int:
        return self.lm_linear + self.lm_other + self.encoders + self.rest


@dataclass(frozen=True)
class MemoryPlan:
    setup: Setup
    parameters: ParameterCounts
    sequence_tokens: int
    weights_gib: float
    trainable_state_gib: float
    activations_gib_per_sample: float
    overhead_gib: float
    encoder_peak_gib: float = 0.0  # SAM's attention scores while it encodes (transient)

    def total_gib(self, batch_size: int | None = None) -> float:
        batch = self.setup.batch_size if batch_size is None else batch_size
        state = self.weights_gib + self.trainable_state_gib + self.activations_gib_per_sample * batch
        state += self.encoder_peak_gib
        return state * FRAGMENTATION + self.overhead_gib + self.setup.image_cache_gib

    def verdicts(self) -> dict[str, str]:
        need = self.total_gib()
        return {name: "fits" if need <= size else "does not fit" for name, size in GPU_SIZES_GIB.items()}

    def largest_batch(self, gpu_gib: float) -> int:
        """The largest per-GPU batch that fits in `gpu_gib` (0 if not even one sample)."""
        fixed = self.total_gib(0)
        per_sample = self.activations_gib_per_sample * FRAGMENTATION
        return max(0, int((gpu_gib - fixed) // per_sample)) if per_sample else 0

    def as_dict(self) -> dict:
        return {
            "setup": asdict(self.setup),
            "parameters": {**asdict(self.parameters), "total": self.parameters.total},
            "sequence_tokens": self.sequence_tokens,
            "weights_gib": round(self.weights_gib, 2),
            "trainable_state_gib": round(self.trainable_state_gib, 2),
            "activations_gib_per_sample": round(self.activations_gib_per_sample, 3),
            "overhead_gib": self.overhead_gib,
            "encoder_peak_gib": round(self.encoder_peak_gib, 2),
            "total_gib": round(self.total_gib(), 2),
            "verdicts": self.verdicts(),
            "largest_batch": {name: self.largest_batch(size) for name, size in GPU_SIZES_GIB.items()},
        }


def count_parameters(preset: str, finetune: str | None, lora_r: int = 8) -> ParameterCounts:
    """Exact counts from the model built on the meta device."""
    import torch

    from medisee.model.build import build_model

    with torch.device("meta"):
        model = build_model(preset, random_weights=True, finetune=finetune, lora_r=lora_r)
    counts = dict.fromkeys(("lm_linear", "lm_other", "encoders", "rest", "trainable", "frozen_sam"), 0)
    counts["vocab"] = model.llava.config.text_config.vocab_size
    for name, param in model.named_parameters():
        counts[_part_of(name, param.dim())] += param.numel()
        if param.requires_grad:
            counts["trainable"] += param.numel()
        elif name.startswith("sam."):
            counts["frozen_sam"] += param.numel()
    return ParameterCounts(**counts)


def _part_of(name: str, dim: int) -> str:
    if "vision_tower" in name or "multi_modal_projector" in name or "image_encoder" in name:
        return "encoders"
    if "language_model" in name or "lm_head" in name:
        in_layers = ".layers." in name and "lora_" not in name and dim == 2
        return "lm_linear" if in_layers else "lm_other"
    return "rest"


def lm_layer_activation_bytes(
    hidden: int, intermediate: int, kv_heads: int, heads: int, tokens: int, dtype_bytes: int
) -> int:
    """Bytes autograd keeps for one Mistral/Llama decoder layer of transformers (fused SDPA attention,
    SwiGLU MLP), per sample. Per token: each of the two RMSNorms keeps its input upcast to fp32 plus
    its normalised and its weighted output; attention keeps the rotated Q, K and V and its output;
    the MLP keeps gate, up, SiLU(gate) and down_proj's input. Checked against the tensors a real layer
    saves (tests/model/test_plan.py).
    """
    norms = 2 * (4 * hidden + 2 * hidden * dtype_bytes)
    attention = (2 * hidden + 2 * hidden * kv_heads // heads) * dtype_bytes
    mlp = 4 * intermediate * dtype_bytes
    return (norms + attention + mlp) * tokens


def sam_encoder_peak_bytes(image_size: int, patch_size: int, heads: int, dtype_bytes: int) -> int:
    """Transient bytes of one image in a SAM global-attention block (segment-anything's ViT): the
    (heads, T, T) scores, the copy with the relative-position terms added, and softmax's output, which
    autocast computes in fp32 (then casts back for the product with V). Per image, in bytes."""
    tokens = (image_size // patch_size) ** 2
    scores = heads * tokens * tokens
    return scores * (2 * dtype_bytes + 4) if dtype_bytes < 4 else scores * 2 * 4


def plan(setup: Setup) -> MemoryPlan:
    from medisee.model.build import PRESETS
    from medisee.model.medisee import SAM_IMAGES_PER_PASS

    mllm, sam = PRESETS[setup.preset].mllm, PRESETS[setup.preset].sam
    params = count_parameters(setup.preset, setup.finetune, setup.lora_r)
    tokens = mllm.num_image_tokens + setup.text_tokens
    dtype_bytes = BYTES[setup.precision]
    training = setup.finetune is not None

    frozen_lm_linear = params.lm_linear if setup.finetune != "full" else 0
    lm_linear_bytes = NF4_BYTES_PER_WEIGHT if setup.quantize == "nf4" else dtype_bytes
    shards = setup.workers if setup.strategy == "fsdp" else 1
    if setup.strategy == "fsdp":  # frozen weights stay fp32 shards; layers are gathered in the layer dtype
        weights = (params.total - params.trainable) * 4 / shards
        weights += 2 * params.lm_linear / mllm.layers * dtype_bytes  # the layer it runs + the prefetched one
    else:  # medisee.model.build: frozen MLLM weights in the compute dtype, SAM in fp32
        frozen_mllm = params.total - params.trainable - frozen_lm_linear - params.frozen_sam
        weights = frozen_lm_linear * lm_linear_bytes + frozen_mllm * dtype_bytes + params.frozen_sam * 4
    trainable = params.trainable * TRAINABLE_BYTES / shards if training else 0

    layer = lm_layer_activation_bytes(
        mllm.hidden, mllm.intermediate, mllm.kv_heads, mllm.heads, tokens, dtype_bytes
    )
    if not training:
        kv_cache = 2 * mllm.layers * tokens * (mllm.hidden * mllm.kv_heads // mllm.heads) * dtype_bytes
        activations = kv_cache + layer // 2  # one layer's temporaries in flight
    elif setup.gradient_checkpointing:
        activations = mllm.layers * tokens * mllm.hidden * dtype_bytes + layer
    else:
        activations = mllm.layers * layer
    logits = tokens * params.vocab * (4 * 2 if training else dtype_bytes)  # fp32 logits and their gradient
    return MemoryPlan(
        setup=setup,
        parameters=params,
        sequence_tokens=tokens,
        weights_gib=weights / GIB,
        trainable_state_gib=trainable / GIB,
        activations_gib_per_sample=(activations + logits) / GIB,
        overhead_gib=CUDA_OVERHEAD_GIB,
        encoder_peak_gib=SAM_IMAGES_PER_PASS
        * sam_encoder_peak_bytes(sam.image_size, sam.patch_size, sam.encoder_heads, dtype_bytes)
        / GIB,
    )
