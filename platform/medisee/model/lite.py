"""The medisee-lite MLLM: transformers' LLaVA over a pretrained Llama LM (SmolLM2-135M-Instruct by
default) whose vision tower is LiteMedSAM's frozen TinyViT image encoder.

The 64 × 64 × 256 embedding is average-pooled to a `grid` × `grid` token grid and goes through
LLaVA's two-layer MLP projector (trained: there is no pretrained one). Both sides take the same
input, the SAM frame (min-max normalised, longest side 256, zero padding), so the MediSee model
encodes an image once and pools the decoder's own embedding for the LM
(`MediSee.shares_image_encoder`). transformers' LLaVA then does what it does for CLIP (placing
the image tokens, generation, the loss), so the lite model runs the same MediSee code as the 7B one.
The vision config recorded in the LLaVA config describes the grid (image_size / patch_size = grid,
hidden_size = 256); it is never used to build a CLIP tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

LITE_IMAGE_SIZE = 256
LITE_EMBED_DIM = 256


class PooledImageEncoder(nn.Module):
    """(M, 3, S, S) normalised images -> hidden_states[-1] = (M, grid², C) pooled embedding tokens."""

    def __init__(self, encoder: nn.Module, grid: int):
        super().__init__()
        self.encoder = encoder
        self.grid = grid
        self.patch_size = LITE_IMAGE_SIZE // grid  # what LLaVA's image_sizes splitting would read

    def forward(self, pixel_values: torch.Tensor, **_) -> BaseModelOutputWithPooling:
        tokens = self.pool(self.encoder(pixel_values))
        return BaseModelOutputWithPooling(last_hidden_state=tokens, hidden_states=(tokens,))

    def pool(self, embedding: torch.Tensor) -> torch.Tensor:
        """(M, C, 64, 64) image embedding -> (M, grid², C) tokens, row-major like CLIP's patches."""
        return F.adaptive_avg_pool2d(embedding, self.grid).flatten(2).transpose(1, 2)


def build_lite_llava(language_model, image_encoder: nn.Module, grid: int, image_token_id: int):
    """LlavaForConditionalGeneration around `language_model` (a loaded LlamaForCausalLM, moved in, not
    copied) with `image_encoder` (LiteMedSAM's TinyViT) pooled to `grid` × `grid` tokens."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    if LITE_IMAGE_SIZE % grid:
        raise ValueError(f"the token grid ({grid}) must divide the {LITE_IMAGE_SIZE} px image")
    text = language_model.config
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=LITE_EMBED_DIM,
            image_size=LITE_IMAGE_SIZE,
            patch_size=LITE_IMAGE_SIZE // grid,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=LITE_EMBED_DIM,
        ),
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=grid * grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):  # every part is replaced below: allocate nothing for the placeholders
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = PooledImageEncoder(image_encoder, grid)
    llava.model.multi_modal_projector = LlavaMultiModalProjector(config)
    llava.model.language_model = language_model.model
    llava.lm_head = language_model.lm_head
    return llava


def load_language_model(folder: str, dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM, tokenizer) from a transformers folder; strict: a missing or unexpected
    weight is an error naming it, never a silently random-initialised row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa", output_loading_info=True
    )
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        from medisee.model.checkpoint import CheckpointError

        raise CheckpointError(
            folder,
            missing=problems.get("missing_keys", ()),
            unexpected=problems.get("unexpected_keys", ()),
            mismatched=[str(m) for m in problems.get("mismatched_keys", ())],
        )
    return model, AutoTokenizer.from_pretrained(folder)
