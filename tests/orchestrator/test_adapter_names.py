"""An adapter's name, as a new user meets it (issue 17): a failed adapter trains again under its name
(`retry`), an adapter that is not promoted, active or a parent can be deleted to free its name, a parent
that can never give weights is refused at submit, and a name looked up in the wrong project says where
it is. Tables keep ids and states whole at 80 columns.

The app runs in-process (FastAPI's TestClient over the real ASGI app, the real store on SQLite and
PostgreSQL, a real MLflow on SQLite, no controller thread): the adapters' earlier attempts are written
into SQL and storage as the controller would have, so nothing here trains (test_end_to_end does).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from orchestrator.server.app import create_app
from orchestrator.service.plane import ControlPlane
from orchestrator.settings import Settings
from orchestrator.store import AdapterChange, NewEvent
from workers import storage
from workers.training import checkpoint as ckpt
from workers.training.data import fingerprint

ADMIN = "admin-secret"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow database for the module (creating one costs seconds); each test has its projects."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def settings(tmp_path: Path, db_url: str, mlflow_uri: str) -> Settings:
    return Settings(
        home=tmp_path / "home", db_url=db_url, mlflow_uri=mlflow_uri, api_token=ADMIN, tick_seconds=0.2
    )


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, start_controller=False)) as client:
        yield client


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "skill.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    return path


def plane(api: TestClient) -> ControlPlane:
    return api.app.state.plane  # type: ignore[attr-defined]


def spec(base: Path, data: Path, *names: str, project: str = "default", parent: str | None = None) -> dict:
    adapters = [{"name": n, "data": {"path": str(data)}} for n in names]
    if parent is not None:
        adapters[0]["parent"] = parent
    return {"name": "job", "project": project, "base_model": str(base), "adapters": adapters}


def submit(api: TestClient, body: dict, headers: dict[str, str] = HEADERS) -> dict:
    answer = api.post("/v1/jobs", json=body, headers=headers)
    assert answer.status_code == 201, answer.text
    return answer.json()


def walk(b: ControlPlane, adapter_id: str, *states: str, **fields) -> None:
    """Move an adapter through `states` as the controller would (fields set with the last move)."""
    for i, state in enumerate(states):
        b.store.update_adapter(
            AdapterChange(adapter_id, state=state, **(fields if i == len(states) - 1 else {}))
        )


def message(answer) -> str:
    detail = answer.json()["detail"]
    return " ".join([detail["message"], *(p["message"] for p in detail["problems"])])


def test_a_failed_adapter_trains_again_under_its_name_resuming_unless_its_data_was_fixed(
    api: TestClient, tiny_base: Path, data: Path
) -> None:
    """Retry resumes from the newest complete checkpoint when the data is as it was; once the person
    fixed the data file, the old checkpoints (trained on the old rows) are dropped and it starts over."""
    job = submit(api, spec(tiny_base, data, "skill"))
    b = plane(api)
    a = b.store.get_adapter("default", "skill")
    assert api.post("/v1/adapters/default/skill/retry", headers=HEADERS).status_code == 409  # queued

    began_on = fingerprint(a.data, a.train.seed, a.name)  # its first attempt, as the engine reports it
    walk(b, a.id, "training", data_fingerprint=began_on, step=4)
    checkpoint = ckpt.checkpoint_dir(a.output_dir, 3)
    storage.write_bytes(storage.join(checkpoint, ckpt.META), b"{}")
    b.store.add_checkpoint(a.id, 3, checkpoint)
    walk(b, a.id, "failed", error="the worker died", mlflow_run_id="run-of-the-first-attempt")
    b.store.set_job_state(job["id"], "failed", error="skill: the worker died")

    resumed = api.post("/v1/adapters/default/skill/retry", headers=HEADERS)
    assert resumed.status_code == 200, resumed.text
    view = resumed.json()
    assert (view["name"], view["state"], view["error"], view["step"]) == ("skill", "queued", None, 4)
    assert ckpt.latest_checkpoint(a.output_dir) == checkpoint  # what the engine resumes from
    assert [c.step for c in b.store.list_checkpoints(a.id)] == [3]
    assert b.store.get_adapter_by_id(a.id).mlflow_run_id == "run-of-the-first-attempt"
    assert api.get(f"/v1/jobs/{job['id']}", headers=HEADERS).json()["state"] == "running"

    walk(b, a.id, "failed", error="row 7: not JSON")  # fails again; the person fixes the file
    data.write_text(data.read_text() + json.dumps({"text": "a fixed row"}) + "\n")
    again = api.post("/v1/adapters/default/skill/retry", headers=HEADERS)
    assert again.status_code == 200, again.text
    assert (again.json()["state"], again.json()["step"]) == ("queued", 0)
    fresh = b.store.get_adapter_by_id(a.id)
    assert not storage.exists(checkpoint) and ckpt.latest_checkpoint(a.output_dir) is None
    assert b.store.list_checkpoints(a.id) == [] and fresh.mlflow_run_id is None  # a new run, new steps

    walk(b, a.id, "failed", error="gone")
    data.unlink()  # a retry whose data is gone says so, and changes nothing
    missing = api.post("/v1/adapters/default/skill/retry", headers=HEADERS)
    assert missing.status_code == 400 and "restore `data.path`" in message(missing), missing.text
    assert b.store.get_adapter_by_id(a.id).state == "failed"


def test_a_job_retry_also_starts_over_an_adapter_whose_data_was_fixed(
    api: TestClient, tiny_base: Path, data: Path
) -> None:
    job = submit(api, spec(tiny_base, data, "skill"))
    b = plane(api)
    a = b.store.get_adapter("default", "skill")
    walk(b, a.id, "training", data_fingerprint=fingerprint(a.data, a.train.seed, a.name), step=3)
    storage.write_bytes(storage.join(ckpt.checkpoint_dir(a.output_dir, 3), ckpt.META), b"{}")
    walk(b, a.id, "failed", error="bad rows")
    b.store.set_job_state(job["id"], "failed")
    data.write_text(json.dumps({"text": "only good rows now"}) + "\n")
    assert api.post(f"/v1/jobs/{job['id']}/retry", headers=HEADERS).status_code == 200
    assert b.store.get_adapter_by_id(a.id).step == 0 and ckpt.latest_checkpoint(a.output_dir) is None


def test_a_cancelled_adapter_is_retried_but_not_before_a_parent_that_cannot_give_weights(
    api: TestClient, tiny_base: Path, data: Path
) -> None:
    submit(api, spec(tiny_base, data, "parent", "other"))
    b = plane(api)
    parent, other = b.store.get_adapter("default", "parent"), b.store.get_adapter("default", "other")
    b.store.update_adapter(AdapterChange(other.id, state="cancelled"))
    assert api.post("/v1/adapters/default/other/retry", headers=HEADERS).json()["state"] == "queued"

    walk(b, parent.id, "training", "trained", final_checkpoint="/nowhere")
    submit(api, spec(tiny_base, data, "child", parent="parent"))
    child = b.store.get_adapter("default", "child")
    b.store.update_adapter(AdapterChange(child.id, state="cancelled"))
    b.store.update_adapter(
        AdapterChange(parent.id, state="failed")
    )  # trained -> failed: its evaluation errored
    refused = api.post("/v1/adapters/default/child/retry", headers=HEADERS)
    assert refused.status_code == 409 and "retry the parent first" in message(refused), refused.text
    assert b.store.get_adapter_by_id(child.id).state == "cancelled"


def test_delete_frees_the_name_with_its_files_and_run_and_refuses_what_must_stay(
    api: TestClient, tiny_base: Path, data: Path, settings: Settings
) -> None:
    job = submit(api, spec(tiny_base, data, "skill", "kept"))
    b = plane(api)
    a, kept = b.store.get_adapter("default", "skill"), b.store.get_adapter("default", "kept")
    final = storage.join(a.output_dir, ckpt.FINAL_DIR)
    storage.write_bytes(storage.join(final, ckpt.META), b"{}")
    walk(b, a.id, "training", "trained", final_checkpoint=final, step=2)
    start = {"adapter": "skill", "kind": "start", "data_fingerprint": "f", "pack_id": "p"}
    b.store.record_events([NewEvent(job["id"], "start", a.id, 0, start)])
    b.tracker.sync()  # the mirror opened the adapter's child run
    run_id = b.store.get_adapter_by_id(a.id).mlflow_run_id
    assert run_id is not None

    branched = api.post(
        "/v1/adapters/default/skill/branch",
        json={"name": "child", "data": {"path": str(data)}},
        headers=HEADERS,
    )
    assert branched.status_code == 201, branched.text
    has_child = api.delete("/v1/adapters/default/skill", headers=HEADERS)
    assert has_child.status_code == 409 and "has children (default/child)" in message(has_child)
    queued = api.delete("/v1/adapters/default/child", headers=HEADERS)
    assert queued.status_code == 409 and "is queued: cancel its job first" in message(queued)
    b.store.update_adapter(AdapterChange(b.store.get_adapter("default", "child").id, state="cancelled"))
    assert api.delete("/v1/adapters/default/child", headers=HEADERS).json()["state"] == "cancelled"

    deleted = api.delete("/v1/adapters/default/skill", headers=HEADERS)
    assert deleted.status_code == 200 and deleted.json()["name"] == "skill", deleted.text
    assert api.get("/v1/adapters/default/skill", headers=HEADERS).status_code == 404
    assert not storage.exists(a.output_dir)
    mlflow = MlflowClient(str(settings.mlflow_uri))
    assert mlflow.get_run(run_id).info.lifecycle_stage == "deleted"
    b.tracker.sync()  # the mirror passes over the deleted adapter's events and opens no run again
    live = mlflow.search_runs(
        [mlflow.get_experiment_by_name("lorafleet/default").experiment_id],
        "tags.`lorafleet.adapter` = 'default/skill'",
    )
    assert live == []
    events = api.get(f"/v1/jobs/{job['id']}/events", headers=HEADERS).json()
    assert [(e["kind"], e["adapter"]) for e in events] == [("start", "skill"), ("deleted", "skill")]
    assert api.get(f"/v1/jobs/{job['id']}", headers=HEADERS).json()["adapter_count"] == 1  # the job stays

    again = submit(api, spec(tiny_base, data, "skill"))  # the name is free
    assert again["adapters"][0]["name"] == "skill"
    walk(b, kept.id, "training", "trained", "promoted", final_checkpoint=final)
    promoted = api.delete("/v1/adapters/default/kept", headers=HEADERS)
    assert promoted.status_code == 409 and "is promoted" in message(promoted)
    assert b.store.get_adapter("default", "kept").state == "promoted"


def test_a_delete_that_storage_refuses_leaves_the_adapter_and_its_run_as_they_were(
    tmp_path: Path, mlflow_uri: str, tiny_base: Path, data: Path, small_storage: Path
) -> None:
    """Storage remounted read-only: the delete answers 503 with the cause, and the rows, the files and
    the MLflow run are all still there; once writable again, the same delete goes through. Before, a
    removal that failed was ignored, the name freed, and the next adapter of that name would have
    resumed the old checkpoints."""
    settings = Settings(
        home=tmp_path / "home", mlflow_uri=mlflow_uri, api_token=ADMIN, storage=str(small_storage)
    )
    with TestClient(create_app(settings, start_controller=False)) as api:
        job = submit(api, spec(tiny_base, data, "skill", project="readonly"))
        b = plane(api)
        a = b.store.get_adapter("readonly", "skill")
        final = storage.join(a.output_dir, ckpt.FINAL_DIR)
        storage.write_bytes(storage.join(final, ckpt.META), b"{}")
        walk(b, a.id, "training", "trained", final_checkpoint=final)
        b.store.record_events([NewEvent(job["id"], "start", a.id, 0, {"adapter": "skill", "pack_id": "p"})])
        b.tracker.sync()
        run_id = b.store.get_adapter_by_id(a.id).mlflow_run_id
        mlflow = MlflowClient(mlflow_uri)

        subprocess.run(["mount", "-o", "remount,ro", str(small_storage)], check=True)
        try:
            refused = api.delete("/v1/adapters/readonly/skill", headers=HEADERS)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_storage)], check=True)
        assert refused.status_code == 503 and "storage is read-only (EROFS)" in message(refused), refused.text
        assert b.store.get_adapter("readonly", "skill").state == "trained"
        assert storage.exists(storage.join(final, ckpt.META))
        assert mlflow.get_run(run_id).info.lifecycle_stage == "active"

        assert api.delete("/v1/adapters/readonly/skill", headers=HEADERS).status_code == 200
        assert not storage.exists(a.output_dir) and mlflow.get_run(run_id).info.lifecycle_stage == "deleted"


def test_a_child_of_a_failed_or_cancelled_parent_is_refused_at_submit_with_the_fix(
    api: TestClient, tiny_base: Path, data: Path
) -> None:
    """Before: accepted at submit, then failed ('parent ... is failed'), burning the child's name."""
    submit(api, spec(tiny_base, data, "broken", "training"))
    b = plane(api)
    b.store.update_adapter(AdapterChange(b.store.get_adapter("default", "broken").id, state="failed"))
    refused = api.post("/v1/jobs", json=spec(tiny_base, data, "child", parent="broken"), headers=HEADERS)
    assert refused.status_code == 422, refused.text
    (problem,) = refused.json()["detail"]["problems"]
    assert problem["field"] == "adapters.0.parent"
    assert "is failed" in problem["message"] and "lorafleet retry broken" in problem["message"]
    branch = api.post(
        "/v1/adapters/default/broken/branch",
        json={"name": "child", "data": {"path": str(data)}},
        headers=HEADERS,
    )
    assert branch.status_code == 422 and "retry it first" in message(branch)
    assert api.get("/v1/adapters/default/child", headers=HEADERS).status_code == 404  # the name is free

    walk(b, b.store.get_adapter("default", "training").id, "training")  # still training: the child waits
    submit(api, spec(tiny_base, data, "child", parent="training"))


def test_a_name_looked_up_in_the_wrong_project_says_where_it_is_but_never_a_hidden_project(
    api: TestClient, tiny_base: Path, data: Path
) -> None:
    submit(api, spec(tiny_base, data, "shared", project="research"))
    submit(api, spec(tiny_base, data, "shared", project="secret"))
    made = api.post("/v1/tokens", json={"project": "research"}, headers=HEADERS)
    research = {"Authorization": f"Bearer {made.json()['token']}"}

    for method, path in [
        ("GET", "/v1/adapters/default/shared/lineage"),
        ("GET", "/v1/adapters/default/shared"),
        ("POST", "/v1/adapters/default/shared/retry"),
        ("DELETE", "/v1/adapters/default/shared"),
    ]:
        admin = api.request(method, path, headers=HEADERS)
        assert (
            admin.status_code == 404
            and "exists in project(s) research, secret: use --project research" in (message(admin))
        ), (path, admin.text)
        member = api.request(method, path, headers=research)
        assert member.status_code == 404 and "exists in project(s) research:" in message(member)
        assert "secret" not in member.text, member.text

    # another project's adapter is, to a project token, exactly a missing one: it is neither retried,
    # nor deleted, nor named
    for method, path in [
        ("POST", "/v1/adapters/secret/shared/retry"),
        ("DELETE", "/v1/adapters/secret/shared"),
    ]:
        hidden = api.request(method, path, headers=research)
        assert hidden.status_code == 404 and "secret" in hidden.json()["detail"]["message"]
        assert "exists in" in hidden.text and "project(s) research" in hidden.text
    assert plane(api).store.get_adapter("secret", "shared").state == "queued"
    missing = api.get("/v1/adapters/default/nowhere", headers=HEADERS)
    assert missing.status_code == 404 and message(missing) == "adapter default/nowhere not found"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_cli_at_80_columns_keeps_ids_and_states_whole_and_retries_and_deletes_by_name(
    tmp_path: Path, mlflow_uri: str, tiny_base: Path, data: Path
) -> None:
    """Each command a separate process against a real server (SQLite: the CLI is what is tested), its
    terminal 80 columns wide. Before: `d8530d8…` and `succeed…` in `lorafleet jobs`; `lineage NAME`
    said `default/NAME not found` although NAME was in another project."""
    import uvicorn

    settings = Settings(home=tmp_path / "home", mlflow_uri=mlflow_uri, api_token=ADMIN)

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, start_controller=False), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    env = {
        **os.environ,
        "COLUMNS": "80",
        "LORAFLEET_URL": f"http://127.0.0.1:{port}",
        "LORAFLEET_TOKEN": ADMIN,
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "orchestrator.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        b: ControlPlane = server.config.app.state.plane
        body = spec(tiny_base, data, "a-rather-long-adapter-name-for-a-table", project="a-long-project-name")
        body["name"] = "a-job-name-long-enough-to-crowd-an-80-column-terminal"
        job = b.service.submit(body, None)
        (adapter,) = job.adapters
        b.store.update_adapter(AdapterChange(adapter.id, state="cancelled"))
        b.store.set_job_state(job.id, "cancelled")

        listed = cli("jobs")
        assert listed.returncode == 0, listed.stderr
        assert max(len(line) for line in listed.stdout.splitlines()) <= 80
        assert job.id in listed.stdout and "cancelled" in listed.stdout, listed.stdout
        shown = cli("status", job.id)  # its adapters' table: the state whole, the long name folded
        assert shown.returncode == 0, shown.stderr
        assert max(len(line) for line in shown.stdout.splitlines()) <= 80
        assert "│ cancelled │" in shown.stdout, shown.stdout

        lost = cli("lineage", adapter.name)
        assert lost.returncode == 2 and "use --project a-long-project-name" in " ".join(lost.stderr.split())

        retried = cli("retry", adapter.name, "--project", "a-long-project-name")  # not a job id: a name
        assert retried.returncode == 0 and "queued again" in retried.stdout, retried.stderr
        neither = cli("retry", "nothing-here")
        assert neither.returncode == 2
        assert "no job 'nothing-here', and adapter default/nothing-here not found" in " ".join(
            neither.stderr.split()
        )
        refused = cli("delete", f"a-long-project-name/{adapter.name}")
        assert refused.returncode == 2 and "cancel its job first" in " ".join(refused.stderr.split())
        b.store.update_adapter(AdapterChange(adapter.id, state="cancelled"))
        deleted = cli("delete", f"a-long-project-name/{adapter.name}")
        assert deleted.returncode == 0 and "its name is free" in " ".join(deleted.stdout.split())
    finally:
        server.should_exit = True
        thread.join(timeout=30)
