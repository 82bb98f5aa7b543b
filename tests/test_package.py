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
    assert report["reachable"]["mlflow"] == "ok"
    assert report["reachable"]["storage"] == "ok"
