"""The local service: one `lorafleet server` per `LORAFLEET_HOME`, started by the first command that needs it.

Without it, a job trains only while some client process happens to run the controller: a job submitted
without `--wait` would never run, and `cancel` from another shell would talk to no one. So every client of
a home (the CLI, `Client()`) talks HTTP to one background server bound to 127.0.0.1, which owns the
controller and survives the shell that started it.

The home holds job specs, data paths, metrics and weights: it is for its user alone. It is created mode
0700, a home found wider is tightened when its service starts (the whole tree, once), and the service
runs with umask 077, so everything it and its Ray write there (`lorafleet.db`, `mlflow.db`, event logs,
checkpoints) is the user's only. Under `<home>/service/` (mode 0700):

- `token`: the per-home secret (0600); the service requires it as its admin token, so other local users
  who can reach the port cannot use it;
- `service.lock`: an exclusive `flock` the running service holds for its whole life: exactly one per home
  (a second one started by a race exits at once);
- `service.json`: pid, process start time, process group and URL of the running service (written by the
  service itself);
- `service.log`: everything the service prints.

A pid alone does not name the service: after a crash the pid in `service.json` may belong to any process
started since. The service is the process with that pid *and* the start time it recorded (or, for a file
written before start times were kept, a `lorafleet service run` command line); anything else is a
stranger, and is neither waited for nor signalled.

The service runs in a session of its own (its own process group), so the Ray processes it starts belong
to that group. When a service died without cleaning up (SIGKILL, OOM), the next start first kills what is
left of its group: an orphaned Ray Train worker must never keep training beside its replacement.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """The local service could not be started or reached; the message says why and where the log is."""


@dataclass(frozen=True)
class ServicePaths:
    home: Path

    @property
    def dir(self) -> Path:
        return self.home / "service"

    @property
    def token(self) -> Path:
        return self.dir / "token"

    @property
    def lock(self) -> Path:
        return self.dir / "service.lock"

    @property
    def start_lock(self) -> Path:
        return self.dir / "start.lock"

    @property
    def info(self) -> Path:
        return self.dir / "service.json"

    @property
    def log(self) -> Path:
        return self.dir / "service.log"


@dataclass(frozen=True)
class ServiceInfo:
    pid: int
    pgid: int
    url: str
    home: str
    started_at: float
    ray_session: str | None = None  # a local Ray's session dir: its orphans hold files there
    process_started: float | None = None  # psutil's create_time of `pid`: a reused pid has another


@dataclass(frozen=True)
class ServiceStatus:
    running: bool
    healthy: bool
    info: ServiceInfo | None
    log: str


PRIVATE_UMASK = 0o077


def paths(home: Path) -> ServicePaths:
    service = ServicePaths(Path(home).expanduser().resolve())
    service.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    service.dir.mkdir(exist_ok=True, mode=0o700)
    os.chmod(service.dir, 0o700)
    return service


def make_private(home: Path) -> int:
    """Tighten a home created before homes were private (or by hand, with a wider mode): the home to
    0700 and, that first time, every file and directory in it to its owner only. Once the home is 0700 and
    the service's umask 077, nothing wider appears in it, so later starts walk nothing. Only what this
    user owns is changed; symlinks are not followed. Returns how many entries were tightened."""
    home = Path(home).expanduser().resolve()
    mode = home.stat().st_mode & 0o777
    if mode & PRIVATE_UMASK == 0 or home.stat().st_uid != os.getuid():
        return 0
    tightened = 0
    for root, dirs, files in os.walk(home):
        for name in (*dirs, *files):
            tightened += _tighten(Path(root) / name)
    return tightened + _tighten(home)


def _tighten(path: Path) -> int:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & PRIVATE_UMASK == 0:
            return 0
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~PRIVATE_UMASK)
    except OSError:  # vanished meanwhile, or not ours to change
        return 0
    return 1


def _private_file(path: Path) -> IO[str]:
    """`path` opened for appending, created readable by this user only whatever the caller's umask (a
    client creates the log and the start lock; it must not loosen its process's umask for that)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a")


def ensure_token(home: Path) -> str:
    """The home's secret, created on first use readable by this user only."""
    where = paths(home).token
    with contextlib.suppress(FileExistsError):
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return where.read_text().strip()


def read_info(home: Path) -> ServiceInfo | None:
    try:
        return ServiceInfo(**json.loads(paths(home).info.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


PROCESS_START_TOLERANCE_S = 1.0  # create_time is whole clock ticks since boot: equal for one process
SERVICE_COMMAND = ("orchestrator.cli", "service", "run")


def _is_service(info: ServiceInfo) -> bool:
    """Whether `info.pid` is still the service that wrote `info`, not a process that reused its pid."""
    import psutil

    try:
        process = psutil.Process(info.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if info.process_started is not None:
            return abs(process.create_time() - info.process_started) < PROCESS_START_TOLERANCE_S
        command = process.cmdline()
    except psutil.Error:
        return False
    return any(tuple(command[i : i + 3]) == SERVICE_COMMAND for i in range(len(command)))


def _healthy(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def status(home: Path) -> ServiceStatus:
    info = read_info(home)
    running = info is not None and _is_service(info)
    healthy = running and info is not None and _healthy(info.url)
    return ServiceStatus(running, healthy, info if running else None, str(paths(home).log))


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with _private_file(path) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_service(home: Path, timeout: float = START_TIMEOUT_S) -> tuple[str, str]:
    """The URL and token of the home's running service, starting it (once, whoever asks) if needed."""
    service = paths(home)
    current = status(home)
    if current.healthy and current.info is not None:
        return current.info.url, ensure_token(home)
    with _flock(service.start_lock):  # two commands at once start one service, not two
        current = status(home)
        if current.running and current.info is not None:
            _wait_healthy(home, current.info, timeout)
            return current.info.url, ensure_token(home)
        _reap_dead(home)
        ensure_token(home)
        process = _spawn(home)
        info = _wait_started(home, process, timeout)
        return info.url, ensure_token(home)


def _spawn(home: Path) -> subprocess.Popen:
    service = paths(home)
    env = {**os.environ, "LORAFLEET_HOME": str(service.home)}
    env.pop("LORAFLEET_API_TOKEN", None)  # the local service's token is the home's own
    env.pop("RAY_ADDRESS", None)  # a Ray this shell started is not the service's (LORAFLEET_RAY_ADDRESS is)
    with _private_file(service.log) as log:
        log.write(f"\n---- starting lorafleet service for {service.home} at {time.ctime()} ----\n")
        log.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "service", "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this shell; its own process group for clean kills
            close_fds=True,
        )


def _wait_started(home: Path, process: subprocess.Popen, timeout: float) -> ServiceInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_info(home)
        if info is not None and info.pid == process.pid and _healthy(info.url):
            return info
        if process.poll() is not None:
            info = read_info(home)  # lost a start race to another service: use that one
            if info is not None and _is_service(info) and _healthy(info.url):
                return info
            raise ServiceError(
                f"the lorafleet service for {home} exited with code {process.returncode} while starting; "
                f"its log {paths(home).log} ends with:\n{tail(home, 20)}"
            )
        time.sleep(0.2)
    raise ServiceError(
        f"the lorafleet service for {home} did not answer within {timeout:.0f} s; see {paths(home).log}"
    )


def _wait_healthy(home: Path, info: ServiceInfo, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(info.url):
        if not _is_service(info):
            raise ServiceError(f"the lorafleet service for {home} died; see {paths(home).log}")
        if time.monotonic() > deadline:
            raise ServiceError(f"the lorafleet service for {home} does not answer; see {paths(home).log}")
        time.sleep(0.2)


def _reap_dead(home: Path) -> None:
    """A service that died uncleanly may leave Ray processes of its group training on: end them."""
    info = read_info(home)
    if info is None or _is_service(info):
        return
    if _group_is_the_services(info):
        _kill_group(info.pgid, signal.SIGKILL)
    if info.ray_session:
        kill_ray_session(info.ray_session)
    paths(home).info.unlink(missing_ok=True)


def _group_is_the_services(info: ServiceInfo) -> bool:
    """Whether process group `info.pgid` can only be the service's: the service is alive, or it led its
    group (pgid == its pid, as `_spawn` starts it) and no live process has that pid. The kernel gives no
    new process a number still in use as a group id, so while anything of the service's group lives,
    no other process has that pid; a live stranger with it means the group died out and the number was
    reused, for a group that is not ours to kill."""
    return _is_service(info) or (info.pgid == info.pid and not _alive(info.pgid))


def kill_ray_session(session_dir: str) -> int:
    """SIGKILL every process still holding a file of a local Ray session (workers and actors that
    outlived their raylet, reparented to init, out of any group we know). Returns how many."""
    import psutil

    killed = 0
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid == os.getpid():
                continue
            if any(f.path.startswith(session_dir) for f in process.open_files()):
                process.kill()
                killed += 1
    return killed


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    """Signal the service's process group and every descendant of it: Ray's workers start sessions of
    their own, so the group alone would miss a training worker."""
    import psutil

    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid:
                members.append(process)
    family = {p.pid: p for p in members}
    for process in members:
        with contextlib.suppress(psutil.Error):
            family.update({c.pid: c for c in process.children(recursive=True)})
    for process in family.values():
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


def stop_service(home: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the home's service (graceful, then forced, its whole process group); True if one ran. A pid
    file naming a stranger (the service crashed, its pid was reused) is removed, the stranger untouched."""
    info = read_info(home)
    if info is None:
        return False
    was_running = _is_service(info)
    if was_running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_service(info) and time.monotonic() < deadline:
            time.sleep(0.2)
    if _group_is_the_services(info):
        _kill_group(info.pgid, signal.SIGKILL)  # whatever of its Ray is left
        deadline = time.monotonic() + 10
        while _group_alive(info.pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if info.ray_session:
        kill_ray_session(info.ray_session)
    paths(home).info.unlink(missing_ok=True)
    return was_running


def _group_alive(pgid: int) -> bool:
    import psutil

    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def tail(home: Path, lines: int = 50) -> str:
    try:
        with paths(home).log.open(encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ---- the service process itself ----


def run_service(home: Path) -> int:
    """`lorafleet service run`: hold the home's lock, serve on a free localhost port until SIGTERM."""
    import socket

    import uvicorn

    from orchestrator.server.app import create_app
    from orchestrator.settings import Settings

    os.umask(PRIVATE_UMASK)  # before anything is written: the databases, logs and Ray's files alike
    service = paths(home)
    make_private(service.home)
    lock: IO[str] = _private_file(service.lock)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"a lorafleet service already runs for {service.home}", file=sys.stderr)
        return 0
    token = ensure_token(home)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(home=service.home, api_token=token)
    from orchestrator.control.controller import connect_ray, ray_session_dir
    from workers.storage import StorageError, check_writable

    try:
        check_writable(settings.storage_root)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    connect_ray(settings)  # before uvicorn, so its SIGTERM handler (graceful stop) is the one installed
    session = ray_session_dir() if settings.ray_address is None else None
    import psutil

    info = ServiceInfo(
        os.getpid(),
        os.getpgid(0),
        url,
        str(service.home),
        time.time(),
        session,
        process_started=psutil.Process().create_time(),
    )
    temp = service.info.with_suffix(".tmp")
    temp.write_text(json.dumps(asdict(info)))
    temp.replace(service.info)
    print(f"lorafleet service for {service.home} on {url} (pid {info.pid})", flush=True)
    config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        current = read_info(home)
        if current is not None and current.pid == info.pid:
            service.info.unlink(missing_ok=True)
        lock.close()
    return 0
