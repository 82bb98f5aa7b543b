"""A local stack to point every command at: S3 (moto), MLflow (artifacts on that S3) and a Ray head.

    medisee stack up | status | down        (make stack-up / make stack-down)

Everything listens on 127.0.0.1 on free ports. Each server runs in its own session (`setsid`), so it
is stopped by its PID and the processes of that session only: other Ray instances on the machine are
never touched (no `ray stop`, no process names). The stack folder (default `.medisee/stack`, or
$MEDISEE_STACK_DIR) holds:

    stack.json   PIDs, process start times and ports of the three servers
    stack.env    `source` it: RAY_ADDRESS, MLFLOW_TRACKING_URI, MEDISEE_S3_ENDPOINT, dummy AWS keys, ...
    s3.log, mlflow.log, ray.log, mlflow.db, ray/ (Ray's temp dir: its session logs)

The S3 server keeps objects in memory: they, and the MLflow artifacts stored there, end with the stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medisee.raylib import RAY_ENV_DEFAULTS

STACK_DIR_ENV = "MEDISEE_STACK_DIR"
DEFAULT_STACK_DIR = ".medisee/stack"
STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
HOST = "127.0.0.1"
DATA_BUCKET = "medisee-data"
MLFLOW_BUCKET = "medisee-mlflow"
REGION = "us-east-1"
# moto accepts any keys; real ones from the caller's shell must not reach the stack's servers
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "medisee-stack", "AWS_SECRET_ACCESS_KEY": "medisee-stack"}
SERVICES = ("s3", "mlflow", "ray")  # start order; stopped in reverse
RAY_PORTS = (
    "port",  # GCS: the address clients join
    "dashboard-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
# A Unix socket path holds at most 107 bytes; Ray puts its sockets at
# <temp dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store (about 62 more).
MAX_RAY_TEMP_DIR_CHARS = 44
START_TIMEOUT_S = 240.0
START_ATTEMPTS = 3
STOP_TIMEOUT_S = 30.0

Log = Callable[[str], None]


class StackError(RuntimeError):
    """The stack cannot be brought to the state asked for; the message says why and what to do."""


class ServerExited(StackError):
    """A server quit while starting."""


@dataclass
class Service:
    name: str
    ports: dict[str, int]
    log: str
    pid: int | None = None  # None: not started yet
    start_time: int | None = None  # the kernel's start time of `pid`: tells our process from a reused PID

    @property
    def port(self) -> int:
        return self.ports["port"] if self.name == "ray" else self.ports["http"]


@dataclass
class StackState:
    directory: str
    ray_temp_dir: str
    services: dict[str, Service] = field(default_factory=dict)
    num_cpus: int | None = None  # None: Ray counts the machine's
    started_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StackState:
        raw = json.loads(text)
        services = {name: Service(**svc) for name, svc in raw.pop("services").items()}
        return cls(services=services, **raw)

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.services[name].port}"

    @property
    def ray_address(self) -> str:
        return f"{HOST}:{self.services['ray'].ports['port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.services['ray'].ports['dashboard-port']}"


# ----- folder, state and env files --------------------------------------------------------------


def stack_dir(directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or os.environ.get(STACK_DIR_ENV) or DEFAULT_STACK_DIR).absolute()


def ray_temp_dir(directory: Path) -> Path:
    """`<stack>/ray` when short enough for Ray's socket paths, else a short folder named after the stack."""
    inside = directory / "ray"
    if len(str(inside)) <= MAX_RAY_TEMP_DIR_CHARS:
        return inside
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    return Path("/tmp") / f"medisee-ray-{digest}"


def load_state(directory: Path) -> StackState | None:
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        return StackState.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        raise StackError(f"{path} is not a stack state file ({exc}); stop what it lists by hand") from None


def write_state(state: StackState) -> bool:
    return write_text_if_changed(Path(state.directory) / STATE_FILE, state.to_json())


def write_text_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def client_env(state: StackState) -> dict[str, str]:
    """What a process needs to use the stack: the contents of stack.env."""
    s3 = state.url("s3")
    return {
        STACK_DIR_ENV: state.directory,
        "RAY_ADDRESS": state.ray_address,
        "RAY_API_SERVER_ADDRESS": state.dashboard_url,  # `ray job submit` and the state API
        # the stack's Ray runs without token auth (loopback only); a client must say so too, or Ray
        # turns token auth on when it finds a token in ~/.ray
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": state.url("mlflow"),
        "MEDISEE_S3_ENDPOINT": s3,
        "AWS_ENDPOINT_URL_S3": s3,  # plain boto3 / aws CLI
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_DEFAULT_REGION": REGION,
        **DUMMY_CREDENTIALS,
        **RAY_ENV_DEFAULTS,
    }


def render_env_file(state: StackState) -> str:
    lines = [
        "# The MediSee local stack (medisee stack up). `source` this file to point every command at it;",
        f"# S3 buckets: s3://{DATA_BUCKET} (data, runs), s3://{MLFLOW_BUCKET} (MLflow artifacts).",
        f"# Ray dashboard: {state.dashboard_url}",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in client_env(state).items()]
    return "\n".join(lines) + "\n"


def server_env(state: StackState) -> dict[str, str]:
    """The servers' own environment: Ray's workers read the S3 endpoint and keys from it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    # RAY_ADDRESS / RAY_API_SERVER_ADDRESS name this cluster (`ray start --head` ignores them): Ray's own
    # helpers in its workers (the state API that Ray Train's placement-group cleaner calls) would
    # otherwise look up /tmp/ray/ray_current_cluster, which names whichever Ray started last
    env.update(client_env(state))
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    # `ray job submit -- python ...` runs the job's command on this head: with this Python first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain: stop at once
    # MLflow's server-side jobs (GenAI evaluation, trace roll-ups) start 7 huey consumer processes;
    # nothing here uses them
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One `stack up` / `stack down` at a time per folder."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# ----- ports and processes ---------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago (all held at once, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None when it is gone."""
    return _proc_stat_path(Path(f"/proc/{pid}/stat"))


def _proc_stat_path(path: Path) -> list[str] | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22 of stat(5)


def is_running(pid: int | None, start_time: int | None = None) -> bool:
    """Alive (a zombie is not) and, when a start time is given, still the process we started."""
    if not pid:
        return False
    fields = _proc_stat(pid)
    if fields is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (macOS): existence only
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


def session_members(session_id: int) -> list[int]:
    """Live processes of a session. Ray's workers make their own process groups but stay in it."""
    if not Path("/proc").is_dir():  # macOS: the leader's process group stands for its session
        return [session_id] if is_running(session_id) else []
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields and int(fields[3]) == session_id and _has_live_thread(int(entry.name), fields):
                members.append(int(entry.name))
    return members


def _has_live_thread(pid: int, fields: list[str]) -> bool:
    """A killed process's leader turns zombie before its other threads have exited and
    released its sockets, so a zombie leader only counts as gone once every thread has."""
    if fields[0] not in ("Z", "X"):
        return True
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return any(
        (stat := _proc_stat_path(task / "stat")) is not None and stat[0] not in ("Z", "X") for task in tasks
    )


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def stop_service(service: Service, timeout: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM the server, then SIGKILL whatever of its session is left. False if it was not running.

    Linux never hands out a PID that is still some session's id, so the processes whose session id
    is the server's PID are ours, even after the server itself has died.
    """
    if not service.pid:
        return False
    leader_is_ours = is_running(service.pid, service.start_time)
    if not leader_is_ours and is_running(service.pid):
        return False  # the PID belongs to someone else now: our session ended with the reboot or crash
    if leader_is_ours:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(service.pid, signal.SIGTERM)  # the server and the helpers in its process group
        _wait_until(lambda: not session_members(service.pid), timeout / 2)
    leftovers = session_members(service.pid)
    _signal_all(leftovers, signal.SIGKILL)
    if not _wait_until(lambda: not session_members(service.pid), timeout / 2):
        raise StackError(f"{service.name}: processes {session_members(service.pid)} survived SIGKILL")
    return leader_is_ours or bool(leftovers)


# ----- health ----------------------------------------------------------------------------------


_LOOPBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $HTTP_PROXY


def http_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with _LOOPBACK_OPENER.open(url, timeout=timeout) as response:
            return response.status == 200
    except Exception:
        return False


def health_urls(service: Service) -> list[str]:
    base = f"http://{HOST}"
    if service.name == "s3":
        return [f"{base}:{service.ports['http']}/moto-api/"]
    if service.name == "mlflow":
        return [f"{base}:{service.ports['http']}/health"]
    return [
        f"{base}:{service.ports['dashboard-port']}/api/gcs_healthz",
        f"{base}:{service.ports['dashboard-agent-listen-port']}/api/local_raylet_healthz",
    ]


def is_healthy(service: Service) -> bool:
    return is_running(service.pid, service.start_time) and all(http_ok(u) for u in health_urls(service))


def wait_healthy(service: Service, timeout: float = START_TIMEOUT_S) -> None:
    def ready() -> bool:
        if not is_running(service.pid, service.start_time):
            raise ServerExited(
                f"{service.name} exited while starting; the end of {service.log}:\n{_tail(service)}"
            )
        return all(http_ok(u) for u in health_urls(service))

    if not _wait_until(ready, timeout, interval=0.5):
        stop_service(service)
        raise StackError(f"{service.name} did not answer within {timeout:.0f} s; see {service.log}")


def _tail(service: Service, chars: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return Path(service.log).read_text()[-chars:]
    return ""


# ----- starting the servers --------------------------------------------------------------------


def _spawn(service: Service, cmd: list[str], state: StackState) -> None:
    with open(service.log, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=state.directory,
            env=server_env(state),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: stopped as a whole, immune to the terminal's hangup
        )
    service.pid, service.start_time = proc.pid, process_start_time(proc.pid)


def server_command(service: Service, state: StackState) -> list[str]:
    port = str(service.ports.get("http", 0))
    if service.name == "s3":
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", port]
    if service.name == "mlflow":
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{Path(state.directory) / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
            "--host", HOST, "--port", port, "--workers", "1",
        ]  # fmt: skip
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    cmd += [
        "start", "--head", "--block",
        "--node-ip-address", HOST, "--dashboard-host", HOST, "--include-dashboard", "true",
        "--temp-dir", state.ray_temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    for name in RAY_PORTS:
        cmd += [f"--{name}", str(service.ports[name])]
    if state.num_cpus is not None:
        cmd += ["--num-cpus", str(state.num_cpus)]
    return cmd


def create_buckets(state: StackState) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=state.url("s3"),
        region_name=REGION,
        aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in (DATA_BUCKET, MLFLOW_BUCKET):
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def _start(services: list[Service], state: StackState, log: Log) -> None:
    """Start servers side by side (each needs only the others' ports), then wait for each to answer."""
    began = time.monotonic()
    try:
        for service in services:
            _spawn(service, server_command(service, state), state)
        write_state(state)  # recorded at once: an interrupted `up` leaves nothing `down` cannot find
        for service in services:
            _wait_started(service, state, log)
            if service.name == "s3":
                create_buckets(state)
            seconds = time.monotonic() - began
            log(
                f"{service.name}: started in {seconds:.0f} s, PID {service.pid}, {_describe(state, service.name)}"
            )
    except BaseException:
        for service in reversed(services):
            stop_service(service)
        raise


def _wait_started(service: Service, state: StackState, log: Log) -> None:
    """Wait for a server to answer; start it again if it quit. Ray gives its raylet a fixed 30 s to
    register and exits when a loaded machine is slower than that."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return wait_healthy(service)
        except ServerExited:
            if attempt == START_ATTEMPTS:
                raise
        log(
            f"{service.name}: exited while starting (attempt {attempt} of {START_ATTEMPTS}): starting it again"
        )
        stop_service(service)  # what is left of its session
        _spawn(service, server_command(service, state), state)
        write_state(state)


def _describe(state: StackState, name: str) -> str:
    if name == "ray":
        return f"RAY_ADDRESS={state.ray_address}, dashboard {state.dashboard_url}"
    if name == "s3":
        return f"{state.url('s3')} (s3://{DATA_BUCKET}, s3://{MLFLOW_BUCKET})"
    return state.url(name)


def planned_services(folder: Path) -> dict[str, Service]:
    """The three servers on fresh free ports, not started yet."""
    ports = free_ports(2 + len(RAY_PORTS))
    by_name = {
        "s3": {"http": ports[0]},
        "mlflow": {"http": ports[1]},
        "ray": dict(zip(RAY_PORTS, ports[2:], strict=True)),
    }
    return {name: Service(name, by_name[name], str(folder / f"{name}.log")) for name in SERVICES}


def _busy_ports(service: Service) -> list[int]:
    return [p for p in service.ports.values() if not port_is_free(p)]


# ----- up / down / status ----------------------------------------------------------------------


def up(
    directory: str | os.PathLike | None = None, num_cpus: int | None = None, log: Log = print
) -> StackState:
    """Start the stack, or report it is up; restart a piece that died on its old ports.

    Refuses (StackError) when a dead piece's port has been taken by another process meanwhile.
    """
    folder = stack_dir(directory)
    with locked(folder):
        state = load_state(folder)
        if state is None or not any(is_running(s.pid, s.start_time) for s in state.services.values()):
            state = _fresh_start(folder, state, num_cpus, log)
        else:
            _repair(state, log)
        write_state(state)
        write_text_if_changed(folder / ENV_FILE, render_env_file(state))
        return state


def _fresh_start(folder: Path, old: StackState | None, num_cpus: int | None, log: Log) -> StackState:
    if old is not None:
        log("stack: nothing of the recorded stack runs any more: starting a new one")
        for service in old.services.values():
            stop_service(service)  # strays of a session whose leader died
    state = StackState(str(folder), str(ray_temp_dir(folder)), planned_services(folder), num_cpus)
    # objects lived in the old S3 server's memory: an old MLflow store would point at missing artifacts
    (folder / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(state.ray_temp_dir, ignore_errors=True)  # old Ray sessions (logs, sockets)
    (folder / STATE_FILE).unlink(missing_ok=True)
    _start([state.services[name] for name in SERVICES], state, log)
    return state


def _repair(state: StackState, log: Log) -> None:
    for name in SERVICES:
        service = state.services[name]
        if is_healthy(service):
            log(f"{name}: already up, PID {service.pid}, {_describe(state, name)}")
            continue
        if is_running(service.pid, service.start_time):
            with contextlib.suppress(StackError):  # still starting?
                wait_healthy(service, timeout=60)
                log(f"{name}: already up (answered after a wait), PID {service.pid}")
                continue
            log(f"{name}: PID {service.pid} runs but does not answer: restarting it")
        stop_service(service)
        busy = _busy_ports(service)
        if busy:
            raise StackError(
                f"{name} is down and its port(s) {busy} are now taken by another process; "
                f"run `medisee stack down` then `medisee stack up` (new ports, new stack.env)"
            )
        log(f"{name}: was down (PID {service.pid}): restarting it on the same ports")
        _start([service], state, log)
        if name == "s3":
            log("s3: restarted empty: objects stored before, MLflow artifacts included, are gone")


def down(directory: str | os.PathLike | None = None, log: Log = print) -> list[str]:
    """Stop every server of the stack by PID and session; returns the names of those that ran."""
    folder = stack_dir(directory)
    if not (folder / STATE_FILE).exists():
        log(f"stack: nothing recorded in {folder}: nothing to stop")
        return []
    with locked(folder):
        state = load_state(folder)
        if state is None:
            log("stack: already stopped")
            return []
        stopped = []
        for name in reversed(SERVICES):
            service = state.services.get(name)
            if service is None:
                continue
            began = time.monotonic()
            if stop_service(service):
                stopped.append(name)
                log(f"{name}: stopped in {time.monotonic() - began:.0f} s (PID {service.pid})")
            else:
                log(f"{name}: was not running")
        for name in stopped:
            service = state.services[name]
            if not _wait_until(lambda s=service: not _busy_ports(s), 15):
                log(f"{name}: warning: port(s) {_busy_ports(service)} still in use")
        (folder / STATE_FILE).unlink(missing_ok=True)
        (folder / ENV_FILE).unlink(missing_ok=True)
        return stopped


def status(directory: str | os.PathLike | None = None) -> dict:
    """Each server's PID, ports, whether it runs and answers; `{"running": False}` with no stack."""
    folder = stack_dir(directory)
    state = load_state(folder)
    if state is None:
        return {"directory": str(folder), "running": False, "services": {}}
    services = {}
    for name, svc in state.services.items():
        running = is_running(svc.pid, svc.start_time)
        services[name] = {
            "pid": svc.pid,
            "running": running,
            "healthy": running and all(http_ok(u) for u in health_urls(svc)),
            "url": state.ray_address if name == "ray" else state.url(name),
            "ports": svc.ports,
            "log": svc.log,
        }
    return {
        "directory": str(folder),
        "running": all(s["healthy"] for s in services.values()),
        "env_file": str(folder / ENV_FILE),
        "dashboard": state.dashboard_url,
        "ray_logs": str(Path(state.ray_temp_dir) / "session_latest" / "logs"),
        "services": services,
    }
