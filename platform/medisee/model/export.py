"""`medisee export`: a trained MediSee as standard files that other tools read without this package.

    <dir>/llava/              transformers LLaVA directory (LoRA merged, sharded safetensors) + tokenizer
    <dir>/sam.safetensors     SAM / MedSAM in segment-anything's `Sam` state-dict names
    <dir>/heads.safetensors   seg_router, box_router, text_projection, box_decoder
    <dir>/export.json         format, preset, tokens, SAM config, sha256 of every file, key report

medisee-lite exports in its own tools' layouts instead (medisee.model.export_lite).

`load_export` rebuilds the model and fails on any sha256 difference or missing / unexpected /
shape-mismatched key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from medisee.model.build import PRESETS
from medisee.model.checkpoint import CheckpointError, load_llava_dir
from medisee.model.medisee import MediSee
from medisee.model.mllm import num_image_tokens
from medisee.model.sam import SamConfig, build_sam
from medisee.model.text import IMAGE_TOKEN, TextSpec, candidate_tokens

EXPORT_FORMAT = "medisee-export/1"
MANIFEST = "export.json"
LLAVA_DIR = "llava"
SAM_FILE = "sam.safetensors"
HEADS_FILE = "heads.safetensors"
HEADS = ("seg_router", "box_router", "text_projection", "box_decoder")
PREFIXES = ("module.", "model.")  # DDP / wrapper prefixes dropped from SAM and head keys on load


def export_model(model: MediSee, output_dir: str | Path, *, max_shard_size: str | int = "2GB") -> dict:
    """Write the export to a new (or empty) local directory; returns the manifest written as export.json."""
    if model.llava is None or model.sam is None or model.text is None:
        raise ValueError("export needs a model built with both parts (mllm and decoder)")
    preset = getattr(model, "preset", None)
    if preset not in PRESETS:
        raise ValueError(f"the model's preset {preset!r} is not one of {sorted(PRESETS)}")
    folder = Path(output_dir)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty")
    if preset == "medisee-lite":  # its own layouts: a Llama folder and a LiteMedSAM .pth
        from medisee.model.export_lite import export_lite

        folder.mkdir(parents=True, exist_ok=True)
        return _write_manifest(folder, export_lite(model, folder))
    spec = model.text
    tokens = candidate_tokens(len(spec.candidate_ids))
    ids = list(spec.candidate_ids)
    check_tokens(spec.tokenizer, tokens, ids, spec.image_token_id, "the model's tokenizer")

    paths = {"llava": folder / LLAVA_DIR, "sam": folder / SAM_FILE, "heads": folder / HEADS_FILE}
    llava_state, merged = merged_llava_state(model.llava)
    model.llava.save_pretrained(paths["llava"], state_dict=llava_state, max_shard_size=max_shard_size)
    spec.tokenizer.save_pretrained(paths["llava"])
    save_file(_cpu(model.sam.state_dict()), str(paths["sam"]))
    save_file(_cpu(heads_of(model).state_dict()), str(paths["heads"]))

    keys = {
        "llava": llava_report(model.llava, llava_state, paths["llava"]),
        "sam": file_report(model.sam, paths["sam"]),
        "heads": file_report(heads_of(model), paths["heads"]),
    }
    for part, report in keys.items():
        raise_on(report, f"{paths[part]} (just written)")
    keys["llava"]["lora_merged"] = merged
    manifest = {
        "format": EXPORT_FORMAT,
        "preset": preset,
        "candidate_tokens": tokens,
        "candidate_ids": ids,
        "image_token": IMAGE_TOKEN,
        "image_token_id": spec.image_token_id,
        "num_image_tokens": spec.num_image_tokens,
        "sam_config": asdict(PRESETS[preset].sam),
        "files": file_digests(folder),
        "keys": keys,
    }
    return _write_manifest(folder, manifest)


def _write_manifest(folder: Path, manifest: dict) -> dict:
    text = json.dumps(manifest, indent=2)
    (folder / MANIFEST).write_text(text)
    return json.loads(text)  # exactly what the file holds (lists, not tuples)


def load_export(path: str | Path) -> MediSee:
    """Rebuild the model from an export directory (eval mode, frozen)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if manifest["preset"] == "medisee-lite":
        from medisee.model.export_lite import load_lite_export

        return load_lite_export(folder, manifest)
    llava, tokenizer = load_llava_dir(str(folder / LLAVA_DIR))
    raise_on(llava_report(llava, llava.state_dict(), folder / LLAVA_DIR), str(folder / LLAVA_DIR))
    ids = manifest["candidate_ids"]
    check_tokens(tokenizer, manifest["candidate_tokens"], ids, manifest["image_token_id"], str(folder))
    stored = manifest["sam_config"]
    sam_config = SamConfig(**{**stored, "global_attn_indexes": tuple(stored["global_attn_indexes"])})
    sam = build_sam(sam_config)
    load_strict(sam, folder / SAM_FILE)
    text = TextSpec(tokenizer, manifest["image_token_id"], ids, num_image_tokens(llava))
    hidden = llava.config.text_config.hidden_size
    model = MediSee(llava, sam, text, hidden, len(ids), sam_config.prompt_dim)
    load_strict(heads_of(model), folder / HEADS_FILE)
    model.preset = manifest["preset"]
    return model.requires_grad_(False).eval()


# ----- LoRA -----------------------------------------------------------------------------------------
def merged_llava_state(llava: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LLaVA's state dict with each LoRA layer folded into its base weight (W + s·B·A), and the merged
    layers' names. Unmerged tensors are the model's own (not copied); the model is left as it is."""
    from peft.tuners.lora import LoraLayer

    state = {k.replace(".base_layer.", "."): v for k, v in llava.state_dict().items() if ".lora_" not in k}
    merged = []
    for name, module in llava.named_modules():
        if isinstance(module, LoraLayer):
            state[f"{name}.weight"] = merged_weight(module)
            merged.append(name)
    return state, merged


@torch.no_grad()
def merged_weight(layer) -> torch.Tensor:
    base = layer.get_base_layer().weight
    if layer.disable_adapters:
        return base.detach()
    # adapters already merged by peft live in the base weight
    pending = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    if any(layer.lora_variant.get(a) for a in pending):
        raise ValueError("LoRA variants (DoRA, ...) are not supported by export")
    weight = base.float()
    for adapter in pending:
        weight = weight + layer.get_delta_weight(adapter).float()
    return weight.to(base.dtype)


# ----- tokens -----------------------------------------------------------------------------------------
def check_tokens(tokenizer, tokens: list[str], ids: list[int], image_token_id: int, source: str) -> None:
    """Each candidate token must encode to exactly one added token with the id the weights expect."""
    added = set(tokenizer.get_added_vocab().values())
    for token, expected in zip(tokens, ids, strict=True):
        got = tokenizer(token, add_special_tokens=False)["input_ids"]
        if got != [expected] or expected not in added:
            raise CheckpointError(
                source,
                detail=f"candidate token {token!r} encodes to {got}; expected the single added token {expected}",
            )
    got = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if got != [image_token_id]:
        raise CheckpointError(source, detail=f"{IMAGE_TOKEN} encodes to {got}, not [{image_token_id}]")


# ----- key reports ----------------------------------------------------------------------------------
def heads_of(model: MediSee) -> nn.ModuleDict:
    """The heads under their MediSee attribute names (the ModuleDict shares the model's modules)."""
    return nn.ModuleDict({name: getattr(model, name) for name in HEADS})


def key_report(expected: dict[str, tuple], found: dict[str, tuple]) -> dict:
    return {
        "tensors": len(found),
        "missing": [k for k in expected if k not in found],
        "unexpected": [k for k in found if k not in expected],
        "mismatched": [
            f"{k}: {found[k]} vs {expected[k]}" for k in found if k in expected and found[k] != expected[k]
        ],
    }


def raise_on(report: dict, source: str) -> None:
    if report["missing"] or report["unexpected"] or report["mismatched"]:
        raise CheckpointError(source, report["missing"], report["unexpected"], report["mismatched"])


def normalise(key: str) -> str:
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key


def file_shapes(files: list[Path], rename=lambda k: k) -> dict[str, tuple]:
    """Key -> shape of every tensor in safetensors files (headers only)."""
    shapes = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                shapes[rename(key)] = tuple(handle.get_slice(key).get_shape())
    return shapes


def file_report(module: nn.Module, path: Path) -> dict:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return key_report(expected, file_shapes([path], normalise))


def load_strict(module: nn.Module, path: Path) -> None:
    raise_on(file_report(module, path), str(path))
    module.load_state_dict({normalise(k): v for k, v in load_file(str(path)).items()})


def llava_report(llava: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> dict:
    """The LLaVA files' keys against `state` in the names transformers writes (its legacy layout)."""
    from transformers.core_model_loading import revert_weight_conversion

    on_disk = revert_weight_conversion(llava, {k: v.to("meta") for k, v in state.items()})
    expected = {k: tuple(v.shape) for k, v in on_disk.items()}
    return key_report(expected, file_shapes(sorted(folder.glob("*.safetensors"))))


# ----- files ------------------------------------------------------------------------------------------
def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): _sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise CheckpointError(str(folder), detail=f"no {MANIFEST}: not a MediSee export")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            str(folder), detail=f"format {manifest.get('format')!r} is not {EXPORT_FORMAT!r}"
        )
    for name, digest in manifest["files"].items():
        if not (folder / name).is_file():
            raise CheckpointError(str(folder), detail=f"{name} is missing")
        if _sha256(folder / name) != digest:
            raise CheckpointError(
                str(folder), detail=f"{name}: sha256 differs from {MANIFEST} (modified or truncated)"
            )
    return manifest
