"""`ray job submit --working-dir ... -- python jobs/batch_score.py` against a real `ray start --head`:
the default tracking store is relative, so in the job's unpacked working dir (without the git-ignored
.medisee/) it would be a new, empty database. The job must refuse in one line, exit 2, no traceback;
given the absolute store the refusal advises, it reads the submitting side's registry."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medisee import stack
from medisee.raylib import LOCAL_RAY_ENV, RAY_ENV_DEFAULTS

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
WORKER_PORTS = 64


def free_port_range(count: int) -> tuple[int, int]:
    """`count` consecutive ports that are free now, for Ray's worker processes."""
    for _ in range(200):
        low = random.randrange(20000, 60000 - count)
        if all(stack.port_is_free(p) for p in range(low, low + count)):
            return low, low + count - 1
    raise RuntimeError(f"no {count} consecutive free ports found")


def head_env() -> dict[str, str]:
    """A clean environment for the head (nothing of the caller's Ray or MLflow settings): the job's
    `python` is this venv's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_ENV_DEFAULTS | LOCAL_RAY_ENV | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env


def start_head(folder: Path) -> tuple[stack.Service, str]:
    """`ray start --head --block` on free loopback ports (the stack's command); returns it and its dashboard."""
    services = stack.planned_services(folder)
    state = stack.StackState(str(folder), str(folder / "ray"), services, num_cpus=1)
    ray = services["ray"]
    low, high = free_port_range(WORKER_PORTS)
    cmd = [*stack.server_command(ray, state), "--min-worker-port", str(low), "--max-worker-port", str(high)]
    for attempt in range(2):  # a loaded machine may be slower than the raylet's fixed 30 s to register
        with open(ray.log, "a") as log:
            proc = subprocess.Popen(
                cmd, env=head_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=folder,
            )  # fmt: skip
        ray.pid, ray.start_time = proc.pid, stack.process_start_time(proc.pid)
        try:
            stack.wait_healthy(ray)
            return ray, state.dashboard_url
        except stack.ServerExited:
            stack.stop_service(ray)
            if attempt:
                raise
    raise AssertionError("unreachable")


def small_working_dir(root: Path) -> Path:
    """What `--working-dir .` uploads of a checkout: the job scripts, not the git-ignored .medisee/."""
    work = root / "work"
    shutil.copytree(REPO / "jobs", work / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", work / ".gitignore")
    (work / ".medisee").mkdir()
    (work / ".medisee" / "mlflow.db").write_bytes(b"")  # the submitting side's store: never uploaded
    size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    assert size < 1024 * 1024, f"the working dir to upload is {size} bytes"
    return work


def registered_store(root: Path) -> str:
    """The submitting side's store, absolute, holding `medisee-demo@candidate` (a version whose source
    is not a MediSee artifact: finding it is all the job needs to show)."""
    from medisee import tracking

    source = root / "not-an-artifact"
    source.mkdir()
    (source / "README").write_text("no medisee.json here")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    client = tracking.client_for(uri)
    client.create_registered_model("medisee-demo")
    version = client.create_model_version("medisee-demo", str(source))
    client.set_registered_model_alias("medisee-demo", "candidate", version.version)
    return uri


def submit(dashboard: str, work: Path, submission: str, images: Path, out: Path, *settings: str):
    """`ray job submit --working-dir WORK -- python jobs/batch_score.py ...`: (exit code, status, logs)."""
    from ray.job_submission import JobSubmissionClient

    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", dashboard,
        "--working-dir", str(work), "--submission-id", submission, "--",
        "python", "jobs/batch_score.py", "--input", str(images), "--output", str(out),
        "--queries", "template=Segment the {class}.;classes=liver", "--model", "models:/medisee-demo@candidate",
        *settings,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=head_env(), capture_output=True, text=True, timeout=600)
    client = JobSubmissionClient(dashboard)
    info = client.get_job_info(submission)
    return done.returncode, info, client.get_job_logs(submission)


def one_refusal(logs: str, info) -> str:
    """The job's driver exited 2 and its log holds one line from the command (`score: ...`), no traceback."""
    lines = [line for line in logs.splitlines() if line.startswith("score: ")]
    assert info.driver_exit_code == 2 and len(lines) == 1 and "Traceback" not in logs, (info, logs[-3000:])
    return lines[0]


@pytest.mark.timeout(900)
def test_a_job_refuses_the_relative_default_store_and_reads_an_absolute_one(tmp_path, monkeypatch):
    from ray.job_submission import JobStatus

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # mlflow sets it for the store made here: restored after

    folder = Path(tempfile.mkdtemp(prefix="mjs-", dir="/tmp"))  # short: Ray's socket paths live under it
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(images / "a.png")
    work, store = small_working_dir(tmp_path), registered_store(tmp_path)
    ray = None
    try:
        ray, dashboard = start_head(folder)
        run = uuid.uuid4().hex[:8]

        code, info, logs = submit(dashboard, work, f"relative-{run}", images, tmp_path / "out")
        assert code != 0 and info.status == JobStatus.FAILED, (info, logs[-3000:])
        line = one_refusal(logs, info)
        assert line.startswith("score: tracking.uri sqlite:///.medisee/mlflow.db is relative to this Ray job")
        assert "tracking.uri=http://HOST:5000" in line and "not found" not in logs

        # the advice taken: the job finds the registered version in the submitting side's store
        code, info, logs = submit(
            dashboard, work, f"absolute-{run}", images, tmp_path / "out", f"tracking.uri={store}"
        )
        assert code != 0 and info.status == JobStatus.FAILED, (info, logs[-3000:])
        line = one_refusal(logs, info)
        assert "medisee-demo@candidate" in line and "no medisee.json: not a MediSee model artifact" in line
        assert not (tmp_path / "out").exists()
    finally:
        if ray is not None:
            stack.stop_service(ray)
        shutil.rmtree(folder, ignore_errors=True)
