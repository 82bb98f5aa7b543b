"""Every command that takes a model or an input: a bad reference, a missing path or an unreachable
store is ONE line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medisee import tracking
from medisee.cli import app
from tests.conftest import free_port

QUERIES = "template=Segment the {class}.;classes=liver"


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI: keep one test's store out of the next.
    An API key is configured, so that `serve` gets as far as its model (the auth tests remove it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "set by a test")  # so that teardown restores the original
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MEDISEE_API_KEYS", "a-test-key")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real, empty MLflow SQLite store (no registered model, no run)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow sets it: restored when the block ends
        tracking.client_for(uri).search_experiments(max_results=1)
    return uri


@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (90, 90, 90)).save(path)
    return str(path)


def refused(args: list[str], *expected: str) -> str:
    """Run the CLI in-process; assert exit 2 and one line on stderr holding `expected`; return it."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def model_commands(model: str, tmp_path, image: str) -> dict[str, list[str]]:
    """Each command that loads a model, with inputs that exist (so only the model can be wrong)."""
    data = tmp_path / "shards"
    data.mkdir(exist_ok=True)
    scores = str(tmp_path / "o")
    return {
        "predict": ["predict", "--model", model, "--image", image, "-q", "the liver?"],
        "score": ["score", "-i", str(tmp_path), "--queries", QUERIES, "--model", model, "-o", scores],
        "evaluate": ["evaluate", "--model", model, "--data", str(data), "-o", str(tmp_path / "e")],
        "export": ["export", "--model", model, "-o", str(tmp_path / "x")],
        "serve": ["serve", "--model", model],
        "calibrate": ["calibrate", "--model", model, "--data", str(data)],
        "evaluate-verifier": ["evaluate-verifier", "--model", model, "--data", str(data)],
    }


COMMANDS = ["predict", "score", "evaluate", "export", "serve", "calibrate", "evaluate-verifier"]


def tracking_setting(command: str, uri: str) -> str:
    return f"tracking_uri={uri}" if command == "serve" else f"tracking.uri={uri}"


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_registered_model(command, store, tmp_path, image):
    args = model_commands("models:/nope@candidate", tmp_path, image)[command]
    refused([*args, tracking_setting(command, store)], f"{command}: ", "name=nope not found", store)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["predict", "export", "calibrate"])
def test_an_unknown_run(command, store, tmp_path, image):
    args = model_commands("runs:/0123456789abcdef/model", tmp_path, image)[command]
    refused([*args, f"tracking.uri={store}"], "0123456789abcdef not found")


@pytest.mark.parametrize("command", ["predict", "score", "evaluate", "export", "serve"])
def test_a_missing_model_folder(command, tmp_path, image):
    missing = str(tmp_path / "no-model")
    refused(model_commands(missing, tmp_path, image)[command], missing, "no such directory")


def test_a_model_reference_without_alias_or_version(store, tmp_path, image):
    args = model_commands("models:/medisee", tmp_path, image)["predict"]
    refused([*args, f"tracking.uri={store}"], "give models:/NAME@ALIAS or models:/NAME/VERSION")


@pytest.mark.parametrize("command", ["predict", "score", "serve"])
def test_a_tracking_server_that_does_not_answer(command, tmp_path, image, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    args = model_commands("models:/medisee@candidate", tmp_path, image)[command]
    refused([*args, tracking_setting(command, uri)], "Connection refused", uri)


@pytest.mark.parametrize("command", ["score", "export"])
def test_a_local_store_that_does_not_exist_is_not_created(command, tmp_path, image):
    db = tmp_path / "nowhere" / "mlflow.db"
    args = model_commands("models:/medisee@candidate", tmp_path, image)[command]
    refused(
        [*args, f"tracking.uri=sqlite:///{db}"],
        f"no MLflow database at {db}",
        "tracking.uri=http://HOST:5000",
    )
    assert not db.exists()


@pytest.mark.parametrize("command", ["predict", "score", "export", "serve"])
def test_an_object_store_that_does_not_answer(command, tmp_path, image, monkeypatch):
    monkeypatch.setenv("MEDISEE_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    args = model_commands("s3://medisee-models/m1", tmp_path, image)[command]
    refused(args, f"{command}: ", "Could not connect")


def test_missing_inputs(tmp_path, store):
    missing = str(tmp_path / "missing")
    model = "models:/medisee@candidate"
    cases = [
        ["prepare", "image-folder", "-i", missing, "-o", str(tmp_path / "p")],
        ["predict", "--model", model, "--image", missing, "-q", "q"],
        ["score", "-i", missing, "--queries", QUERIES, "--model", str(tmp_path), "-o", str(tmp_path / "o")],
        ["evaluate", "--model", str(tmp_path), "--data", missing],
        ["calibrate", "--model", model, "--data", missing, f"tracking.uri={store}"],
        ["evaluate-verifier", "--model", model, "--data", missing, f"tracking.uri={store}"],
        ["convert-checkpoint", "-i", missing, "-o", str(tmp_path / "c.pth")],
        ["train", f"data.sources={{phantom: {missing}}}", f"tracking.uri={store}"],
    ]
    for args in cases:
        refused(args, f"{args[0]}: ", missing)


def test_calibration_needs_an_mlflow_model(tmp_path):
    refused(["calibrate", "--model", str(tmp_path), "--data", str(tmp_path)], "give runs:/ or models:/")


def test_an_override_that_is_not_yaml():
    refused(["train", "data.sources={p:"], "train: ")


# ----- a Ray job's unpacked working dir ----------------------------------------------------------


@pytest.fixture()
def in_a_ray_job(tmp_path, monkeypatch):
    """This process as a Ray job's entrypoint: cwd the unpacked working dir, which has no .medisee/."""
    workdir = tmp_path / "session_2026-01-01_00-00-00_000001_1" / "runtime_resources" / "_ray_pkg_1"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    return workdir


def test_a_relative_store_in_a_ray_job_is_refused(in_a_ray_job, tmp_path, image):
    args = model_commands("models:/medisee-demo@candidate", tmp_path, image)["score"]
    line = refused(args, "score: tracking.uri sqlite:///.medisee/mlflow.db is relative to this Ray job's")
    assert "tracking.uri=http://HOST:5000" in line and str(in_a_ray_job) in line
    (tmp_path / "shards").mkdir(exist_ok=True)
    refused(["train", f"data.sources={{p: {tmp_path / 'shards'}}}"], "train: tracking.uri sqlite:///.medisee")
    refused(["train", f"data.sources={{p: {tmp_path / 'shards'}}}", "tracking.uri=http://mlflow:5000",
             "tracking.artifact_location=mlruns"], "tracking.artifact_location mlruns is relative")  # fmt: skip
    assert not (in_a_ray_job / ".medisee").exists(), "no empty store may be left in the job's working dir"


def test_doctor_reports_the_relative_store_in_a_ray_job(in_a_ray_job):
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reachable"]["mlflow"].startswith("refused: tracking.uri sqlite:///.medisee/mlflow.db is")
    assert any("tracking.uri=http://HOST:5000" in hint for hint in report["hints"])
    assert not (in_a_ray_job / ".medisee").exists()


def test_doctor_names_a_relative_store_on_the_submitting_side(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["doctor", "tracking.artifact_location=mlruns"])
    hints = json.loads(result.stdout)["hints"]
    assert hints[0] == (
        "tracking.uri sqlite:///.medisee/mlflow.db is relative: a Ray job (ray job submit --working-dir) "
        "runs in its own copy of the directory and refuses it; pass "
        f"tracking.uri=sqlite:///{tmp_path}/.medisee/mlflow.db (a Ray head on this machine) "
        "or tracking.uri=http://HOST:5000"
    )
    assert hints[1].startswith("tracking.artifact_location mlruns is relative: a Ray job")
    assert hints[1].endswith(f"pass tracking.artifact_location={tmp_path}/mlruns or an s3:// URI")
    assert not (tmp_path / ".medisee").exists()


def test_doctor_does_not_create_a_missing_store(tmp_path):
    db = tmp_path / "new" / "mlflow.db"
    report = json.loads(CliRunner().invoke(app, ["doctor", f"tracking.uri=sqlite:///{db}"]).stdout)
    assert report["reachable"]["mlflow"] == f"no database at {db} yet (training creates it)"
    assert not db.parent.exists()


# ----- serving: never open by default --------------------------------------------------------


@pytest.fixture()
def no_keys(monkeypatch):
    monkeypatch.delenv("MEDISEE_API_KEYS", raising=False)


def test_serve_refuses_without_api_keys(no_keys, store, tmp_path):
    """Refused before anything else is looked at (the model here does not exist either)."""
    args = ["serve", "--model", "models:/nope@x", f"tracking_uri={store}"]
    refused(args, "serve: no API key configured ($MEDISEE_API_KEYS is empty", "allow_anonymous=true")
    empty = tmp_path / "keys.txt"
    empty.write_text("\n")
    refused([*args, f"api_keys_file={empty}"], f"{empty} holds none")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "medisee.example.org"])
def test_serve_refuses_anonymous_access_beyond_loopback(host, store, monkeypatch):
    for keys in ("", "a-test-key"):  # with keys too: emptying a key file would open it later
        monkeypatch.setenv("MEDISEE_API_KEYS", keys)
        args = [
            "serve",
            "--model",
            "models:/nope@x",
            "--host",
            host,
            "allow_anonymous=true",
            f"tracking_uri={store}",
        ]
        refused(args, f"serve: allow_anonymous=true is for a loopback host only, not --host {host}")


def test_the_auth_mode_that_serve_logs(no_keys, tmp_path, monkeypatch):
    from medisee.cli import refuse_open_serving
    from medisee.serving.args import AppArgs

    anonymous = AppArgs(model="m", allow_anonymous=True)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert "anonymous access on loopback" in refuse_open_serving(anonymous, host)[1]
    keys = tmp_path / "keys.txt"
    keys.write_text("k1\nk2\n")
    monkeypatch.chdir(tmp_path)
    args, mode = refuse_open_serving(AppArgs(model="m", api_keys_file="keys.txt"), "0.0.0.0")
    assert mode == f"auth: API keys required (0 from $MEDISEE_API_KEYS, 2 from {keys})"
    assert args.api_keys_file == str(keys), "the replicas read the file from another directory"
    monkeypatch.setenv("MEDISEE_API_KEYS", "k3")
    assert "API keys required (1 from $MEDISEE_API_KEYS" in refuse_open_serving(anonymous, "127.0.0.1")[1]


def test_store_uris_are_not_taken_for_relative_paths(in_a_ray_job):
    from medisee.config import TrackingConfig

    for uri in ("mlflow-artifacts:/1", "s3://bucket/artifacts", "http://mlflow:5000/api"):
        assert not tracking.is_transient_location(uri)
        assert (
            tracking.resolve_artifact_location(
                TrackingConfig(uri="http://mlflow:5000", artifact_location=uri)
            )
            == uri
        )
    assert tracking.is_transient_location("mlruns") and tracking.is_transient_location(
        str(in_a_ray_job / "a")
    )
