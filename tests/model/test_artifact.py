"""The model artifact: save / load round trips (local, moto S3, runs:/, models:/), integrity checks,
stage-only builds, and the stored tokenizer."""

import json

import numpy as np
import pytest
import torch

from medisee.artifact.model_dir import load_model_dir, load_predictor, save_model_dir
from medisee.config import load_config
from medisee.infer import DecoderStage, MLLMStage, Predictor
from medisee.model.build import build_from_config
from medisee.model.checkpoint import CheckpointError
from medisee.verify.calibrate import CalibratedVerifier
from medisee.verify.decision import Thresholds

QUERIES = [
    "Can you segment and locate the liver in this image?",
    "Please segment and locate the spleen in this image.",
]


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", ["trainer.finetune=full", "run.seed=3"])


@pytest.fixture(scope="module")
def trained(cfg):
    """A tiny model whose trainable weights differ from any fresh build (as after training)."""
    model = build_from_config(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)


CALIBRATION = CalibratedVerifier(thresholds=Thresholds(0.3, 0.2, 0.1), bias=0.5)


def same_results(a: Predictor, b: Predictor, image) -> None:
    for x, y in zip(a.predict(image, QUERIES), b.predict(image, QUERIES), strict=True):
        assert x.box == y.box and np.array_equal(x.mask, y.mask)
        assert np.array_equal(x.similarity, y.similarity) and x.verdict == y.verdict


def test_local_round_trip(cfg, trained, image, tmp_path):
    manifest = save_model_dir(trained, cfg, tmp_path / "m", calibration=CALIBRATION, metrics={"dice": 0.5})
    assert manifest["candidate_tokens"] == ["[SEG]", "[BBOX]"] and manifest["metrics"] == {"dice": 0.5}
    assert {"weights.safetensors", "config.yaml", "verifier.json", "tokenizer/tokenizer.json"} <= set(
        manifest["files"]
    )
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.calibration == CALIBRATION and loaded.config == cfg
    same_results(Predictor(trained, CALIBRATION), load_predictor(str(tmp_path / "m")), image)


def test_a_modified_file_is_refused(cfg, trained, tmp_path):
    save_model_dir(trained, cfg, tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="sha256"):
        load_model_dir(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a MediSee model artifact"):
        load_model_dir(tmp_path)


def test_the_stored_tokenizer_is_used(cfg, trained, image, tmp_path, monkeypatch):
    """Loading never rebuilds the vocabulary from template text."""
    save_model_dir(trained, cfg, tmp_path / "m")
    import medisee.model.build as build

    def refuse():
        raise AssertionError("the tiny tokenizer must come from the artifact")

    monkeypatch.setattr(build, "build_tiny_tokenizer", refuse)
    loaded = load_model_dir(tmp_path / "m")
    assert list(loaded.model.text.candidate_ids) == list(trained.text.candidate_ids)
    same_results(Predictor(trained), Predictor(loaded.model), image)


def test_stage_only_builds_equal_the_whole_model(cfg, trained, image, tmp_path):
    save_model_dir(trained, cfg, tmp_path / "m")
    mllm_only = load_model_dir(tmp_path / "m", parts=("mllm",)).model
    decoder_only = load_model_dir(tmp_path / "m", parts=("decoder",)).model
    assert mllm_only.sam is None and decoder_only.llava is None
    whole = Predictor(trained, early_reject=False).predict(image, QUERIES)
    encodings = MLLMStage(mllm_only)([image], [QUERIES])
    decoded = DecoderStage(decoder_only)([image], [0, 0], np.stack([e.candidates for e in encodings]))
    for want, enc, dec in zip(whole, encodings, decoded, strict=True):
        assert np.array_equal(want.similarity, enc.similarity)
        assert want.box == dec.box and np.array_equal(want.mask, dec.mask)


@pytest.mark.integration
def test_s3_round_trip(cfg, trained, image, s3_bucket):
    settings, root = s3_bucket
    save_model_dir(trained, cfg, f"{root}/models/m1", settings=settings, calibration=CALIBRATION)
    loaded = load_predictor(f"{root}/models/m1", settings=settings)
    assert loaded.verifier.calibration == CALIBRATION
    same_results(Predictor(trained, CALIBRATION), loaded, image)


@pytest.mark.integration
def test_runs_and_models_references(cfg, trained, image, tmp_path):
    """Through MLflow's local store (the platform's default layout: artifacts next to the database)."""
    from medisee import tracking

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking_cfg = load_config("tiny", [f"tracking.uri={tracking_uri}"]).tracking
    client = tracking.configure(tracking_cfg)
    location = tracking.resolve_artifact_location(tracking_cfg)
    assert location == str(tmp_path / "mlartifacts")
    run_id = tracking.start_or_resume_run(client, tracking_cfg, "artifact-test")
    save_model_dir(trained, cfg, tmp_path / "m", calibration=CALIBRATION)
    tracking.log_artifact_dir(client, run_id, tmp_path / "m", "model")
    version = tracking.register_model(client, run_id, "model", "artifact-test", "candidate")
    assert client.get_run(run_id).info.artifact_uri.startswith(location)
    expected = Predictor(trained, CALIBRATION)
    for ref in (
        f"runs:/{run_id}/model",
        "models:/artifact-test@candidate",
        f"models:/artifact-test/{version}",
    ):
        loaded = load_predictor(ref, tracking_uri=tracking_uri)
        assert loaded.artifact.run_id == run_id
        same_results(expected, loaded, image)


def test_an_experiment_under_rays_temp_directory_is_named_in_a_warning(tmp_path):
    from medisee import tracking

    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_experiment("old", artifact_location="/tmp/ray/session_2026-01-01_00-00-00_1/artifacts/x")
    with pytest.warns(UserWarning, match="'old'.*session_2026-01-01"):
        tracking.get_or_create_experiment(client, "old")
    assert tracking.is_transient_location("mlruns") and not tracking.is_transient_location("s3://b/a")


def test_manifest_records_base_model_digests(cfg, trained, tmp_path):
    sam_file = tmp_path / "sam.pth"
    torch.save(trained.sam.state_dict(), sam_file)
    with_sam = cfg.model_copy(deep=True)
    with_sam.model.sam_checkpoint = str(sam_file)
    manifest = save_model_dir(trained, with_sam, tmp_path / "m")
    import hashlib

    assert manifest["base"]["sam_checkpoint_sha256"] == hashlib.sha256(sam_file.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "m" / "medisee.json").read_text()) == manifest


def test_the_manifest_holds_the_models_input_sizes_and_jobs_take_them_from_it(cfg, trained, tmp_path):
    from medisee.artifact.model_dir import describe_model, input_sizes
    from medisee.scoring.pipeline import check_job_names_the_model
    from medisee.scoring.queries import QuerySpecError

    save_model_dir(trained, cfg, tmp_path / "m", golden=False)
    described = describe_model(str(tmp_path / "m"))
    assert (
        described["inputs"]
        == {"sam_size": trained.sam_size, "clip_size": trained.clip_size, "padded_map": False}
        == {"sam_size": 128, "clip_size": 128, "padded_map": False}
    )
    assert described["manifest"]["hidden_size"] == trained.hidden_size
    # an artifact written before the manifest recorded them: the preset's architecture fixes them
    assert input_sizes({"preset": "medisee-7b"}) == {"sam_size": 1024, "clip_size": 336, "padded_map": False}

    check_job_names_the_model(load_config(None), described)  # no model section: the artifact's facts
    check_job_names_the_model(load_config("tiny"), described)
    with pytest.raises(QuerySpecError, match=r"model\.preset='medisee-7b' contradicts .* a 'tiny' artifact"):
        check_job_names_the_model(load_config(None, ["model.preset=medisee-7b"]), described)


def test_stage_two_starts_from_an_artifacts_weights_and_names_it_as_parent(cfg, trained, tmp_path):
    from safetensors.torch import load_file

    from medisee.artifact.model_dir import describe_model, start_from

    save_model_dir(trained, cfg, tmp_path / "stage1", golden=False)
    fresh = build_from_config(cfg)
    parent = start_from(fresh, cfg, str(tmp_path / "stage1"))
    saved = load_file(str(tmp_path / "stage1" / "weights.safetensors"))
    state = fresh.trainable_state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert (
        parent["ref"] == str(tmp_path / "stage1")
        and parent["sha256"] == describe_model(parent["ref"])["sha256"]
    )

    manifest = save_model_dir(fresh, cfg, tmp_path / "stage2", parent=parent, golden=False)
    assert manifest["parent"] == parent
    lora = load_config("tiny", ["trainer.finetune=lora", "run.seed=3"])
    with pytest.raises(CheckpointError, match=r"trainer\.finetune='full', this run has 'lora'"):
        start_from(build_from_config(lora), lora, str(tmp_path / "stage1"))
