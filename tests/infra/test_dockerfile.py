"""infra/Dockerfile: lint-clean (hadolint), a CUDA Ray base of the installed Ray version, the package
installed as `make setup` installs it, a non-root user, and no credentials."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from tests.infra.helpers import (
    INFRA,
    ROOT,
    SECRET_LIKE,
    dockerfile_instructions,
    makefile_install,
    pip_install,
    split_extras,
)

DOCKERFILE = INFRA / "Dockerfile"


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def lint(text: str) -> list[dict]:
    done = subprocess.run(
        [hadolint(), "--format", "json", "-"], input=text, capture_output=True, text=True, timeout=120
    )
    return json.loads(done.stdout or "[]")


def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def test_hadolint_finds_nothing():
    if hadolint() is None:
        pytest.skip(
            "hadolint not installed (pip install -c constraints.txt -e '.[dev]'); parsed checks still run"
        )
    assert lint(DOCKERFILE.read_text()) == []


def test_hadolint_is_live():
    if hadolint() is None:
        pytest.skip("hadolint not installed")
    codes = {finding["code"] for finding in lint("FROM rayproject/ray\nRUN pip install requests\n")}
    assert {"DL3006", "DL3013", "DL3042"} <= codes  # untagged base, unpinned and cached pip install


def test_instruction_parser_joins_continuations_and_drops_comments():
    text = "# a comment\nFROM x:1\nENV A=1 \\\n    # inside\n    B=2\nRUN echo hi\n"
    assert dockerfile_instructions(text) == [("FROM", "x:1"), ("ENV", "A=1 B=2"), ("RUN", "echo hi")]


def test_base_is_the_cuda_ray_image_of_the_installed_version():
    (base,) = [args for keyword, args in instructions() if keyword == "FROM"]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{python}-gpu"


def test_runs_as_a_non_root_user():
    users = [args for keyword, args in instructions() if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # numeric, so that Kubernetes can check runAsNonRoot; the manifests run as the same uid
    assert user.isdigit()
    manifests = (INFRA / "k8s" / "base" / "rayjob-train.yaml").read_text()
    assert re.search(rf"runAsUser: {user}\b", manifests)


def test_installs_the_package_as_make_setup_does():
    runs = [args for keyword, args in instructions() if keyword == "RUN" and "pip install" in args]
    assert len(runs) == 1
    image, make = pip_install(runs[0]), makefile_install()
    assert image["constraints"] == make["constraints"] == "constraints.txt"
    (image_spec,), (make_spec,) = image["specs"], make["specs"]
    assert split_extras(image_spec) == (split_extras(make_spec)[0], set())  # same package, no dev extra
    assert make["editable"] and not image["editable"]
    assert "--no-cache-dir" in image["flags"]
    copied = " ".join(args for keyword, args in instructions() if keyword == "COPY")
    for needed in ("pyproject.toml", "constraints.txt", "platform", "serve", "jobs"):
        assert needed in copied


def test_no_credentials_baked_in():
    for keyword, args in instructions():
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split("=")[0].split()[0]]
            assert not [n for n in names if SECRET_LIKE.search(n)], f"{keyword} {args}"
        assert not re.search(r"AKIA[0-9A-Z]{16}", args)


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_context():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # allow-list: only what the Dockerfile copies
    included = {p[1:] for p in patterns if p.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "constraints.txt", "platform", "serve", "jobs"}
    assert "**/.env*" in patterns
