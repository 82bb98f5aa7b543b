"""Checkpoint formats that users already have.

- transformers LLaVA directory (config.json + weights + tokenizer files): `load_llava_dir`
- SAM / MedSAM `.pth` state dict: `load_sam_checkpoint` (map_location cpu, weights_only)
- the official MediSee release (`model.router_seg`, `model.bbox_decoder.layers.{0,1,2}`,
  `model.text_hidden_fcs`, `model.visual_model`, the LM under its original LLaVA-Mistral names, LoRA
  merged or `.base_layer` wrapped): `convert_official_state_dict` (also `medisee convert-checkpoint`)

A trained MediSee is a model artifact (medisee.artifact); a training run's own checkpoints are
written and read by medisee.train.

Paths may be local or s3:// (through medisee.storage). A missing or mismatched checkpoint is an
error naming the file and the first offending keys, never a silent random init.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
from pathlib import Path

import torch

from medisee import storage
from medisee.storage import StorageSettings

CONVERTED_FORMAT = "medisee-full/1"


class CheckpointError(RuntimeError):
    def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), detail: str = ""):
        parts = [f"checkpoint {source} does not fit the model"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                parts.append(
                    f"{label} ({len(keys)}): {', '.join(list(keys)[:5])}{' ...' if len(keys) > 5 else ''}"
                )
        if detail:
            parts.append(detail)
        super().__init__("; ".join(parts))


def read_torch(uri: str, settings: StorageSettings | None = None) -> dict:
    try:
        data = storage.read_bytes(uri, settings)
    except (OSError, FileNotFoundError) as exc:
        raise CheckpointError(uri, detail=f"cannot read: {exc}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(uri, detail=f"not a torch checkpoint: {str(exc)[:200]}") from None


def write_torch(obj: dict, uri: str, settings: StorageSettings | None = None) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(uri, buf.getvalue(), settings)


def load_state_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(source, missing, unexpected, mismatched)
    module.load_state_dict(state, strict=True)


def check_sha256(uri: str, expected: str, settings: StorageSettings | None = None) -> None:
    """The file at `uri` must be the one recorded (a base checkpoint replaced since training is refused)."""
    try:
        actual = storage.sha256_of(uri, settings)
    except OSError as exc:
        raise CheckpointError(uri, detail=f"cannot read: {exc}") from None
    if actual != expected:
        raise CheckpointError(
            uri, detail=f"sha256 {actual} differs from {expected} recorded in the model artifact"
        )


def load_sam_checkpoint(sam: torch.nn.Module, uri: str, settings: StorageSettings | None = None) -> None:
    state = read_torch(uri, settings)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    load_state_strict(sam, state, uri)


def local_dir(uri: str, settings: StorageSettings | None = None) -> tuple[Path, bool]:
    """A local directory holding `uri`'s files, and whether it is a temporary download to remove."""
    if not storage.is_s3(uri):
        path = Path(uri.removeprefix("file://"))
        if not (path / "config.json").exists():
            raise CheckpointError(uri, detail="no config.json: not a transformers model directory")
        return path, False
    if not storage.exists(storage.join(uri, "config.json"), settings):
        raise CheckpointError(uri, detail="no config.json: not a transformers model directory")
    target = Path(tempfile.mkdtemp(prefix="medisee-llava-"))
    try:
        storage.download_dir(uri, target, settings)
    except BaseException as exc:
        shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, storage.UnsafeKey):
            raise CheckpointError(uri, detail=f"refused: {exc}") from None
        raise
    return target, True


def load_llava_dir(uri: str, settings: StorageSettings | None = None, dtype: torch.dtype = torch.float32):
    """(LlavaForConditionalGeneration, tokenizer) from a transformers LLaVA directory, weights in `dtype`.

    A download from object storage is removed once loaded (the weights are in memory then).
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    path, temporary = local_dir(uri, settings)
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(
            str(path), torch_dtype=dtype, attn_implementation="sdpa"
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(uri, detail=f"{type(exc).__name__}: {str(exc)[:300]}") from None
    finally:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
    return llava, tokenizer


# Official MediSee release key names -> ours. Applied in order, first match wins.
OFFICIAL_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.visual_model\.", "sam."),
    (r"^model\.text_hidden_fcs\.0\.0\.", "text_projection.fc1."),
    (r"^model\.text_hidden_fcs\.0\.2\.", "text_projection.fc2."),
    (r"^model\.router_seg\.", "seg_router."),
    (r"^model\.router_box\.", "box_router."),
    (r"^model\.bbox_decoder\.", "box_decoder."),  # layers.{0,1,2}: the same ModuleList naming
    (r"^model\.mm_projector\.0\.", "llava.model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "llava.model.multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.", "llava.model.vision_tower."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"llava.model.language_model.\1."),
    (r"^lm_head\.", "llava.lm_head."),
)


def rename_official_keys(state: dict[str, torch.Tensor], extra_renames=()) -> dict[str, torch.Tensor]:
    """Official key names -> ours; `base_model.model.` and `.base_layer` are stripped."""
    rules = [(re.compile(a), b) for a, b in (*extra_renames, *OFFICIAL_RENAMES)]
    out = {}
    for key, value in state.items():
        new = key.replace(".base_layer", "").removeprefix("base_model.model.")
        for pattern, repl in rules:
            if pattern.search(new):
                new = pattern.sub(repl, new, count=1)
                break
        out[new] = value
    return out


def reorder_release_routers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release calls `router(e_bbox, e_seg)`: its gate sees cat([e_[BBOX], e_[SEG]]) and output 0
    weights [BBOX]. Ours sees [SEG] first: swap the two d-wide input blocks of the first Linear and
    the two rows of the last one, which gives the same fused states."""
    out = dict(state)
    for router in ("seg_router", "box_router"):
        first = out.get(f"{router}.gate.0.weight")
        if first is not None:
            d = first.shape[1] // 2
            out[f"{router}.gate.0.weight"] = torch.cat([first[:, d:], first[:, :d]], 1)
        for name in ("weight", "bias"):
            last = out.get(f"{router}.gate.2.{name}")
            if last is not None:
                if last.shape[0] != 2:
                    raise CheckpointError(
                        "official release", detail=f"{router} has {last.shape[0]} outputs, not 2"
                    )
                out[f"{router}.gate.2.{name}"] = last.flip(0)
    return out


def convert_official_state_dict(state: dict[str, torch.Tensor], extra_renames=()) -> dict[str, torch.Tensor]:
    """An official-release state dict in our names and conventions: renamed, LoRA merged, routers reordered."""
    return reorder_release_routers(merge_lora(rename_official_keys(state, extra_renames)))


def load_official_release(
    model: torch.nn.Module, uri: str, settings: StorageSettings | None = None, extra_renames=()
) -> list[str]:
    """Load an official MediSee release into `model`; returns the keys the release did not cover.

    LoRA adapter weights (`lora_A` / `lora_B`) in the release are merged into the base weights, and
    the embed_tokens / lm_head rows of the tokens it added move to our tokenizer's ids for them
    (`release_token_rows`). Every key of the release must land on a parameter of the model with the
    same shape.
    """
    payload = read_torch(uri, settings)
    if payload.get("format") == CONVERTED_FORMAT:
        state = payload["state_dict"]
    else:
        state = convert_official_state_dict(payload.get("state_dict", payload), extra_renames)
    state = with_our_token_rows(state, model, uri)
    own = model.state_dict()
    own = {k.replace(".base_layer", ""): k for k in own}
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(model.state_dict()[own[k]].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(model.state_dict()[own[k]].shape)
    ]
    if unexpected or mismatched:
        raise CheckpointError(uri, unexpected=unexpected, mismatched=mismatched)
    model.load_state_dict({own[k]: v for k, v in state.items()}, strict=False)
    return [k for k in own if k not in state]


# The reference appends these to its base vocabulary with `add_tokens`, in this order, and resizes
# embed_tokens / lm_head to exactly that (V + 2 rows). It has no `<image>` entry (it marks image
# positions with the index -200), where our tokenizer may add one.
RELEASE_ADDED_TOKENS = ("[SEG]", "[BBOX]")
TOKEN_ROW_KEYS = {
    "llava.model.language_model.embed_tokens.weight": "model.embed_tokens.weight",
    "llava.lm_head.weight": "lm_head.weight",
}


def base_vocabulary_size(tokenizer) -> int:
    """How many tokens the tokenizer had before any were added (`add_tokens` / `add_special_tokens`)."""
    return int(tokenizer.vocab_size)


def with_our_token_rows(
    state: dict[str, torch.Tensor], model, source: str = "official release"
) -> dict[str, torch.Tensor]:
    """The release's embedding and LM-head matrices in our vocabulary order (see `release_token_rows`)."""
    if getattr(model, "text", None) is None:
        return state
    tokenizer = model.text.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(RELEASE_ADDED_TOKENS))
    token_ids = dict(zip(RELEASE_ADDED_TOKENS, ids, strict=True))
    base = base_vocabulary_size(tokenizer)
    own = model.state_dict()
    return {
        key: release_token_rows(value, own[key], token_ids, base, key, source)
        if key in TOKEN_ROW_KEYS and key in own
        else value
        for key, value in state.items()
    }


def release_token_rows(
    release: torch.Tensor,
    own: torch.Tensor,
    token_ids: dict[str, int],
    base: int,
    key: str,
    source: str = "official release",
) -> torch.Tensor:
    """Our matrix from the release's, whose rows are `base` base-vocabulary tokens then
    RELEASE_ADDED_TOKENS: rows 0..base-1 as they are, the row of each added token at our id for it.

    Rows the release has no token for (our `<image>`, extra candidate tokens, padding) keep `own`'s,
    i.e. what our builder gave them (the LLaVA directory's row, or the resize's initialisation).
    """
    ids = [token_ids[token] for token in RELEASE_ADDED_TOKENS]
    problem = token_rows_problem(release, own, ids, base)
    if problem:
        name = TOKEN_ROW_KEYS.get(key, key)
        raise CheckpointError(
            source,
            mismatched=[f"{name} (ours {key}): {tuple(release.shape)} vs {tuple(own.shape)}"],
            detail=f"{problem}; the release's rows are {list(RELEASE_ADDED_TOKENS)} after its base "
            f"vocabulary, our tokenizer puts those tokens at {ids}",
        )
    rows = own.detach().clone()
    rows[:base] = release[:base]
    for offset, token_id in enumerate(ids):
        rows[token_id] = release[base + offset]
    return rows


def token_rows_problem(release: torch.Tensor, own: torch.Tensor, ids: list[int], base: int) -> str:
    """Why the release's token rows cannot be mapped onto ours ("" when they can)."""
    release_base = release.shape[0] - len(RELEASE_ADDED_TOKENS)
    if release_base != base:
        return (
            f"the release's base vocabulary has {release_base} tokens, our base tokenizer {base}: "
            "not the release's base tokenizer"
        )
    if release.shape[1:] != own.shape[1:]:
        return f"rows of width {tuple(release.shape[1:])} vs ours {tuple(own.shape[1:])}"
    if min(ids) < base or max(ids) >= own.shape[0]:
        return f"our ids for the added tokens must lie in {base}..{own.shape[0] - 1}"
    if len(set(ids)) != len(ids):
        return "our tokenizer gives two added tokens the same id"
    return ""


def convert_official_file(
    src: str, dst: str, settings: StorageSettings | None = None, extra_renames=()
) -> int:
    """`medisee convert-checkpoint`: convert an official release once; returns the tensor count.

    embed_tokens / lm_head keep the release's vocabulary order: `load_official_release` maps their
    rows to the ids of the tokenizer it loads into (which a converted file does not know).
    """
    payload = read_torch(src, settings)
    state = convert_official_state_dict(payload.get("state_dict", payload), extra_renames)
    write_torch({"format": CONVERTED_FORMAT, "source": src, "state_dict": state}, dst, settings)
    return len(state)


def merge_lora(state: dict[str, torch.Tensor], scaling: float | None = None, alpha: float = 16, r: int = 8):
    """Fold `X.lora_A.default.weight` / `X.lora_B.default.weight` into `X.weight` (W += s·B·A)."""
    scale = scaling if scaling is not None else alpha / r
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for key in state:
        if ".lora_A." in key:
            base = key.split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            out[f"{base}.weight"] = out[f"{base}.weight"] + scale * (state[b_key] @ state[key])
    return out
