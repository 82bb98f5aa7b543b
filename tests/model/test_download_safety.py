"""Downloads of artifacts and base checkpoints (moto S3, MLflow): every file lands inside the download's
temp folder, the folder is removed afterwards, and the SAM base checkpoint must be the recorded one."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest
import torch

from medisee import storage
from medisee.artifact.model_dir import describe_model, load_model_dir, save_model_dir
from medisee.config import load_config
from medisee.model.build import build_from_config
from medisee.model.checkpoint import CheckpointError, load_llava_dir

pytestmark = pytest.mark.integration


@pytest.fixture()
def temp_root(tmp_path, monkeypatch) -> Path:
    """The folder `tempfile` hands out temp folders under, for this test alone: what is left there
    afterwards is what a download left behind."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("base") / "sam.pth"


@pytest.fixture(scope="module")
def cfg(sam_file):
    """A tiny preset whose SAM part is built from a base checkpoint file (as the real presets are)."""
    plain = load_config("tiny", ["run.seed=5"])
    torch.save(build_from_config(plain).sam.state_dict(), sam_file)
    return load_config("tiny", ["run.seed=5", f"model.sam_checkpoint={sam_file}"])


@pytest.fixture(scope="module")
def artifact(cfg, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifact") / "m"
    save_model_dir(build_from_config(cfg).eval(), cfg, folder)
    return folder


def upload_with_extra_key(artifact: Path, s3_bucket, key: str) -> str:
    """The artifact on S3 plus one object at `key` (relative to the artifact's prefix, not normalised)."""
    settings, root = s3_bucket
    prefix = f"{root}/models/m1"
    storage.upload_dir(artifact, prefix, settings)
    if key:
        bucket = root.removeprefix("s3://")
        storage.boto3_client(settings).put_object(Bucket=bucket, Key=f"models/m1/{key}", Body=b"planted")
    return prefix


def test_an_s3_download_is_removed_with_the_model(artifact, s3_bucket, temp_root):
    settings, _ = s3_bucket
    loaded = load_model_dir(upload_with_extra_key(artifact, s3_bucket, ""), settings=settings)
    assert loaded.local_dir.parent == temp_root and (loaded.local_dir / "medisee.json").is_file()
    del loaded
    gc.collect()
    assert leftovers(temp_root) == []


@pytest.mark.parametrize(
    "key", ["../planted.txt", "tokenizer/../../planted.txt", "a//planted.txt", "./planted.txt"]
)
def test_an_s3_key_that_leaves_the_download_folder_is_refused(artifact, s3_bucket, temp_root, key):
    settings, _ = s3_bucket
    prefix = upload_with_extra_key(artifact, s3_bucket, key)
    with pytest.raises(CheckpointError, match="refused: object key"):
        load_model_dir(prefix, settings=settings)
    assert leftovers(temp_root) == [], "nothing written, the download folder removed"
    assert not (temp_root.parent / "planted.txt").exists()


def test_a_failed_s3_load_removes_its_download(artifact, s3_bucket, temp_root):
    settings, root = s3_bucket
    prefix = upload_with_extra_key(artifact, s3_bucket, "")
    storage.write_bytes(f"{prefix}/weights.safetensors", b"not the weights", settings)
    with pytest.raises(CheckpointError, match="sha256"):
        load_model_dir(prefix, settings=settings)
    assert leftovers(temp_root) == []


def test_mlflow_downloads_are_removed(artifact, tmp_path, temp_root):
    from medisee import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking_cfg = load_config("tiny", [f"tracking.uri={uri}"]).tracking
    client = tracking.configure(tracking_cfg)
    run_id = tracking.start_or_resume_run(client, tracking_cfg, "download-safety")
    tracking.log_artifact_dir(client, run_id, artifact, "model")
    tracking.register_model(client, run_id, "model", "download-safety", "candidate")
    ref = "models:/download-safety@candidate"
    assert describe_model(ref, tracking_uri=uri)["run_id"] == run_id
    assert leftovers(temp_root) == [], "describing a model leaves no download"
    loaded = load_model_dir(ref, tracking_uri=uri)
    assert loaded.local_dir.is_relative_to(temp_root) and loaded.run_id == run_id
    del loaded
    gc.collect()
    assert leftovers(temp_root) == []


def test_a_llava_download_is_removed_once_loaded(tmp_path, s3_bucket, temp_root):
    settings, root = s3_bucket
    tiny = build_from_config(load_config("tiny", ["run.seed=5"]))
    tiny.llava.save_pretrained(tmp_path / "llava")
    tiny.text.tokenizer.save_pretrained(tmp_path / "llava")
    storage.upload_dir(tmp_path / "llava", f"{root}/llava", settings)
    llava, _ = load_llava_dir(f"{root}/llava", settings)
    assert llava.config.text_config.vocab_size == tiny.llava.config.text_config.vocab_size
    assert leftovers(temp_root) == []
    bucket = root.removeprefix("s3://")
    storage.boto3_client(settings).put_object(Bucket=bucket, Key="llava/../planted.txt", Body=b"x")
    with pytest.raises(CheckpointError, match="refused: object key '../planted.txt'"):
        load_llava_dir(f"{root}/llava", settings)
    assert leftovers(temp_root) == []


def test_the_sam_base_checkpoint_must_be_the_recorded_one(artifact, sam_file, cfg):
    original = sam_file.read_bytes()
    loaded = load_model_dir(artifact)
    base = torch.load(sam_file)
    encoder = loaded.model.sam.image_encoder.state_dict()
    assert encoder and all(torch.equal(v, base[f"image_encoder.{k}"]) for k, v in encoder.items())
    replaced = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    try:
        torch.save(replaced, sam_file)  # same shapes: it would load without complaint
        with pytest.raises(CheckpointError, match=r"sam\.pth.*sha256 [0-9a-f]{64} differs from"):
            load_model_dir(artifact)
        load_model_dir(artifact, parts=("mllm",))  # that part holds no SAM
    finally:
        sam_file.write_bytes(original)
