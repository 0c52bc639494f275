"""A PostgreSQL outage mid-job, for real: the test's own PostgreSQL server is stopped while a job trains and
started again after its pack has ended. Nothing the engine reported may be lost, the job must settle, and
the API must say 503 (JSON, `Retry-After`) meanwhile, to admin and project tokens alike, while a
`lorafleet status --wait` in another process waits the outage out.

The controller is ticked by the test (not by its thread), so the outage covers exactly what it should:
events drained and a pack reaped while the database is down. The API is a real uvicorn server on the same
plane; Ray is the shared local one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE

import httpx
import pytest
import ray
import uvicorn
from mlflow import MlflowClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from orchestrator.client.client import Client
from orchestrator.control.controller import Controller
from orchestrator.control.packrun import EventLog
from orchestrator.server.app import create_app
from orchestrator.service.plane import ControlPlane
from orchestrator.settings import Settings
from orchestrator.store import DatabaseUnavailable
from tests.orchestrator.conftest import OwnPostgres
from workers.training.synthetic import write_skill_data

ADMIN = "s3cret"
STEPS = 40  # enough that the database goes down mid-job however fast the tiny base trains


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="lorafleet")
    yield


@pytest.fixture
def outage_db(own_postgres: OwnPostgres) -> Iterator[str]:
    """A fresh database on the server the test may stop."""
    admin = create_engine(own_postgres.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"lf_outage_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield own_postgres.url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        if _is_down(own_postgres):  # the test failed mid-outage
            own_postgres.start()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _is_down(cluster: OwnPostgres) -> bool:
    return not (cluster.data / "postmaster.pid").exists()


@pytest.fixture
def served(tmp_path: Path, outage_db: str) -> Iterator[tuple[str, ControlPlane]]:
    """A real HTTP server (uvicorn, in a thread) over a plane on the outage database; its controller is
    not started: the test ticks it."""
    settings = Settings(home=tmp_path / "home", db_url=outage_db, api_token=ADMIN, tick_seconds=0.2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(settings, start_controller=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    _wait_until(lambda: server.started)
    try:
        yield url, app.state.plane
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wait_until(predicate, timeout: float = 300.0, tick: Controller | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        if tick is not None:
            with contextlib.suppress(DatabaseUnavailable):  # the outage: what it took waits in it
                tick.tick()
        time.sleep(0.2)


def _spec(base: Path, data: Path) -> dict:
    return {
        "name": "outage",
        "base_model": str(base),
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": STEPS, "batch_size": 2, "max_seq_len": 32, "eval_every": 0, "checkpoint_every": 5},
        "adapters": [{"name": "counting", "data": {"path": str(data)}}],
    }


def test_database_restart_mid_job_loses_nothing_settles_the_job_and_answers_503(
    tiny_base: Path, tmp_path: Path, own_postgres: OwnPostgres, served: tuple[str, ControlPlane]
) -> None:
    url, plane = served
    controller = plane.controller
    data = tmp_path / "counting.jsonl"
    write_skill_data(data, "counting", 40)
    with Client(url, ADMIN) as client:
        job = client.submit(_spec(tiny_base, data))
        reader = client.create_token("default", "reader")["token"]
    adapter_id = plane.store.list_adapters(job_id=job.id)[0].id
    _wait_until(lambda: plane.store.get_adapter_by_id(adapter_id).step >= 2, tick=controller)
    (pack,) = plane.store.list_packs()
    durable = EventLog(plane.settings.storage_root, pack.id)

    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "cli-home"), "LORAFLEET_TOKEN": reader}
    status_wait = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "status",
        job.id,
        "--wait",
        "--json",
        "--url",
        url,
    ]
    waiting: subprocess.Popen | None = None
    assert plane.tracker.sync() > 0  # MLflow's mirror has the job's start; its cursor is mid-job
    own_postgres.stop()  # the outage begins mid-job
    try:
        for token in (ADMIN, reader):  # a project token is looked up in SQL before any route runs
            answer = httpx.get(f"{url}/v1/jobs/{job.id}", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 503, (token == ADMIN, answer.status_code, answer.text)
            assert int(answer.headers["Retry-After"]) > 0
            assert "database is unreachable" in answer.json()["detail"]["message"]
        waiting = subprocess.Popen(status_wait, env=env, stdout=PIPE, stderr=PIPE, text=True)
        # Training ends and its pack is reaped while the database is down.
        _wait_until(lambda: not controller.running, tick=controller)
        assert any(e.kind == "done" for e in durable.read())
        assert waiting.poll() is None, waiting.communicate()  # still waiting, not failed
        own_postgres.start()
        _wait_until(lambda: plane.service.job(job.id).done, timeout=120, tick=controller)
        stdout, stderr = waiting.communicate(timeout=300)
    finally:
        if _is_down(own_postgres):
            own_postgres.start()
        if waiting is not None and waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0, stderr
    assert json.loads(stdout)["state"] == "succeeded" and "database is unreachable" in stderr

    view = plane.service.job(job.id)
    assert view.state == "succeeded" and view.adapters[0].step == STEPS, view
    assert [p.state for p in plane.store.list_packs()] == ["succeeded"]
    # Everything the engine reported (steps, checkpoints, done) is in SQL, once, in the engine's order.
    reported = [e.id for e in durable.read()]
    assert {"step", "checkpoint", "done"} <= {e.kind for e in durable.read()}
    events = plane.store.list_events(job.id, limit=10_000)
    recorded = [e.payload.get("id") for e in events]
    assert [i for i in recorded if i in set(reported)] == reported
    assert [e.step for e in events if e.kind == "step"] == list(range(1, STEPS + 1))
    checkpoints = [(c.step, c.path, c.final) for c in plane.store.list_checkpoints(adapter_id)]
    assert len(checkpoints) == len(set(checkpoints)) and checkpoints[-1][0] == STEPS, checkpoints
    # The MLflow mirror follows SQL's event log by cursor: what was written late reaches it too.
    plane.tracker.sync()
    mlflow = MlflowClient(str(plane.settings.mlflow_uri))
    (run,) = mlflow.search_runs(
        [mlflow.get_experiment_by_name("lorafleet/default").experiment_id], "tags.`lorafleet.adapter` != ''"
    )
    history = mlflow.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1)) and run.info.status == "FINISHED"
