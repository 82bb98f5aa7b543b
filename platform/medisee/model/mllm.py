"""The multimodal LLM: transformers' LlavaForConditionalGeneration (CLIP tower + projector + LM)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from medisee.config import PRESET_IMAGE_SIZES


@dataclass(frozen=True)
class MllmConfig:
    # vision tower
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = PRESET_IMAGE_SIZES["medisee-7b"]["clip_image_size"]
    patch_size: int = 14
    # language model
    lm_type: str = "mistral"
    hidden: int = 4096
    intermediate: int = 14336
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    max_positions: int = 32768
    # clip: transformers' CLIP tower on CLIP-normalised pixels; lite_medsam: LiteMedSAM's TinyViT on
    # min-max [0, 1] pixels, pooled (medisee.model.lite), the LM read from a folder
    vision: str = "clip"
    template: str = "mistral"  # the conversation template (medisee.model.text.prompt_text)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


LLAVA_MED_MISTRAL_7B = MllmConfig()
MLLM_TINY = MllmConfig(
    vision_hidden=96,
    vision_intermediate=384,
    vision_layers=3,
    vision_heads=4,
    image_size=PRESET_IMAGE_SIZES["tiny"]["clip_image_size"],
    patch_size=16,
    lm_type="llama",
    hidden=128,
    intermediate=512,
    layers=2,
    heads=4,
    kv_heads=4,
    max_positions=512,
)

MLLM_LITE = MllmConfig(
    vision_hidden=256,
    image_size=PRESET_IMAGE_SIZES["medisee-lite"]["clip_image_size"],
    patch_size=32,  # 8 × 8 tokens by default; model.image_token_grid sets it
    lm_type="llama",
    hidden=576,  # SmolLM2-135M; the LM folder's config is what counts
    vision="lite_medsam",
    template="chatml",
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_llava(cfg: MllmConfig, vocab_size: int, image_token_id: int, pad_token_id: int | None):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
    )

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text_cls = MistralConfig if cfg.lm_type == "mistral" else LlamaConfig
    text = text_cls(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(config)


def num_image_tokens(llava) -> int:
    vision = llava.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def resize_for_tokenizer(llava, tokenizer) -> None:
    if llava.get_input_embeddings().weight.shape[0] < len(tokenizer):
        llava.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def normalize_clip(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, C, C, 3) uint8 -> (B, 3, C, C) float normalised with CLIP's mean/std."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
    mean, std = _clip_constants(x.device)
    return (x - mean) / std


@functools.cache
def _clip_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Copied to a device once: a copy from host memory on every forward would wait for the GPU."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1).to(device)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1).to(device)
    return mean, std
