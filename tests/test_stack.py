"""The local stack (`medisee stack up|down`, `make stack-up|stack-down`): state, ports, processes, lifecycle."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from medisee import stack

# ----- fast: state file, env file, ports, process handling --------------------------------------


def make_state(directory: Path) -> stack.StackState:
    state = stack.StackState(
        str(directory), str(stack.ray_temp_dir(directory)), stack.planned_services(directory)
    )
    for number, service in enumerate(state.services.values(), start=100):
        service.pid, service.start_time = number, number * 10
    return state


def test_planned_ports_are_distinct_and_free():
    services = stack.planned_services(Path("/nowhere"))
    ports = [p for s in services.values() for p in s.ports.values()]
    assert len(ports) == 2 + len(stack.RAY_PORTS) == len(set(ports))
    assert all(stack.port_is_free(p) for p in ports)
    assert set(services["ray"].ports) == set(stack.RAY_PORTS)


def test_port_is_free_sees_a_listening_socket():
    with socket.socket() as sock:
        sock.bind((stack.HOST, 0))
        sock.listen()
        assert not stack.port_is_free(sock.getsockname()[1])


def test_state_round_trips_through_json(tmp_path):
    state = make_state(tmp_path)
    stack.write_state(state)
    loaded = stack.load_state(tmp_path)
    assert loaded == state
    assert loaded.ray_address == f"127.0.0.1:{state.services['ray'].ports['port']}"
    assert not stack.write_state(loaded), "an unchanged state must leave the file alone"


def test_missing_and_broken_state_files(tmp_path):
    assert stack.load_state(tmp_path) is None
    (tmp_path / stack.STATE_FILE).write_text("{not json")
    with pytest.raises(stack.StackError, match="not a stack state file"):
        stack.load_state(tmp_path)


def test_env_file_sources_in_bash_and_points_at_the_stack(tmp_path):
    folder = tmp_path / "my stack"  # a space in the path must survive `source`
    folder.mkdir()
    state = make_state(folder)
    env_file = folder / stack.ENV_FILE
    env_file.write_text(stack.render_env_file(state))
    names = ["MEDISEE_STACK_DIR", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MEDISEE_S3_ENDPOINT"]
    names += ["AWS_ACCESS_KEY_ID", "RAY_AUTH_MODE"]
    script = f"source {shlex.quote(str(env_file))} && " + " && ".join(f'echo "${n}"' for n in names)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    s3_port, mlflow_port = state.services["s3"].ports["http"], state.services["mlflow"].ports["http"]
    assert out.splitlines() == [
        str(folder),
        state.ray_address,
        f"http://127.0.0.1:{mlflow_port}",
        f"http://127.0.0.1:{s3_port}",
        stack.DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "disabled",
    ]
    assert read_env_file(env_file)["MEDISEE_STACK_DIR"] == str(folder)


def test_server_env_keeps_the_callers_credentials_and_cluster_out(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-real-secret")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    state = make_state(tmp_path)
    env = stack.server_env(state)
    assert env["AWS_SECRET_ACCESS_KEY"] == stack.DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    assert env["RAY_ADDRESS"] == state.ray_address, "the head's helpers must find their own cluster"
    assert env["RAY_AUTH_MODE"] == "disabled" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["MEDISEE_S3_ENDPOINT"].startswith("http://127.0.0.1:")


def test_ray_temp_dir_stays_short_enough_for_unix_sockets():
    assert stack.ray_temp_dir(Path("/work/x/.medisee/stack")) == Path("/work/x/.medisee/stack/ray")
    deep = Path("/tmp/pytest-of-someone/pytest-123/test_a_rather_long_test_name0/stack")
    short = stack.ray_temp_dir(deep)
    assert len(str(short)) <= stack.MAX_RAY_TEMP_DIR_CHARS
    assert short == stack.ray_temp_dir(deep), "the same stack folder must map to the same temp dir"


def test_is_running_tells_our_process_from_a_reused_pid():
    me = os.getpid()
    assert stack.is_running(me) and stack.is_running(me, stack.process_start_time(me))
    assert not stack.is_running(me, (stack.process_start_time(me) or 0) + 1)
    assert not stack.is_running(None)
    done = subprocess.Popen(["true"])
    done.wait()
    assert not stack.is_running(done.pid)


SESSION_TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # a child in its own process group, like Ray's workers: only the session ties it to the leader
    child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgrp(); time.sleep(300)"])
    print(child.pid, flush=True)
    time.sleep(300)
    """
)


@pytest.mark.parametrize("behaviour", ["polite", "stubborn"])
def test_stop_service_ends_the_whole_session(tmp_path, behaviour):
    proc = subprocess.Popen(
        [sys.executable, "-c", SESSION_TREE, behaviour],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = int(proc.stdout.readline())
    service = stack.Service(
        "s3", {"http": 1}, str(tmp_path / "log"), proc.pid, stack.process_start_time(proc.pid)
    )
    assert set(stack.session_members(proc.pid)) >= {proc.pid, child}
    assert stack.stop_service(service, timeout=4)
    proc.wait(timeout=10)
    assert not stack.is_running(child) and stack.session_members(proc.pid) == []


LEADER_EXITS_FIRST = (
    "import ctypes, sys, threading, time\n"
    "threading.Thread(target=time.sleep, args=(60,)).start()\n"
    "print('ready', flush=True)\n"
    "ctypes.CDLL(None).pthread_exit(None)\n"
)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_a_zombie_leader_with_a_live_thread_is_still_a_member():
    # a killed server's leader can be a zombie while its other threads still hold its sockets
    proc = subprocess.Popen(
        [sys.executable, "-c", LEADER_EXITS_FIRST], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert stack._wait_until(lambda: stack._proc_stat(proc.pid)[0] == "Z", 10)
        assert stack.session_members(proc.pid) == [proc.pid]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert stack.session_members(proc.pid) == []


def test_stop_service_leaves_a_reused_pid_alone(tmp_path):
    me = os.getpid()
    stranger = stack.Service("ray", {"port": 1}, str(tmp_path / "log"), me, stack.process_start_time(me) + 1)
    assert stack.stop_service(stranger) is False
    assert stack.is_running(me)


FLAKY_SERVER = textwrap.dedent(
    """
    import functools, http.server, pathlib, sys
    folder, port = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    marker = folder / "tried-once"
    if not marker.exists():  # the first start fails, as Ray's does when its raylet registers too late
        marker.write_text("")
        sys.exit(1)
    (folder / "health").write_text("OK")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()
    """
)


def test_a_server_that_quits_while_starting_is_started_again(tmp_path, monkeypatch):
    state = stack.StackState(str(tmp_path), str(tmp_path / "ray"), stack.planned_services(tmp_path))
    server = state.services["mlflow"]
    command = [sys.executable, "-c", FLAKY_SERVER, str(tmp_path), str(server.ports["http"])]
    monkeypatch.setattr(stack, "server_command", lambda service, state: command)
    messages = []
    stack._start([server], state, messages.append)
    try:
        assert "exited while starting (attempt 1 of 3)" in messages[0]
        assert stack.is_healthy(server) and stack.load_state(tmp_path).services["mlflow"].pid == server.pid
    finally:
        stack.stop_service(server)
    assert not stack.is_running(server.pid) and stack.port_is_free(server.ports["http"])


def test_down_and_status_without_a_stack(tmp_path):
    messages = []
    assert stack.down(tmp_path / "none", log=messages.append) == []
    assert "nothing to stop" in messages[0]
    assert stack.status(tmp_path / "none")["running"] is False


# ----- the real stack --------------------------------------------------------------------------


def medisee(*args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "medisee.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def read_env_file(path: Path) -> dict[str, str]:
    exports = [
        line.removeprefix("export ") for line in path.read_text().splitlines() if line.startswith("export ")
    ]
    return dict(shlex.split(line)[0].split("=", 1) for line in exports)


RAY_PROBE = textwrap.dedent(
    """
    import json, os, ray
    from medisee import storage
    ray.init(logging_level="ERROR")  # RAY_ADDRESS from the stack's env; no runtime env, no credentials

    @ray.remote(num_cpus=0.5)
    def probe(uri):
        return {"key": os.environ.get("AWS_ACCESS_KEY_ID"), "object": storage.read_text(uri)}

    print(json.dumps(ray.get(probe.remote(os.environ["PROBE_URI"]), timeout=180)))
    """
)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_stack_lifecycle():
    # short path: Ray's socket paths live under <stack>/ray
    folder = Path(tempfile.mkdtemp(prefix="mst-", dir="/tmp"))
    env = {**os.environ, stack.STACK_DIR_ENV: str(folder)}
    try:
        first = medisee("stack", "up", env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        state = stack.load_state(folder)
        pids = {name: svc.pid for name, svc in state.services.items()}
        assert all(stack.is_running(svc.pid, svc.start_time) for svc in state.services.values())

        again = medisee("stack", "up", env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "started" not in again.stderr and "restarting" not in again.stderr, again.stderr
        assert stack.load_state(folder) == state, "a second `up` must change nothing"

        stack_env = {**os.environ, **read_env_file(folder / stack.ENV_FILE)}
        check_doctor_reaches_everything(stack_env)
        check_s3_mlflow_and_ray_work(state, stack_env)
        state = check_a_dead_piece_is_restarted(folder, env, state, pids)

        down = medisee("stack", "down", env=env, timeout=120)
        assert down.returncode == 0, down.stderr
        assert stack.load_state(folder) is None and not (folder / stack.ENV_FILE).exists()
        for svc in state.services.values():
            assert not stack.is_running(svc.pid), f"{svc.name} PID {svc.pid} still runs"
            assert stack.session_members(svc.pid) == [], f"{svc.name}'s processes survived"
            assert all(stack.port_is_free(p) for p in svc.ports.values()), f"{svc.name} ports still taken"
        assert medisee("stack", "down", env=env).returncode == 0, "down with nothing running is fine"
    finally:
        stack.down(folder, log=lambda m: None)
        shutil.rmtree(folder, ignore_errors=True)


def check_doctor_reaches_everything(stack_env: dict) -> None:
    result = medisee("doctor", f"tracking.uri={stack_env['MLFLOW_TRACKING_URI']}", env=stack_env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    reachable = report["reachable"]
    assert reachable["s3"].startswith("ok") and stack.DATA_BUCKET in reachable["s3"], reachable
    assert reachable["mlflow"] == "ok", reachable
    assert report["settings"]["mlflow_tracking_uri"] == stack_env["MLFLOW_TRACKING_URI"]
    assert reachable["ray"].startswith("ok") and "'CPU'" in reachable["ray"], reachable


def check_s3_mlflow_and_ray_work(state: stack.StackState, stack_env: dict) -> None:
    import boto3
    from mlflow import MlflowClient

    s3 = boto3.client(
        "s3",
        endpoint_url=state.url("s3"),
        region_name=stack.REGION,
        aws_access_key_id=stack.DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    token = uuid.uuid4().hex
    s3.put_object(Bucket=stack.DATA_BUCKET, Key="probe/hello.txt", Body=token.encode())
    assert s3.get_object(Bucket=stack.DATA_BUCKET, Key="probe/hello.txt")["Body"].read().decode() == token

    client = MlflowClient(tracking_uri=state.url("mlflow"))
    run = client.create_run(client.create_experiment(f"stack-{token[:8]}"))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "note.txt").write_text(token)
        client.log_artifact(run.info.run_id, str(Path(tmp) / "note.txt"))
    client.set_terminated(run.info.run_id)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.MLFLOW_BUCKET).get("Contents", [])]
    artifact = next(k for k in keys if run.info.run_id in k and k.endswith("note.txt"))
    assert s3.get_object(Bucket=stack.MLFLOW_BUCKET, Key=artifact)["Body"].read().decode() == token

    # the driver has no credentials: the worker must read them from the head's own environment
    driver_env = {k: v for k, v in stack_env.items() if k not in stack.DUMMY_CREDENTIALS}
    driver_env["PROBE_URI"] = f"s3://{stack.DATA_BUCKET}/probe/hello.txt"
    out = subprocess.run(
        [sys.executable, "-c", RAY_PROBE], env=driver_env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"key": stack.DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"], "object": token}


def bound(sock: socket.socket, port: int) -> bool:
    """A loaded kernel may release a killed server's socket a moment after its processes are gone."""
    try:
        sock.bind((stack.HOST, port))
    except OSError:
        return False
    return True


def check_a_dead_piece_is_restarted(
    folder: Path, env: dict, state: stack.StackState, pids: dict
) -> stack.StackState:
    mlflow = state.services["mlflow"]
    for pid in stack.session_members(mlflow.pid):  # the server and its workers die
        os.kill(pid, signal.SIGKILL)
    assert stack._wait_until(lambda: not stack.session_members(mlflow.pid), 20)

    with socket.socket() as squatter:  # another process took the dead server's port: refuse, touch nothing
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port may be in TIME_WAIT
        assert stack._wait_until(lambda: bound(squatter, mlflow.ports["http"]), 30), "the port stays taken"
        squatter.listen()
        refused = medisee("stack", "up", env=env)
    assert refused.returncode == 1 and str(mlflow.ports["http"]) in refused.stderr, refused.stderr
    assert stack.load_state(folder) == state

    repaired = medisee("stack", "up", env=env)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    after = stack.load_state(folder)
    assert after.services["mlflow"].pid != pids["mlflow"]
    assert after.services["mlflow"].ports == mlflow.ports
    assert {n: after.services[n].pid for n in ("s3", "ray")} == {n: pids[n] for n in ("s3", "ray")}
    status = medisee("stack", "status", env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
    return after
