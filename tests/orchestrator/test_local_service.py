"""The local service, driven the way a person drives it: each CLI command a separate process.

A job submitted without `--wait` trains with no client attached; `cancel` from another shell stops it;
Ctrl-C on a watching client stops only the watching; a job whose base model cannot load fails alone,
with its reason, while a job submitted after it succeeds; a service killed mid-job is restarted by the
next command and the job finishes from its checkpoints. Every test stops its services: nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.server.local import _group_alive, kill_ray_session, read_info, stop_service
from workers.training.synthetic import write_skill_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service-data")
    for skill in ("counting", "colors", "animals"):
        write_skill_data(root / f"{skill}.jsonl", skill, 80)
    return root


def _stopped(home: Path) -> None:
    info = read_info(home)
    stop_service(home)
    if info is not None:
        assert not _group_alive(info.pgid), "the service left processes behind"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One home (and service) shared by the tests that do not kill or stop it."""
    where = tmp_path_factory.mktemp("service-home")
    yield where
    _stopped(where)


def cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "LORAFLEET_HOME": str(home),
        "LORAFLEET_TICK_SECONDS": "0.2",
        "HF_HUB_OFFLINE": "1",  # a hub id must fail here, not try the network
        "COLUMNS": "250",  # tables wide enough that a reason is not wrapped mid-word
    }
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spec_file(tmp: Path, base: str, data: Path, name: str, project: str, steps: int = 6, **train) -> Path:
    spec = {
        "name": name,
        "project": project,
        "base_model": base,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "max_seq_len": 48,
            "eval_every": 0,
            "checkpoint_every": 3,
            "learning_rate": 5e-3,
            **train,
        },
        "adapters": [
            {"name": "counting", "data": {"path": str(data / "counting.jsonl"), "eval_fraction": 0.1}},
            {"name": "colors", "data": {"path": str(data / "colors.jsonl")}},
        ],
    }
    path = tmp / f"{project}-{name}.yaml"
    path.write_text(json.dumps(spec))
    return path


def submit(home: Path, spec: Path) -> dict:
    done = cli(home, "submit", str(spec), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def status(home: Path, job_id: str) -> dict:
    done = cli(home, "status", job_id, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def until(home: Path, job_id: str, predicate, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = status(home, job_id)
        if predicate(view):
            return view
        assert time.monotonic() < deadline, f"timed out; last view: {view}"
        time.sleep(1)


def test_a_job_submitted_without_wait_trains_with_no_client_attached(
    home: Path, tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    job = submit(home, spec_file(tmp_path, str(tiny_base), data_dir, "nowait", "nowait"))
    assert job["state"] == "pending"
    assert time.monotonic() - started < 120  # returned without waiting for training
    view = until(home, job["id"], lambda v: v["state"] == "succeeded")
    assert {a["state"] for a in view["adapters"]} == {"evaluated"}
    assert all(a["step"] == 6 for a in view["adapters"])
    running = cli(home, "service", "status", "--json")
    assert running.returncode == 0 and json.loads(running.stdout)["healthy"] is True
    quiet = cli(home, "jobs", "--json")
    assert quiet.returncode == 0 and quiet.stderr == ""  # no Ray warnings, no tracebacks


def test_ui_prints_the_url_of_the_jobs_runs_once_it_answers_and_stops_with_it(
    home: Path, tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    import httpx

    job = submit(home, spec_file(tmp_path, str(tiny_base), data_dir, "shown", "ui", steps=2))
    until(home, job["id"], lambda v: v["state"] == "succeeded")
    port = _free_port()
    env = {**os.environ, "LORAFLEET_HOME": str(home)}
    ui = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "ui", job["id"], "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        url = ui.stdout.readline().strip()
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        assert "/runs?workflowType=machine_learning&searchFilter=" in url and job["id"] in url
        # Printed only once it answers: the URL works the moment it is shown, with no retry.
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        assert httpx.get(url, timeout=10).status_code == 200
        ui.terminate()  # stopping the command stops the UI it started, and all that started
        assert ui.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if ui.poll() is None:
            ui.terminate()  # never SIGKILL: it could not stop the UI's processes then
            ui.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.pid, signal.SIGKILL)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cancel_from_another_process_stops_a_running_job(
    home: Path, tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    job = submit(home, spec_file(tmp_path, str(tiny_base), data_dir, "long", "cancel", steps=100_000))
    until(home, job["id"], lambda v: any(a["step"] > 0 for a in v["adapters"]))
    asked = time.monotonic()
    cancelled = cli(home, "cancel", job["id"])
    assert cancelled.returncode == 0, cancelled.stderr
    view = until(home, job["id"], lambda v: v["state"] == "cancelled", timeout=60)
    assert time.monotonic() - asked < 60
    assert {a["state"] for a in view["adapters"]} == {"cancelled"}
    assert all(0 < a["step"] < 100_000 for a in view["adapters"])


def test_a_job_whose_base_model_cannot_load_fails_alone_and_later_jobs_run(
    home: Path, tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    log_before = (home / "service" / "service.log").stat().st_size
    bad = submit(home, spec_file(tmp_path, "lorafleet-tests/no-such-model", data_dir, "bad", "poison"))
    good = submit(home, spec_file(tmp_path, str(tiny_base), data_dir, "good", "after-poison"))
    failed = until(home, bad["id"], lambda v: v["state"] == "failed", timeout=60)
    assert all(a["state"] == "failed" and "base_model" in a["error"] for a in failed["adapters"])
    assert "base_model" in failed["error"]
    assert until(home, good["id"], lambda v: v["state"] == "succeeded")["state"] == "succeeded"
    # the reason is in the tables too, not only in --json
    table = cli(home, "status", bad["id"])
    assert "base_model" in table.stdout and "failed" in table.stdout
    assert "base_model" in cli(home, "jobs").stdout
    # failed once, not retried every tick: the log did not fill with tracebacks
    log = (home / "service" / "service.log").read_text()[log_before:]
    assert log.count("Traceback") <= 1, log[-3000:]
    # and MLflow says so too: the adapters' runs failed, with the reason as a tag
    from mlflow import MlflowClient

    mlflow = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")

    def failed_runs() -> list:
        experiment = mlflow.get_experiment_by_name("lorafleet/poison")
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        return [
            r for r in runs if r.data.tags.get("lorafleet.kind") == "adapter" and r.info.status == "FAILED"
        ]

    deadline = time.monotonic() + 30
    while len(failed_runs()) < 2:
        assert time.monotonic() < deadline, "the failure never reached MLflow"
        time.sleep(0.5)
    assert all("base_model" in r.data.tags["lorafleet.error"] for r in failed_runs())


def test_a_bad_record_deep_in_a_file_fails_that_adapter_alone(
    home: Path, tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    lines = (data_dir / "animals.jsonl").read_text().splitlines()
    deep = tmp_path / "deep.jsonl"
    deep.write_text("\n".join([*lines, *lines[:40], '{"prompt": "x", "completion": 7}', *lines[:5]]) + "\n")
    spec = json.loads(spec_file(tmp_path, str(tiny_base), data_dir, "deep", "deep").read_text())
    spec["adapters"][1]["data"]["path"] = str(deep)  # passes submit: its first 100 records are fine
    path = tmp_path / "deep.yaml"
    path.write_text(json.dumps(spec))
    job = submit(home, path)
    view = until(home, job["id"], lambda v: v["state"] not in ("pending", "running"))
    states = {a["name"]: a for a in view["adapters"]}
    assert view["state"] == "partial"
    assert states["counting"]["state"] == "evaluated"
    assert states["colors"]["state"] == "failed" and "line 121" in states["colors"]["error"]
    assert "completion" in states["colors"]["error"]


def test_ctrl_c_stops_watching_and_the_job_goes_on(
    home: Path, tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    spec = spec_file(tmp_path, str(tiny_base), data_dir, "watched", "ctrl-c", steps=40)
    env = {**os.environ, "LORAFLEET_HOME": str(home), "LORAFLEET_TICK_SECONDS": "0.2"}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(spec), "--wait"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    jobs: list[dict] = []
    while not jobs:
        assert time.monotonic() < deadline
        time.sleep(0.5)
        jobs = [j for j in json.loads(cli(home, "jobs", "--json").stdout) if j["project"] == "ctrl-c"]
    watcher.send_signal(signal.SIGINT)
    _, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 130, stderr
    assert "stopped watching" in stderr and "Traceback" not in stderr
    view = until(home, jobs[0]["id"], lambda v: v["state"] == "succeeded")
    assert all(a["step"] == 40 for a in view["adapters"])


def test_a_killed_service_is_restarted_by_the_next_command_and_the_job_resumes(
    tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    try:
        spec = spec_file(tmp_path, str(tiny_base), data_dir, "killed", "kill", steps=400, checkpoint_every=10)
        job = submit(home, spec)
        until(home, job["id"], lambda v: min(a["step"] for a in v["adapters"]) >= 30)
        dead = read_info(home)
        os.kill(dead.pid, signal.SIGKILL)
        time.sleep(1)
        view = status(home, job["id"])  # this command restarts the service
        restarted = read_info(home)
        assert restarted.pid != dead.pid and not _group_alive(dead.pgid)  # no orphan trains on
        assert dead.ray_session and kill_ray_session(dead.ray_session) == 0  # not even outside its group
        assert view["state"] == "running"
        view = until(home, job["id"], lambda v: v["state"] == "succeeded")
        assert all(a["step"] == 400 for a in view["adapters"])
        _assert_resumed_once(home, job["id"], ("counting", "colors"), steps=400, every=10)
    finally:
        _stopped(home)


def _assert_resumed_once(home: Path, job_id: str, adapters: tuple[str, ...], steps: int, every: int) -> None:
    """Each adapter resumed from a checkpoint (not from scratch), redid at most one checkpoint interval,
    lost no step the engine reported, and MLflow has every step exactly once."""
    from mlflow import MlflowClient

    from orchestrator import Client

    with Client(home=home) as client:
        events = client.job(job_id).events(0)
        project = client.job(job_id).view.project
    for adapter in adapters:
        done = [e.step for e in events if e.kind == "step" and e.adapter == adapter]
        resumes = [
            e.step for e in events if e.kind == "start" and e.adapter == adapter and e.payload["resumed"]
        ]
        assert resumes and all(r > 0 and r % every == 0 for r in resumes), resumes
        redone = {s for s in done if done.count(s) > 1}
        assert all(any(r < s <= r + every for r in resumes) for s in redone), (resumes, sorted(redone))
        assert set(done) == set(range(1, steps + 1))  # no step lost, even those the dead controller missed
        print(f"[reliability] {adapter}: resumed at {resumes}, {len(redone)} steps redone, 0 lost")
    mlflow = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name(f"lorafleet/{project}")
    deadline = time.monotonic() + 60
    while True:
        runs = [
            r
            for r in mlflow.search_runs([experiment.experiment_id])
            if r.data.tags.get("lorafleet.kind") == "adapter"
        ]
        if len(runs) == len(adapters) and all(r.info.status == "FINISHED" for r in runs):
            break
        assert time.monotonic() < deadline, "MLflow did not catch up"
        time.sleep(1)
    for run in runs:
        history = mlflow.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))  # each step once, none missing


def test_one_service_per_home_and_stop_leaves_no_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert cli(home, "service", "status").returncode == 1  # not running: says so, exit 1
    env = {**os.environ, "LORAFLEET_HOME": str(home)}
    starters = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "service", "start"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    assert [p.wait(timeout=180) for p in starters] == [0, 0]
    info = read_info(home)
    described = json.loads(cli(home, "service", "status", "--json").stdout)
    assert described["pid"] == info.pid and described["url"] == info.url
    service_processes = [
        line
        for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
        if "orchestrator.cli service run" in line
    ]
    token = home / "service" / "token"
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    assert cli(home, "service", "stop").returncode == 0
    assert not _group_alive(info.pgid) and read_info(home) is None
    assert service_processes  # it ran; the count across homes is not ours to assert


def test_a_stale_pid_file_naming_a_stranger_is_no_service_and_the_stranger_lives(tmp_path: Path) -> None:
    """After a crash, `service.json`'s pid may name any process started since. It was taken for the
    service: `service status` said running, every command waited 180 s for it to answer, and `service
    stop` killed it (and its process group). Now the pid must also have the service's start time (or,
    in a file from before start times were kept, its command line)."""
    import dataclasses

    home = tmp_path / "home"
    (home / "service").mkdir(parents=True)
    os.chmod(home, 0o755)  # a home as an older lorafleet left it, with files others could read
    (home / "events").mkdir(mode=0o755)
    (home / "events" / "old.jsonl").write_text("{}\n")
    os.chmod(home / "events" / "old.jsonl", 0o644)
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)  # leads a group, as a service
    crashed = {  # what the crashed service wrote, before start times were kept
        "pid": stranger.pid,
        "pgid": stranger.pid,
        "url": f"http://127.0.0.1:{_free_port()}",
        "home": str(home),
        "started_at": time.time() - 3600,
        "ray_session": None,
    }
    try:
        (home / "service" / "service.json").write_text(json.dumps(crashed))
        described = cli(home, "service", "status", "--json", timeout=60)
        assert described.returncode == 1 and json.loads(described.stdout)["running"] is False
        stopped = cli(home, "service", "stop", timeout=60)
        assert stopped.returncode == 0 and "no service was running" in stopped.stderr
        assert stranger.poll() is None, "`service stop` killed a process that was not the service"
        (home / "service" / "service.json").write_text(json.dumps(crashed))
        started = cli(home, "service", "start", timeout=170)  # the stranger is not waited for
        assert started.returncode == 0, started.stderr
        info = read_info(home)
        assert info is not None and info.pid != stranger.pid and stranger.poll() is None
        # the pid and the start time the service recorded name it; the same pid started at another time not
        from orchestrator.server.local import _is_service

        assert _is_service(info)
        assert not _is_service(dataclasses.replace(info, process_started=info.process_started - 3600))
        # an older, wider home is tightened on start, with what it held
        old = (home, home / "events", home / "events" / "old.jsonl")
        modes = [oct(p.stat().st_mode & 0o777) for p in old]
        assert modes == ["0o700", "0o700", "0o600"]
    finally:
        _stopped(home)
        stranger.kill()
        stranger.wait()


def test_the_home_and_everything_in_it_are_for_its_user_only(
    home: Path, tiny_base: Path, data_dir: Path, tmp_path: Path
) -> None:
    """`lorafleet.db`, `mlflow.db` and the event logs (job specs, data paths, metrics) were readable by
    every local user; now nothing in a home has a group or other permission bit."""
    job = submit(home, spec_file(tmp_path, str(tiny_base), data_dir, "private", "private", steps=2))
    until(home, job["id"], lambda v: v["state"] == "succeeded")
    present = {p.name for p in home.iterdir()} | {p.name for p in (home / "artifacts").iterdir()}
    assert {"lorafleet.db", "mlflow.db", "events", "adapters"} <= present
    wide = [f"{oct(mode)} {path}" for path, mode in _modes(home).items() if mode & 0o077]
    assert wide == []


def _modes(root: Path) -> dict[Path, int]:
    """The permission bits of `root` and everything under it but links. A file that goes between the
    listing and its stat (a SQLite `-journal` the running service removes as it commits) is skipped: it
    was there with the database's own mode, and is gone."""
    modes = {}
    for path in [root, *root.rglob("*")]:
        try:
            status = path.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISLNK(status.st_mode):
            modes[path] = status.st_mode & 0o777
    return modes


def _train_workers(session: str) -> list:
    """The Ray Train worker processes of a local service's Ray session."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(process.info["cmdline"] or [])
            if "RayTrainWorker" in title and any(f.path.startswith(session) for f in process.open_files()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_killed_train_worker_resumes_from_its_s3_checkpoint_and_mlflow_shows_each_step_once(
    tiny_base: Path,
    data_dir: Path,
    tmp_path: Path,
    s3_bucket: str,
    s3_server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `LORAFLEET_STORAGE=s3://...` on a real S3-compatible server: checkpoints, the packs' event
    logs and Ray Train's run storage live in the bucket; a killed worker resumes from the S3 checkpoint;
    the adapter exports and serves from S3; nothing of it lands on the local disk."""
    from workers.training.checkpoint import read_adapter

    home = tmp_path / "home"
    prefix = "team/lorafleet"
    monkeypatch.setenv("LORAFLEET_STORAGE", f"s3://{s3_bucket}/{prefix}")  # the service inherits it
    try:
        spec = spec_file(
            tmp_path, str(tiny_base), data_dir, "worker", "worker-kill", steps=200, checkpoint_every=10
        )
        job = submit(home, spec)
        until(home, job["id"], lambda v: min(a["step"] for a in v["adapters"]) >= 25)
        info = read_info(home)
        workers = _train_workers(info.ray_session)
        assert workers, "no Ray Train worker found"
        for worker in workers:
            worker.kill()
        view = until(home, job["id"], lambda v: v["state"] not in ("pending", "running"))
        assert view["state"] == "succeeded" and all(a["step"] == 200 for a in view["adapters"])
        _assert_resumed_once(home, job["id"], ("counting", "colors"), steps=200, every=10)

        keys = s3_server.keys(s3_bucket, prefix + "/")
        final = f"{prefix}/adapters/worker-kill/counting/final/"
        assert {
            final + f for f in ("adapter_config.json", "adapter_model.safetensors", "lorafleet.json")
        } <= set(keys)
        assert any(k.startswith(f"{prefix}/adapters/worker-kill/counting/checkpoint-") for k in keys)
        assert any(k.startswith(f"{prefix}/events/") for k in keys)  # the packs' event logs
        assert any(k.startswith(f"{prefix}/ray/pack-") for k in keys)  # Ray Train's run storage
        assert not (home / "artifacts").exists()  # nothing of it on the server's disk

        exported = tmp_path / "exported"
        done = cli(home, "export", "worker-kill/counting", "--out", str(exported), "--json")
        assert done.returncode == 0, done.stderr
        ours = read_adapter(exported).weights
        stored = read_adapter(f"s3://{s3_bucket}/{final}").weights
        assert ours.keys() == stored.keys() and all((ours[k].lora_B == stored[k].lora_B).all() for k in ours)
        said = cli(home, "generate", "worker-kill/counting", "count: 1 2 3", "--json")
        assert said.returncode == 0 and json.loads(said.stdout)["text"], said.stderr
    finally:
        _stopped(home)
