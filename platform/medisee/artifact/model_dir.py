"""The model artifact: one self-describing directory that every consumer loads.

    <dir>/medisee.json          format version, preset, tokens, template version, base-model
                                references (+ sha256 of files), metrics summary, sha256 of every file
    <dir>/config.yaml           the resolved configuration the model was trained with
    <dir>/weights.safetensors   the trained parameters only (the base models are referenced)
    <dir>/tokenizer/            the tokenizer with [SEG] / [BBOX] added
    <dir>/verifier.json         the verifier calibration (optional)

`save_model_dir` writes one (locally or to s3://); `load_model_dir` reads one from any reference
medisee.artifact.fetch accepts; `describe_model` reads what jobs record without the weights;
`load_predictor` is the Predictor of an artifact.
"""

from __future__ import annotations

import json
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from medisee import storage, tracking
from medisee.artifact.fetch import (
    download,
    fetched,
    is_local,
    local_folder,
    read_artifact_file,
    remove_download,
)
from medisee.artifact.golden import write_golden
from medisee.config import PRESET_IMAGE_SIZES, MediSeeConfig, config_to_yaml, stored_config
from medisee.infer.predictor import Predictor
from medisee.model.build import MODEL_PARTS, build_from_config, packaged_defaults
from medisee.model.checkpoint import CheckpointError, check_sha256
from medisee.model.medisee import MediSee
from medisee.model.weights import folder_weights_sha256
from medisee.storage import StorageSettings
from medisee.verify.calibrate import CalibratedVerifier

ARTIFACT_FORMAT = "medisee-model/1"
MLFLOW_PATH = "model"  # where a training run keeps its model artifact among its MLflow artifacts
MANIFEST = "medisee.json"
WEIGHTS = "weights.safetensors"
CALIBRATION = "verifier.json"


@dataclass
class LoadedModel:
    model: MediSee
    config: MediSeeConfig
    manifest: dict
    calibration: CalibratedVerifier
    local_dir: Path
    ref: str
    run_id: str | None = None

    @property
    def sha256(self) -> str:
        """One digest for the artifact: of its weights file."""
        return self.manifest["files"][WEIGHTS]


# ----- saving ------------------------------------------------------------------------------------
def save_model_dir(
    model: MediSee,
    cfg: MediSeeConfig,
    output: str | Path,
    *,
    settings: StorageSettings | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    calibration=None,
    metrics: dict | None = None,
    source: str | None = None,
    parent: dict | None = None,
    golden: bool = True,
) -> dict:
    """Write the artifact to `output` (local or s3://); returns the manifest.

    `weights` defaults to the model's trainable parameters (pass gathered ones from a sharded run).
    `parent`: the model this one was trained from (`start_from`'s lineage), recorded in the manifest.
    `golden` stores the answer to the golden query (medisee.artifact.golden) for later load checks.
    """
    if storage.is_s3(str(output)):
        with tempfile.TemporaryDirectory() as tmp:
            manifest = save_model_dir(
                model, cfg, tmp, weights=weights, calibration=calibration, metrics=metrics, source=source,
                parent=parent, golden=golden,
            )  # fmt: skip
            storage.upload_dir(tmp, str(output), settings)
            return manifest
    from safetensors.torch import save_file

    from medisee.data.prompts import TEMPLATE_VERSION

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    weights = weights if weights is not None else model.trainable_state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / WEIGHTS))
    (folder / "config.yaml").write_text(config_to_yaml(cfg))
    model.text.tokenizer.save_pretrained(str(folder / "tokenizer"))
    if calibration is not None:
        (folder / CALIBRATION).write_text(calibration.to_json())
    text = model.text
    manifest = {
        "format": ARTIFACT_FORMAT,
        "preset": cfg.model.preset,
        "finetune": cfg.trainer.finetune,
        "template_version": TEMPLATE_VERSION,
        "chat_template": text.template,
        "candidate_tokens": text.tokenizer.convert_ids_to_tokens(list(text.candidate_ids)),
        "candidate_ids": list(text.candidate_ids),
        "image_token_id": text.image_token_id,
        "num_image_tokens": text.num_image_tokens,
        "vocab_size": len(text.tokenizer),
        "quantize": cfg.model.quantize,
        "inputs": {
            "sam_size": model.sam_size,
            "clip_size": model.clip_size,
            "padded_map": model.shares_image_encoder,  # the similarity map covers the SAM frame
        },
        "hidden_size": model.hidden_size,  # a decoder-only load needs no LM folder for it
        "base": base_references(cfg, settings),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "source": source,
        "parent": parent,
        "created_unix": int(time.time()),
    }
    manifest["files"] = file_digests(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if golden:
        add_golden_pair(folder, settings)
        manifest["files"] = file_digests(folder)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def add_golden_pair(folder: Path, settings: StorageSettings | None = None) -> None:
    """Answer the golden query with the model as saved (rebuilt from the folder, so a sharded or
    training-mode model in the caller does not matter) and store the answer."""
    loaded = load_model_dir(folder, settings=settings)
    write_golden(folder, Predictor(loaded.model, loaded.calibration, early_reject=False))


def base_references(cfg: MediSeeConfig, settings: StorageSettings | None) -> dict:
    """Where the base models come from, with the sha256 of the SAM checkpoint; for medisee-lite,
    whose base weights default to the packaged ones, also of the LM folder's weights."""
    refs = {"llava_path": cfg.model.llava_path, "sam_checkpoint": cfg.model.sam_checkpoint}
    lm_path, sam_path = base_paths(cfg)
    if sam_path:
        refs["sam_checkpoint_sha256"] = storage.sha256_of(sam_path, settings)
    if cfg.model.preset == "medisee-lite":
        refs["lm_weights_sha256"] = folder_weights_sha256(lm_path, settings)
    return refs


def base_paths(cfg: MediSeeConfig) -> tuple[str | None, str | None]:
    """(LM / LLaVA folder, SAM checkpoint) the model is built from, packaged defaults resolved."""
    if cfg.model.preset == "medisee-lite":
        return packaged_defaults(cfg.model.llava_path, cfg.model.sam_checkpoint)
    return cfg.model.llava_path, cfg.model.sam_checkpoint


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): storage.sha256(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


# ----- loading -----------------------------------------------------------------------------------
def load_model_dir(
    ref: str | Path,
    *,
    settings: StorageSettings | None = None,
    tracking_uri: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    parts: tuple[str, ...] = MODEL_PARTS,
) -> LoadedModel:
    """Load an artifact; `parts` = ("mllm",) or ("decoder",) builds only what a stage runs.

    `dtype` (e.g. torch.bfloat16) applies to the LLaVA part; the decoder side stays float32.
    """
    local, run_id, temporary = download(str(ref), settings, tracking_uri)
    try:
        loaded = load_local(local, str(ref), run_id, settings, device, dtype, parts)
    except BaseException:
        remove_download(temporary)
        raise
    if temporary is not None:  # the folder lives as long as the model (evaluate reads its golden files)
        weakref.finalize(loaded, remove_download, temporary)
    return loaded


def load_local(local: Path, ref: str, run_id, settings, device, dtype, parts) -> LoadedModel:
    manifest = read_manifest(local, ref)
    cfg = stored_config((local / "config.yaml").read_text())
    check_base_digests(cfg, manifest, settings, parts)
    tokenizer = load_tokenizer(local / "tokenizer") if "mllm" in parts else None
    model = build_from_config(
        cfg,
        settings,
        tokenizer=tokenizer,
        parts=parts,
        device=device,
        hidden_size=manifest.get("hidden_size"),
    )
    check_tokens(model, manifest, ref)
    check_shared_encoder(model, manifest, ref)
    model.load_trainable_state_dict(weights_for(model, local / WEIGHTS), source=ref)
    model.requires_grad_(False)
    model.eval().to(device)
    if dtype is not None and model.llava is not None:
        model.llava.to(dtype)
    calibration_file = local / CALIBRATION
    calibration = (
        CalibratedVerifier.from_json(calibration_file.read_text())
        if calibration_file.exists()
        else CalibratedVerifier()
    )
    return LoadedModel(model, cfg, manifest, calibration, local, ref, run_id)


def check_shared_encoder(model, manifest: dict, ref: str) -> None:
    """A medisee-lite MLLM pools the SAM-frame embedding; an artifact whose manifest does not say so
    (`inputs.padded_map`) was trained on another image input, and its projector would get tokens it
    never saw: refused rather than answering differently."""
    if model.shares_image_encoder and not manifest.get("inputs", {}).get("padded_map"):
        raise CheckpointError(
            ref,
            detail="this medisee-lite artifact's MLLM was trained on a centre-cropped image, not on the "
            "SAM frame its LM tokens now pool (manifest inputs.padded_map); train it again",
        )


def check_base_digests(
    cfg: MediSeeConfig, manifest: dict, settings: StorageSettings | None, parts=MODEL_PARTS
) -> None:
    """The base weights must be those the model was trained on (their recorded sha256)."""
    base = manifest.get("base", {})
    lm_path, sam_path = base_paths(cfg)
    if "decoder" in parts and sam_path and base.get("sam_checkpoint_sha256"):
        check_sha256(sam_path, base["sam_checkpoint_sha256"], settings)
    if "mllm" in parts and base.get("lm_weights_sha256"):
        actual = folder_weights_sha256(lm_path, settings)
        if actual != base["lm_weights_sha256"]:
            raise CheckpointError(
                lm_path,
                detail=f"LM weights sha256 {actual} differ from {base['lm_weights_sha256']} "
                "recorded in the model artifact",
            )


def describe_model(
    ref: str, *, settings: StorageSettings | None = None, tracking_uri: str | None = None
) -> dict:
    """What jobs record about a model, without fetching its weights: name, version, sha256 (of the
    weights), run id, and the verifier calibration as JSON (None when the artifact has none)."""
    ref = str(ref)
    name, version, run_id = ref, "", None
    if ref.startswith(("models:/", "runs:/")):
        client = tracking.reader_for(tracking_uri, settings)
        run_id = tracking.trained_run_id(client, ref)
        if ref.startswith("models:/"):
            entry = tracking.model_version(client, ref)
            name, version = entry.name, str(entry.version)
    if is_local(ref):
        local_folder(ref)  # a missing folder is named as such, not as a folder without a manifest
    manifest = read_artifact_file(ref, MANIFEST, settings=settings, tracking_uri=tracking_uri)
    if manifest is None:
        raise CheckpointError(ref, detail=f"no {MANIFEST}: not a MediSee model artifact")
    manifest = json.loads(manifest)
    calibration = read_artifact_file(ref, CALIBRATION, settings=settings, tracking_uri=tracking_uri)
    return {
        "ref": ref,
        "name": name,
        "version": version,
        "run_id": run_id,
        "sha256": manifest["files"][WEIGHTS],
        "manifest": manifest,
        "inputs": input_sizes(manifest),
        "calibration_json": calibration.decode() if calibration is not None else None,
    }


def input_sizes(manifest: dict) -> dict[str, int]:
    """{"sam_size", "clip_size", "padded_map"}: the image sizes the model takes, and whether its
    similarity map covers the padded SAM frame (medisee-lite) rather than the CLIP crop. Artifacts
    written before the manifest recorded them hold a preset's architecture, whose sizes the preset
    fixes."""
    if "inputs" in manifest:
        return {"padded_map": False, **manifest["inputs"]}
    sizes = PRESET_IMAGE_SIZES[manifest["preset"]]
    return {"sam_size": sizes["sam_image_size"], "clip_size": sizes["clip_image_size"], "padded_map": False}


def read_manifest(local: Path, ref: str) -> dict:
    path = local / MANIFEST
    if not path.exists():
        raise CheckpointError(ref, detail=f"no {MANIFEST}: not a MediSee model artifact")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise CheckpointError(ref, detail=f"format {manifest.get('format')!r} is not {ARTIFACT_FORMAT!r}")
    for name, digest in manifest["files"].items():
        if not (local / name).exists():
            raise CheckpointError(ref, detail=f"{name} is missing")
        if storage.sha256((local / name).read_bytes()) != digest:
            raise CheckpointError(
                ref, detail=f"{name}: sha256 differs from the manifest (modified or truncated)"
            )
    return manifest


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def check_tokens(model: MediSee, manifest: dict, ref: str) -> None:
    """The rebuilt tokenizer must give the candidate and image tokens the ids the weights were trained with."""
    if model.text is None:
        return
    recorded = manifest.get("chat_template", "mistral")  # artifacts before lite: all Mistral-instruct
    if model.text.template != recorded:
        raise CheckpointError(
            ref, detail=f"chat template {model.text.template!r} differs from the artifact's {recorded!r}"
        )
    ids = list(model.text.candidate_ids)
    if ids != manifest["candidate_ids"] or model.text.image_token_id != manifest["image_token_id"]:
        raise CheckpointError(
            ref,
            detail=f"token ids {ids} / image {model.text.image_token_id} differ from the artifact's "
            f"{manifest['candidate_ids']} / {manifest['image_token_id']}",
        )


def weights_for(model: MediSee, path: Path) -> dict[str, torch.Tensor]:
    """The artifact's weights, without those of a part this model was built without."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    skip = tuple(prefix for prefix, part in (("llava.", model.llava), ("sam.", model.sam)) if part is None)
    return {k: v for k, v in weights.items() if not (skip and k.startswith(skip))}


def load_predictor(
    ref: str | Path, *, device="cpu", dtype=None, settings=None, tracking_uri=None, judge=None, **options
) -> Predictor:
    """The Predictor of an artifact; `options` go to Predictor (mode, early_reject, ...)."""
    loaded = load_model_dir(ref, settings=settings, tracking_uri=tracking_uri, device=device, dtype=dtype)
    return Predictor(loaded.model, loaded.calibration, judge, artifact=loaded, **options)


def start_from(
    model: MediSee, cfg: MediSeeConfig, ref: str, *, settings=None, tracking_uri=None
) -> dict[str, str | None]:
    """Stage two's start: the trained weights of the artifact `ref` loaded into `model`, freshly built
    from `cfg`, which must name the artifact's preset and fine-tune mode. Returns the parent's
    identity (ref, registered name and version, run id, weights sha256) for the lineage."""
    parent = describe_model(ref, settings=settings, tracking_uri=tracking_uri)
    manifest = parent["manifest"]
    for key, ours in (("model.preset", cfg.model.preset), ("trainer.finetune", cfg.trainer.finetune)):
        theirs = manifest[key.split(".")[1]]
        if theirs != ours:
            raise CheckpointError(ref, detail=f"trained with {key}={theirs!r}, this run has {ours!r}")
    with fetched(ref, settings, tracking_uri) as (local, _):
        check_tokens(model, read_manifest(local, ref), ref)
        model.load_trainable_state_dict(weights_for(model, local / WEIGHTS), source=ref)
    return {k: parent[k] for k in ("ref", "name", "version", "run_id", "sha256")}
