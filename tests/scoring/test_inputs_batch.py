"""The bad-input suite in batch: ONE `medisee score` run (the CLI, the tiny model) over one folder holding
every file case of tests/inputs/cases.py. Every file comes out exactly once: result rows for each of
its images and queries, or one error row with the documented reason; `inputs = results + errors`;
nothing is written outside the output folder.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.artifacts import make_tiny_artifact
from tests.inputs.cases import BATCH_QUERIES, BATCH_QUERY_SPEC, FILES, RESULTS
from tests.scoring.test_batch_infer import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BATCH_FILES = [c for c in FILES if c.batch is not None]
BATCH_PARAMS = [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail_batch)] if c.xfail_batch else [])
    for c in BATCH_FILES
]  # fmt: skip
RUN_BOUND_S = 800  # a bound on a hang (pytest's own timeout is 900 s)


@dataclass
class BatchRun:
    inputs: Path
    returncode: int
    stderr: str
    summary: dict | None
    results: list[dict]
    errors: list[dict]
    changed_outside_output: list[str]

    def rows_of(self, name: str) -> tuple[list[dict], list[dict]]:
        return (
            [r for r in self.results if self.file_of(r) == name],
            [e for e in self.errors if self.file_of(e) == name],
        )

    def file_of(self, row: dict) -> str:
        return os.path.relpath(row["source"].removeprefix("file://"), self.inputs)


def tree(root: Path, output: Path) -> dict[str, tuple]:
    """Every path under `root` but the output, with what would show a write (links not followed)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) != output]
        for name in dirs + files:
            info = Path(folder, name).lstat()
            entries[os.path.relpath(Path(folder, name), root)] = (
                info.st_mode,
                info.st_size,
                info.st_mtime_ns,
            )
    return entries


def read_rows(folder: Path) -> list[dict]:
    return pq.read_table(folder).to_pylist() if folder.exists() else []


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> BatchRun:
    root = tmp_path_factory.mktemp("bad-inputs")
    inputs, output = root / "input", root / "output"
    inputs.mkdir()
    for case in BATCH_FILES:
        case.write_into(inputs)
    model = make_tiny_artifact(root / "model")
    before = tree(root, output)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["--input", str(inputs), "--queries", BATCH_QUERY_SPEC, "--model", model, "--output", str(output),
            "scoring.images_per_partition=8"]  # fmt: skip
    proc = run_cli(args, env, cwd=root)  # the cwd inside the watched tree: a stray relative write shows
    try:
        _, stderr = proc.communicate(timeout=RUN_BOUND_S)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    after = tree(root, output)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    summary_file = output / "summary.json"
    return BatchRun(
        inputs, proc.returncode, stderr, json.loads(summary_file.read_text()) if summary_file.exists() else None,
        read_rows(output / "results"), read_rows(output / "errors"), changed,
    )  # fmt: skip


def test_the_run_succeeds_and_reconciles(run):
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    assert summary["reconciled"] and summary["partitions_missing"] == [], summary
    assert summary["inputs"] == summary["results"] + summary["errors"], summary
    assert (summary["planned_inputs"], summary["unaccounted_inputs"]) == (len(BATCH_FILES), 0), summary
    assert (summary["results"], summary["errors"]) == (len(run.results), len(run.errors))
    ids = [r["record_id"] for r in run.results]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", BATCH_PARAMS)
def test_every_file_comes_out_once_with_its_outcome(run, case):
    results, errors = run.rows_of(case.name)
    if case.batch == RESULTS:
        assert not errors, [(e["reason"], e["detail"]) for e in errors]
        assert results, f"{case.name!r}: no result row"
        per_image: dict[str, Counter] = {}
        for row in results:
            per_image.setdefault(row["image_id"], Counter())[row["query"]] += 1
        assert len(per_image) == case.images, sorted(per_image)
        for image_id, queries in per_image.items():
            assert queries == Counter(BATCH_QUERIES), f"{image_id}: {queries}"
        assert {(r["height"], r["width"]) for r in results} == {case.hw}
        return
    assert not results, f"{case.name!r} was scored: {len(results)} result rows"
    assert len(errors) == 1, [(e["image_id"], e["reason"]) for e in errors]
    assert (errors[0]["reason"], bool(errors[0]["detail"])) == (case.batch, True), errors[0]


def test_every_row_names_a_file_of_the_folder(run):
    names = {c.name for c in BATCH_FILES}
    strangers = {run.file_of(r) for r in run.results + run.errors} - names
    assert not strangers, strangers


def test_nothing_is_written_outside_the_output(run):
    assert run.changed_outside_output == []
