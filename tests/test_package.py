import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medisee.cli import app


def test_platform_is_still_the_standard_library_module():
    import platform

    import medisee  # noqa: F401

    assert hasattr(platform, "python_version")
    assert "site-packages" not in (platform.__file__ or "") or "medisee" not in platform.__file__


def test_importing_medisee_first_keeps_stdlib_platform_in_a_fresh_interpreter():
    code = "import medisee, platform; print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ".".join(map(str, sys.version_info[:3]))


IMPORT_EVERY_MODULE = """
import importlib, json, os, pkgutil, sys
import medisee

changes, errors = {}, {}
for info in pkgutil.walk_packages(medisee.__path__, "medisee."):
    before = dict(os.environ)
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        errors[info.name] = f"{type(exc).__name__}: {exc}"
    after = dict(os.environ)
    diff = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if diff:
        changes[info.name] = diff
print(json.dumps({"changes": changes, "errors": errors}))
"""

# torch._dynamo (imported by torchvision.ops) sets its cache dir when loaded, and `import ray.serve`
# sets RAY_CLIENT_MODE: not ours to fix.
SET_BY_DEPENDENCIES = {"TORCHINDUCTOR_CACHE_DIR", "RAY_CLIENT_MODE"}


def test_importing_any_module_leaves_the_environment_alone():
    """Entry points apply the environment defaults; a library import must not change os.environ."""
    # a bare environment: a default set by an import (setdefault) must show up too
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env=env,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    changes = {m: keys for m, keys in report["changes"].items() if set(keys) - SET_BY_DEPENDENCIES}
    assert changes == {}, "modules that change os.environ when imported (keys changed)"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["doctor"],
        ["prepare"],
        ["config"],
        ["train"],
        ["calibrate"],
        ["evaluate-verifier"],
        ["convert-checkpoint"],
        ["score"],
        ["evaluate"],
        ["serve"],
        ["predict"],
        ["export"],
    ],
)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_doctor_reports_versions_and_reachability(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.stdout)
    assert report["versions"]["ray"] != "missing"
    # a fresh folder: the default SQLite store does not exist yet, and doctor does not create it empty
    assert report["reachable"]["mlflow"].startswith("no database at ")
    assert not (tmp_path / ".medisee" / "mlflow.db").exists()
    assert report["reachable"]["storage"] == "ok"


def test_model_infer_and_verify_do_not_depend_on_training():
    """Batch scoring and serving load the model and the verifier without the training code."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import medisee.infer, medisee.model, medisee.verify\n"
        "for pkg in (medisee.infer, medisee.model, medisee.verify):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('medisee.train')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
