"""Shared fixtures: real servers on loopback (moto S3, MLflow, Ray), started here, stopped by PID."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medisee.raylib import LOCAL_RAY_ENV, RAY_ENV_DEFAULTS

os.environ.update(
    {
        **RAY_ENV_DEFAULTS,
        **LOCAL_RAY_ENV,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
for var in ("MEDISEE_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
    os.environ.pop(var, None)

logging.getLogger("werkzeug").setLevel(logging.WARNING)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lite_lm_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF to a transformers folder once per test run; the
    run's MEDISEE_CACHE points at it, so medisee-lite's default LM (and Ray workers) reuse it."""
    from medisee.model.weights import converted_lm

    cache = tmp_path_factory.mktemp("medisee-cache")
    os.environ["MEDISEE_CACHE"] = str(cache)
    return converted_lm(cache_dir=cache)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(endpoint + "/moto-api/")
    yield endpoint
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket; yields (StorageSettings, "s3://bucket")."""
    import uuid

    from medisee.storage import StorageSettings, boto3_client

    settings = StorageSettings(endpoint=s3_server, region="us-east-1")
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3_client(settings).create_bucket(Bucket=name)
    return settings, f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """The tiny model as an artifact folder, shared by the session: tests only read it."""
    from tests.artifacts import make_tiny_artifact

    return Path(make_tiny_artifact(tmp_path_factory.mktemp("tiny-artifact") / "model"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs, loopback only)."""
    import ray

    from medisee.raylib import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server` process with its artifacts on the moto S3; yields (uri, bucket)."""
    from medisee.storage import StorageSettings, boto3_client

    bucket = "mlflow-artifacts"
    boto3_client(StorageSettings(endpoint=s3_server)).create_bucket(Bucket=bucket)
    workdir = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_server)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir}/mlflow.db",
        "--artifacts-destination",
        f"s3://{bucket}/artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=300, proc=proc)  # slow under load
    except Exception:
        proc.kill()
        raise RuntimeError((workdir / "server.log").read_text()[-3000:]) from None
    yield f"http://127.0.0.1:{port}", bucket
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()
