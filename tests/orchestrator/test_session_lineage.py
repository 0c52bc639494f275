"""Training sessions in SQL, the lineage tree and MLflow: a session is a job of kind `session`, its saved
states are trained adapters of that job (branchable, exportable, promotable), its calls' metrics reach
its MLflow run through the event log, and every way it ends (close, save with close, idle, a server that
stopped or restarted) ends its job with the reason.

One real server (uvicorn over the real app, the controller and the MLflow mirror running, local Ray) is
shared by the module; the `Client` and the CLI talk to it over HTTP. The tiny random base of
`tests/conftest.py` keeps every step a fraction of a second; the one branch trains one short pack.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli.commands import app as cli_app
from orchestrator.client.client import ApiError, Client
from orchestrator.client.training import StatePath, TrainingClient
from orchestrator.server.app import create_app
from orchestrator.service import session_records
from orchestrator.settings import Settings
from orchestrator.spec.states import JobKind, JobState
from orchestrator.store import Conflict, Store
from tests.conftest import own_local_ray
from tests.workers.test_sessions import _random_data
from workers.contract.plan import LoraConfig
from workers.contract.sessions import AdamParams
from workers.training.synthetic import write_skill_data

pytestmark = pytest.mark.slow

ADMIN = "admin-secret"
ADAM = AdamParams(learning_rate=5e-3)
WEIGHTS = "adapter_model.safetensors"


@dataclass
class Server:
    url: str
    app: FastAPI
    settings: Settings

    @property
    def plane(self) -> Any:
        return self.app.state.plane

    def client(self, token: str = ADMIN, project: str = "default") -> Client:
        return Client(self.url, token, project=project)


def _wait_until(predicate: Callable[[], Any], timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)
    return value


@contextmanager
def _serve(settings: Settings, start_controller: bool = False) -> Iterator[Server]:
    """The real app behind uvicorn on a free port; stopped (its lifespan's shutdown run) on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(settings, start_controller=start_controller)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_until(lambda: server.started, timeout=60)
    try:
        yield Server(f"http://127.0.0.1:{port}", app, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _settings(home: Path, tiny_base: Path, **extra: Any) -> Settings:
    return Settings(home=home, api_token=ADMIN, model_roots=str(tiny_base.parent), tick_seconds=0.2, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with (
        own_local_ray(),
        _serve(_settings(tmp_path_factory.mktemp("home"), tiny_base), start_controller=True) as s,
    ):
        yield s


@pytest.fixture(scope="module")
def alpha(server: Server) -> Iterator[Client]:
    with server.client() as admin:
        secret = admin.create_token("alpha", "member")["token"]
    with server.client(secret, "alpha") as client:
        yield client


@pytest.fixture(scope="module")
def beta(server: Server) -> Iterator[Client]:
    with server.client() as admin:
        secret = admin.create_token("beta", "member")["token"]
    with server.client(secret, "beta") as client:
        yield client


def _session(client: Client, tiny_base: Path) -> TrainingClient:
    return client.create_lora_training_client(str(tiny_base), rank=4, alpha=8, targets=["q_proj", "v_proj"])


def _steps(tc: TrainingClient, seeds: range) -> list[tuple[float, float]]:
    """(loss, grad_norm) of one forward_backward + optim_step per seed, both queued before waiting."""
    out = []
    for seed in seeds:
        fb, step = tc.forward_backward(_random_data(seed)), tc.optim_step(ADAM)
        out.append((fb.result(timeout=60).loss, step.result(timeout=60).metrics["grad_norm"]))
    return out


@pytest.fixture(scope="module")
def chain(alpha: Client, tiny_base: Path) -> dict[str, Any]:
    """One session of project alpha: two steps, state `first`, a third step, state `second`."""
    tc = _session(alpha, tiny_base)
    steps = _steps(tc, range(2))
    first = tc.save_state("first").result(timeout=60)
    steps += _steps(tc, range(2, 3))
    second = tc.save_state("second").result(timeout=60)
    return {"tc": tc, "id": tc.session_id, "steps": steps, "first": first, "second": second}


def test_a_session_is_a_job_and_its_saved_states_are_a_chain_of_adapters(
    alpha: Client, chain: dict[str, Any]
) -> None:
    sid, first, second = chain["id"], chain["first"], chain["second"]
    assert isinstance(first, StatePath) and isinstance(first, str)
    assert first.adapter == f"alpha/{sid}.first" and first.path == str(first)
    assert Path(first, WEIGHTS).is_file()

    job = alpha.job(sid).view
    assert (job.kind, job.state, job.project, job.end_reason) == (
        JobKind.SESSION,
        JobState.RUNNING,
        "alpha",
        None,
    )
    assert {a.name for a in job.adapters} == {f"{sid}.first", f"{sid}.second"}
    assert any(j.id == sid and j.kind == "session" for j in alpha.jobs("alpha"))

    by_name = {a.name: a for a in alpha.adapters(project="alpha")}
    one, two = by_name[f"{sid}.first"], by_name[f"{sid}.second"]
    assert one.state in ("trained", "evaluated") and two.state in ("trained", "evaluated")
    assert (one.final_checkpoint, one.step, one.parent) == (first.path, 2, None)
    assert (two.final_checkpoint, two.step, two.parent) == (second.path, 3, first.adapter)
    assert (two.root, two.depth) == (first.adapter, 1)

    tree = alpha.lineage(f"{sid}.second")
    assert tree.name.endswith(f"{sid}.first") and [c.name for c in tree.children] == [second.adapter]

    (live,) = [s for s in alpha.sessions() if s.id == sid]
    assert live.saved_states == [first.adapter, second.adapter] and live.step == 3

    with pytest.raises(ApiError) as taken:  # a name saved twice: refused before anything is written
        chain["tc"].save_state("first").result(timeout=60)
    assert taken.value.status == 409
    assert len(alpha.job(sid).view.adapters) == 2


def test_states_of_a_session_started_from_a_state_have_that_state_as_parent(
    alpha: Client, chain: dict[str, Any], tiny_base: Path
) -> None:
    second = chain["second"]
    from_adapter = alpha.create_training_client_from_state(second.adapter)
    from_path = alpha.create_training_client_from_state(second.path)
    for tc in (from_adapter, from_path):
        _steps(tc, range(1))
        saved = tc.save_state("next", close=True).result(timeout=60)
        assert alpha.adapter(saved.adapter.partition("/")[2]).parent == second.adapter
        assert alpha.adapter(saved.adapter.partition("/")[2]).step == 4  # 3 restored with the optimizer, +1


def test_the_cli_lists_sessions_their_jobs_and_their_saved_states(
    server: Server, chain: dict[str, Any]
) -> None:
    def cli(*args: str) -> str:
        result = CliRunner().invoke(
            cli_app, [*args, "--url", server.url, "--token", ADMIN], env={"COLUMNS": "400"}
        )
        assert result.exit_code == 0, result.output
        return result.stdout

    sid = chain["id"]
    assert f"{sid}.first" in cli("adapters", "--project", "alpha")
    shown = cli("sessions", "--project", "alpha")
    assert sid in shown and f"{sid}.second" in shown
    assert sid in cli("jobs", "--project", "alpha") and "session" in cli("jobs", "--project", "alpha")
    listed = cli("sessions", "--json")
    assert f'"{sid}"' in listed and f"alpha/{sid}.first" in listed


def test_a_saved_state_branches_exports_bit_for_bit_and_promotes(
    alpha: Client, chain: dict[str, Any], tmp_path: Path
) -> None:
    sid, first = chain["id"], chain["first"]
    data = tmp_path / "counting.jsonl"
    write_skill_data(data, "counting", 40)
    child = alpha.branch(
        f"{sid}.first",
        "from-a-session",
        {"path": str(data), "eval_fraction": 0.1},
        train={"steps": 2, "batch_size": 4, "max_seq_len": 48, "eval_every": 0, "checkpoint_every": 0},
        eval={"max_examples": 0},
    )
    view = child.wait(timeout=300)
    assert view.state == "succeeded", view
    trained = alpha.adapter("from-a-session")
    assert trained.parent == first.adapter and trained.parent_checkpoint == first.path

    out = alpha.export(f"{sid}.first", tmp_path / "export")
    assert (out / WEIGHTS).read_bytes() == Path(first.path, WEIGHTS).read_bytes()

    promoted = alpha.promote(f"{sid}.first", force=True)
    assert promoted.decision == "promoted"


def test_another_projects_token_sees_nothing_of_a_session(
    beta: Client, chain: dict[str, Any], tiny_base: Path
) -> None:
    sid, first = chain["id"], chain["first"]
    assert all(s.id != sid for s in beta.sessions())
    assert all(j.id != sid for j in beta.jobs())
    for attempt in (
        lambda: beta.job(sid),
        lambda: beta.adapter(f"alpha/{sid}.first"),
        lambda: beta.close_session(sid),
        lambda: beta.create_training_client_from_state(first.adapter),
    ):
        with pytest.raises(ApiError) as refused:
            attempt()
        assert refused.value.status in (403, 404)


def test_the_sessions_mlflow_run_has_its_params_metrics_by_step_and_states(
    server: Server, chain: dict[str, Any], tiny_base: Path
) -> None:
    sid = chain["id"]
    plane = server.plane
    _wait_until(lambda: plane.store.get_job(sid).mlflow_run_id and plane.tracker.sync() == 0)
    run_id = plane.store.get_job(sid).mlflow_run_id
    mlflow = MlflowClient(str(server.settings.mlflow_uri))
    run = mlflow.get_run(run_id)
    assert run.data.tags["lorafleet.kind"] == "session" and run.info.run_name == sid
    assert run.data.params["base_model"] == str(tiny_base)
    assert (run.data.params["lora.r"], run.data.params["seed"]) == ("4", "0")
    losses = [(m.step, m.value) for m in mlflow.get_metric_history(run_id, "loss:sum")]
    norms = [(m.step, m.value) for m in mlflow.get_metric_history(run_id, "grad_norm")]
    assert sorted(losses) == [(i + 1, pytest.approx(loss)) for i, (loss, _) in enumerate(chain["steps"])]
    assert sorted(norms) == [(i + 1, pytest.approx(norm)) for i, (_, norm) in enumerate(chain["steps"])]
    children = mlflow.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    states = {r.info.run_name: r for r in children}
    assert {f"{sid}.first", f"{sid}.second"} <= set(states)
    artifacts = {f.path for f in mlflow.list_artifacts(states[f"{sid}.first"].info.run_id, "adapter")}
    assert f"adapter/{WEIGHTS}" in artifacts


def test_close_and_save_with_close_end_the_job_with_their_reasons(alpha: Client, tiny_base: Path) -> None:
    closed = _session(alpha, tiny_base)
    _steps(closed, range(1))
    alpha.close_session(closed.session_id)
    job = alpha.job(closed.session_id).view
    assert (job.state, job.end_reason) == ("succeeded", session_records.CLOSED)
    with pytest.raises(ApiError) as gone:
        alpha.close_session(closed.session_id)
    assert gone.value.status == 404

    saved = _session(alpha, tiny_base)
    state = saved.save_state("last", close=True).result(timeout=60)
    _wait_until(lambda: alpha.job(saved.session_id).view.state != "running", timeout=30)
    job = alpha.job(saved.session_id).view
    assert (job.state, job.end_reason) == ("succeeded", session_records.saved_reason(state.adapter))
    assert alpha.adapter(state.adapter.partition("/")[2]).final_checkpoint == state.path


def test_idle_sessions_end_and_a_restart_ends_the_sessions_of_the_last_life(
    tiny_base: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path / "home", tiny_base, session_idle_seconds=0.5)
    with _serve(settings) as first, first.client() as admin:
        idle = _session(admin, tiny_base)
        _wait_until(lambda: admin.job(idle.session_id).view.state != "running", timeout=60)
        job = admin.job(idle.session_id).view
        assert (job.state, job.end_reason) == ("cancelled", session_records.idle_reason(0.5))
        # a session the server held when it died: its job row, running, and nothing in memory
        first.plane.store.create_session_job("default", "sess-orphan", {"base_model": str(tiny_base)})
    settings = _settings(tmp_path / "home", tiny_base)
    with _serve(settings) as second, second.client() as admin:
        orphan = admin.job("sess-orphan").view
        assert (orphan.state, orphan.end_reason) == ("cancelled", session_records.RESTARTED)
        live = _session(admin, tiny_base)
    with Store(settings.database_url) as store:  # a clean stop ends the sessions it held
        stopped = store.get_job(live.session_id)
    assert (stopped.state, stopped.end_reason) == ("cancelled", session_records.STOPPED)


# ---- the store, on SQLite and PostgreSQL ----


def test_session_jobs_are_outside_the_controllers_jobs_and_a_state_is_recorded_once(store: Store) -> None:
    spec = {"base_model": "b", "quantization": "none", "dtype": "float32", "seed": 3}
    job = store.create_session_job("p", "sess-1", spec)
    assert (job.kind, job.state, job.name) == (JobKind.SESSION, JobState.RUNNING, "sess-1")
    assert store.job_states([JobState.RUNNING], kind=JobKind.TRAIN) == {}
    assert store.job_states([JobState.RUNNING]) == {"sess-1": JobState.RUNNING}
    assert [j.id for j in store.list_jobs(kind=JobKind.SESSION)] == ["sess-1"]

    lora = LoraConfig(r=4, alpha=8)
    one = store.add_saved_state("sess-1", "sess-1.a", "/x/a", 2, lora, None)
    two = store.add_saved_state("sess-1", "sess-1.b", "/x/b", 5, lora, one.id)
    assert (two.parent_id, two.root_id, two.depth, two.train.seed) == (one.id, one.id, 1, 3)
    assert store.adapter_at("p", "/x/b") == two and store.adapter_at("q", "/x/b") is None
    assert [c.path for c in store.list_checkpoints(two.id)] == ["/x/b"]
    events = [e for e in store.list_events("sess-1") if e.kind == "done"]
    assert [(e.adapter_id, e.payload["final_dir"]) for e in events] == [(one.id, "/x/a"), (two.id, "/x/b")]

    with pytest.raises(Conflict):
        store.add_saved_state("sess-1", "sess-1.a", "/x/c", 6, lora, two.id)
    assert len(store.list_adapters(job_id="sess-1")) == 2 and store.adapter_at("p", "/x/c") is None
    assert len(store.list_events("sess-1")) == 2

    ended = store.end_session_job("sess-1", JobState.SUCCEEDED, "closed")
    assert ended is not None and (ended.state, ended.end_reason) == (JobState.SUCCEEDED, "closed")
    assert store.end_session_job("sess-1", JobState.CANCELLED, "idle") is None  # ended once, first reason
    assert store.get_job("sess-1").end_reason == "closed"
