"""SAM / MedSAM built from segment-anything's own modules (the package, not a copy)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from medisee.config import PRESET_IMAGE_SIZES


@dataclass(frozen=True)
class SamConfig:
    image_size: int = PRESET_IMAGE_SIZES["medisee-7b"]["sam_image_size"]
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256
    random_pos_embed: bool = False  # segment-anything zero-inits it, expecting a checkpoint


SAM_VIT_B = SamConfig()
SAM_TINY = SamConfig(
    image_size=PRESET_IMAGE_SIZES["tiny"]["sam_image_size"],
    patch_size=8,
    encoder_dim=96,
    encoder_depth=2,
    encoder_heads=4,
    global_attn_indexes=(1,),
    window_size=0,
    prompt_dim=64,
    decoder_depth=2,
    decoder_mlp_dim=256,
    decoder_heads=4,
    iou_head_hidden_dim=64,
    random_pos_embed=True,
)


def build_sam(cfg: SamConfig) -> Sam:
    grid = cfg.image_size // cfg.patch_size
    encoder = ImageEncoderViT(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.encoder_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_heads,
        mlp_ratio=4,
        out_chans=cfg.prompt_dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )
    if cfg.random_pos_embed:
        torch.nn.init.trunc_normal_(encoder.pos_embed, std=0.02)
    prompt = PromptEncoder(
        embed_dim=cfg.prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_depth,
            embedding_dim=cfg.prompt_dim,
            mlp_dim=cfg.decoder_mlp_dim,
            num_heads=cfg.decoder_heads,
        ),
        transformer_dim=cfg.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
