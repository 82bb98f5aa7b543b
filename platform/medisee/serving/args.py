"""The application's typed arguments (what `build_app` takes and `serve/config.yaml` carries)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from medisee.config import MAX_DICOM_BYTES, MAX_IMAGE_PIXELS


class StageOptions(BaseModel):
    """Replicas and resources of one model deployment, and its dynamic batching."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    autoscaling: dict | None = None  # Serve's autoscaling_config; replaces num_replicas when set
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # waited only when other requests are in flight
    max_concurrent_batches: int = Field(1, ge=1)
    max_ongoing_requests: int | None = None  # default: max_batch_size × max_concurrent_batches × 2
    max_queued_requests: int = Field(64, ge=1)

    def ongoing(self) -> int:
        return self.max_ongoing_requests or self.max_batch_size * self.max_concurrent_batches * 2


class IngressOptions(BaseModel):
    """The ingress is async: a request waiting for its body or for the graph costs a coroutine, so
    Serve lets many in (`max_ongoing_requests`) and the app itself admits `max_in_flight` into the
    graph, answering the rest with its JSON 503 + Retry-After before Serve's queue would refuse them
    with a bare one. /healthz then always finds a slot, even while slow clients hold connections."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(64, ge=1)
    max_in_flight: int = Field(32, ge=1)  # requests past their body, decoding or in the graph
    decode_threads: int = Field(4, ge=1)  # image decoding and response rendering, off the event loop


class AppArgs(BaseModel):
    """`build_app(AppArgs(model="models:/medisee@production"))`; every field has a default but the model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str  # the version every model replica loads at start (its base)
    served: str | None = (
        None  # the version answered by default (default: `model`); a config update switches it
    )
    extra_models: list[str] = Field(default_factory=list)  # versions a request may ask for (multiplexing)
    tracking_uri: str | None = None
    storage_endpoint: str | None = None
    mode: str = "teacher_forced"
    max_new_tokens: int = Field(48, ge=1)
    early_reject: bool = True
    mask_threshold: float = 0.0
    batching: bool = True  # off: every request runs alone (the benchmark's comparison)
    multiplexed_models_per_replica: int = Field(4, ge=1)  # versions' weights one model replica keeps
    mllm: StageOptions = Field(default_factory=StageOptions)
    decoder: StageOptions = Field(default_factory=StageOptions)
    verifier: StageOptions = Field(default_factory=lambda: StageOptions(num_cpus=0.1, max_batch_size=16))
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    request_timeout_s: float = Field(30.0, gt=0)
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, gt=0)
    max_image_bytes: int = Field(MAX_DICOM_BYTES, gt=0)  # a DICOM's pixel data decoded (header), all frames
    body_timeout_s: float = Field(60.0, gt=0)  # the whole body must arrive within this
    min_body_bytes_per_s: float = Field(8192.0, ge=0)  # after the first 5 s; 0: no minimum rate
    max_render_side: int = Field(1024, ge=16)  # longest side of a returned overlay / heatmap
    ready_ttl_s: float = Field(15.0, ge=0)  # /readyz re-runs its check when the last one is older
    max_queries: int = Field(16, ge=1)
    max_query_chars: int = Field(500, ge=1)
    max_boxes: int = Field(16, ge=1)  # boxes of one box-prompt request (`box`: a list of boxes)
    api_keys_env: str = "MEDISEE_API_KEYS"  # comma-separated keys
    api_keys_file: str | None = None  # one key per line; re-read when it changes (rotation)
    allow_anonymous: bool = False  # without keys the ingress refuses to start unless this is set
    log_payloads: bool = False  # image bytes and query text never reach the logs unless this is on
    judge_base_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    judge_api_key_env: str = "OPENAI_API_KEY"

    @classmethod
    def from_env(cls) -> AppArgs:
        """For the module-level app of serve/app.py: $MEDISEE_SERVE_ARGS (JSON of these fields), else the
        model from $MEDISEE_SERVE_MODEL and the tracking server from $MLFLOW_TRACKING_URI."""
        if os.environ.get("MEDISEE_SERVE_ARGS"):
            return cls.model_validate_json(os.environ["MEDISEE_SERVE_ARGS"])
        return cls(
            model=os.environ.get("MEDISEE_SERVE_MODEL", "models:/medisee@production"),
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        )

    def verifier_config(self):
        from medisee.config import VerifierConfig

        return VerifierConfig(
            judge_base_url=self.judge_base_url,
            judge_model=self.judge_model,
            judge_api_key_env=self.judge_api_key_env,
        )
