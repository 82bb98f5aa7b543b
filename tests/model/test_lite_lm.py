"""SmolLM2 converted from its GGUF equals transformers' own GGUF load, and answers as the real model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medisee.model.weights import converted_lm, smollm2_gguf

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Which organ produces bile?"}]


def chat_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


@torch.no_grad()
def test_converted_logits_equal_transformers_gguf_load(lite_lm_folder):
    torch.set_num_threads(2)
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = AutoModelForCausalLM.from_pretrained(str(lite_lm_folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(lite_lm_folder))
    ids = chat_ids(tokenizer)
    assert torch.equal(ids, chat_ids(reference_tokenizer))
    assert ids.shape[1] > 10
    difference = (ours(ids).logits - reference(ids).logits).abs().max().item()
    assert difference <= 1e-4, difference
    assert "quantization_config" not in json.loads((lite_lm_folder / "config.json").read_text())


@torch.no_grad()
def test_converted_model_names_the_liver(lite_lm_folder):
    model = AutoModelForCausalLM.from_pretrained(str(lite_lm_folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(lite_lm_folder))
    ids = chat_ids(tokenizer)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "liver" in tokenizer.decode(out[0, ids.shape[1] :]).lower()


def test_conversion_is_reused_and_keyed_by_the_files_sha256(lite_lm_folder):
    weights = lite_lm_folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = converted_lm(cache_dir=lite_lm_folder.parents[1])
    assert again == lite_lm_folder and weights.stat().st_mtime_ns == before
    source = json.loads((lite_lm_folder / "medisee-source.json").read_text())
    assert lite_lm_folder.name == source["sha256"][:16]
    assert not list(lite_lm_folder.parent.glob(".converting-*"))
