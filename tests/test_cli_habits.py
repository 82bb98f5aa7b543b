"""What every `medisee` command shares: --version, one meaning per short flag, the one-line failure,
doctor's package list, and evaluate-verifier's judge loop."""

from __future__ import annotations

import io
import json
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from medisee.cli import app, fail
from medisee.doctor import PACKAGES, package_versions

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_prints_the_installed_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"medisee {version('medisee')}\n"


def commands(group, prefix: str = ""):
    """(`stack up`, command) for every leaf command, subgroups included (typer vendors its own click:
    groups are told apart by their `commands`)."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield prefix + name, command


def short_flags() -> dict[str, dict[str, set[str]]]:
    """short flag -> {long flag: commands that give it that meaning}."""
    meanings: dict[str, dict[str, set[str]]] = {}
    for name, command in commands(typer.main.get_command(app)):
        for param in command.params:
            if param.param_type_name != "option":
                continue
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if not o.startswith("--")):
                meanings.setdefault(short, {}).setdefault(" ".join(longs), set()).add(name)
    return meanings


def test_each_short_flag_means_one_thing_in_every_command():
    meanings = short_flags()
    assert {short: m for short, m in meanings.items() if len(m) > 1} == {}
    assert set(meanings["-q"]) == {"--query"} and meanings["-q"]["--query"] == {"predict"}


def test_score_takes_its_query_spec_as_queries_only(tmp_path):
    result = CliRunner().invoke(
        app, ["score", "-i", str(tmp_path), "-q", "records", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "No such option: -q" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("code", [2, 1])
def test_fail_prints_one_line_on_stderr_and_exits(code, capsys):
    with pytest.raises(typer.Exit) as exit_info:
        fail("prepare: nothing here", code=code)
    assert exit_info.value.exit_code == code and exit_info.value.__suppress_context__
    captured = capsys.readouterr()
    assert captured.err == "prepare: nothing here\n" and captured.out == ""


def test_user_errors_and_explicit_failures_read_the_same():
    """A user error caught for every command and a command's own refusal: one line, exit 2."""
    caught = CliRunner().invoke(app, ["convert-checkpoint", "-i", "/nonexistent/x.pth", "-o", "/tmp/y"])
    explicit = CliRunner().invoke(app, ["train", "data.sources={}"])
    for result in (caught, explicit):
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert caught.stderr.startswith("convert-checkpoint: ")
    assert explicit.stderr == "data.sources is empty: give e.g. 'data.sources={phantom: /path/to/shards}'\n"


def distribution_name(requirement: str) -> str:
    """`ray[train,data,serve]>=2.40` -> `ray`, normalised as PEP 503 does (case, `_` and `.`)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def test_doctor_lists_every_runtime_dependency():
    runtime = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    listed = {distribution_name(p) for p in PACKAGES}
    assert {distribution_name(r) for r in runtime} - listed == set()
    assert "highdicom" in listed and "medisee" in listed


def test_package_versions_reads_the_installed_metadata():
    versions = package_versions(("highdicom", "not-a-package-medisee-needs"))
    assert versions == {"highdicom": version("highdicom"), "not-a-package-medisee-needs": "missing"}


def test_doctor_reports_each_listed_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    versions = json.loads(result.stdout)["versions"]
    assert list(versions) == list(PACKAGES)
    assert versions["highdicom"] == version("highdicom") and versions["medisee"] == version("medisee")


# ----- evaluate-verifier's judge loop (medisee.verify.judge.judged_verdicts) ----------------------


class RecordingJudge:
    """Stands in for the HTTP judge: answers `absent` and records what it was shown."""

    def __init__(self):
        self.calls = []

    def judge(self, image, similarity, scores, query, clip_size, padded_map=False):
        from medisee.verify import Verdict
        from medisee.verify.judge import JudgeAnswer

        self.calls.append((image, similarity, scores, query, clip_size))
        self.padded_map = padded_map
        return JudgeAnswer(Verdict.ABSENT, 0.9, "nothing under the heat")


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_the_judge_is_asked_only_where_the_rule_is_uncertain():
    from medisee.verify import Scores, Verdict
    from medisee.verify.calibrate import CalibratedVerifier, Evidence
    from medisee.verify.judge import judged_verdicts

    scores = [Scores(0.9, 0.9, 0.9), Scores(0.1, 0.1, 0.1), Scores(0.9, 0.1, 0.9)]  # present, absent, unsure
    images = [np.full((12, 16, 3), 40 * (i + 1), np.uint8) for i in range(3)]
    rows = [{"image_png": png(im), "query": f"query {i}"} for i, im in enumerate(images)]
    similarities = [np.full((4, 4), float(i)) for i in range(3)]
    judge = RecordingJudge()
    verdicts = judged_verdicts(
        judge, CalibratedVerifier(), [Evidence(s) for s in scores], rows, similarities, clip_size=32
    )
    assert verdicts == [Verdict.PRESENT, Verdict.ABSENT, Verdict.ABSENT]
    [(image, similarity, seen, query, clip_size)] = judge.calls
    assert np.array_equal(image, images[2]) and similarity is similarities[2]
    assert (seen, query, clip_size) == (scores[2], "query 2", 32)
