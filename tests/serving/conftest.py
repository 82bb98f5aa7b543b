"""One Serve application for the serving tests: two versions of the tiny model on one base,
an API key, real HTTP on a free port of the session's local Ray."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.artifacts import make_tiny_artifact
from tests.conftest import free_port, wait_for_http

API_KEY = "test-key-0123456789"


@dataclass
class Served:
    url: str
    v1: str
    v2: str
    key: str
    app_name: str = "medisee"

    def headers(self, **extra) -> dict:
        return {"Authorization": f"Bearer {self.key}", **extra}


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def app_args(state: Served, **changes):
    from medisee.serving.args import AppArgs

    keys = str(Path(state.v1).parent / "keys.txt")
    return AppArgs(**{"model": state.v1, "extra_models": [state.v2], "api_keys_file": keys, **changes})


@pytest.fixture(scope="package")  # torn down before other packages' tests need the CPUs back
def served(ray_local, tmp_path_factory):
    from ray import serve

    from medisee.serving.app import build_app

    root = tmp_path_factory.mktemp("serving")
    (root / "keys.txt").write_text(f"another-key\n{API_KEY}\n")
    state = Served(
        "", make_tiny_artifact(root / "v1"), make_tiny_artifact(root / "v2", retrained=True), API_KEY
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    serve.run(build_app(app_args(state)), name=state.app_name, route_prefix="/")
    state.url = f"http://127.0.0.1:{port}"
    wait_for_http(state.url + "/healthz", timeout=120)
    yield state
    serve.shutdown()
