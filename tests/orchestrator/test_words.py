"""One word per concept: the engine's outcome becomes an adapter's state in one place, a state becomes
MLflow's run status in one place, and every outcome and state has its answer (pure: no SQL, Ray or MLflow
server); records, views and the API hold the lifecycle's enums while SQL and JSON keep the same words."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow.entities import RunStatus
from sqlalchemy import select

from orchestrator.control.controller import PackShape
from orchestrator.control.packrun import fit_pack
from orchestrator.control.runtime import FitOptions
from orchestrator.server.app import create_app
from orchestrator.settings import Settings
from orchestrator.spec.job import JobSpec
from orchestrator.spec.states import (
    ADAPTER_TRANSITIONS,
    AdapterState,
    JobState,
    PackState,
    adapter_state_after,
)
from orchestrator.spec.views import JobView
from orchestrator.store import AdapterChange, NewAdapter, Store
from orchestrator.store.models import AdapterRow, JobRow
from orchestrator.tracking.status import run_status
from workers.contract.plan import AdapterDone, Outcome

A, J = AdapterState, JobState


def test_every_outcome_leads_to_a_state_a_training_adapter_may_take() -> None:
    expected = {
        Outcome.TRAINED: A.TRAINED,
        Outcome.FAILED: A.FAILED,
        Outcome.CANCELLED: A.CANCELLED,
        Outcome.YIELDED: A.QUEUED,
    }
    assert set(expected) == set(Outcome)
    for outcome, state in expected.items():
        assert adapter_state_after(outcome) is state
        assert adapter_state_after(outcome.value) is state  # the word as JSON carries it
        assert state in ADAPTER_TRANSITIONS[A.TRAINING]


def test_a_yield_that_crossed_a_cancel_is_a_cancel() -> None:
    assert adapter_state_after(Outcome.YIELDED, cancelling=True) is A.CANCELLED
    # any other outcome is what the pack said, cancel or not
    for outcome in (Outcome.TRAINED, Outcome.FAILED, Outcome.CANCELLED):
        assert adapter_state_after(outcome, cancelling=True) is adapter_state_after(outcome)


def test_an_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="'done'"):
        adapter_state_after("done")


def test_the_engine_event_holds_the_outcome_and_its_json_is_the_word() -> None:
    done = AdapterDone.model_validate({"pack_id": "p", "adapter": "a", "step": 3, "status": "yielded"})
    assert done.status is Outcome.YIELDED
    assert done.model_dump(mode="json")["status"] == "yielded"


def test_every_adapter_state_has_an_mlflow_run_status() -> None:
    expected = {
        A.QUEUED: "SCHEDULED",
        A.TRAINING: "RUNNING",
        A.TRAINED: "FINISHED",
        A.EVALUATED: "FINISHED",
        A.PROMOTED: "FINISHED",
        A.REJECTED: "FINISHED",
        A.FAILED: "FAILED",
        A.CANCELLED: "KILLED",
    }
    assert set(expected) == set(AdapterState)
    for state, status in expected.items():
        assert run_status(state) == status
        assert RunStatus.is_terminated(RunStatus.from_string(status)) == (state not in (A.QUEUED, A.TRAINING))


def test_every_job_state_has_an_mlflow_run_status() -> None:
    expected = {
        J.PENDING: "SCHEDULED",
        J.RUNNING: "RUNNING",
        J.SUCCEEDED: "FINISHED",
        J.FAILED: "FAILED",
        J.PARTIAL: "FAILED",
        J.CANCELLED: "KILLED",
    }
    assert set(expected) == set(JobState)
    for state, status in expected.items():
        assert run_status(state) == status
        RunStatus.from_string(status)  # a name MLflow knows


def test_a_plain_string_is_not_a_state_to_map() -> None:
    """`failed` names both an adapter's and a job's state: the mapping takes only the enums."""
    with pytest.raises(TypeError, match="AdapterState or a JobState"):
        run_status("failed")  # type: ignore[arg-type]


# ---- records, views and the API hold the enums; SQL and JSON hold the same strings as ever ----


def test_records_hold_the_lifecycle_enums(store: Store) -> None:
    job, (adapter,), _ = store.create_job(
        "p", "j", {}, [NewAdapter(name="a", base_model="tiny", data={"path": "a.jsonl"})]
    )
    assert type(job.state) is JobState and job.state is J.PENDING
    assert type(adapter.state) is AdapterState and adapter.state is A.QUEUED
    pack = store.create_pack("pk", base_model="tiny")
    assert type(pack.state) is PackState and pack.state is PackState.RUNNING
    store.add_pack_member(pack.id, adapter.id)
    trained = store.update_adapter(
        AdapterChange(adapter.id, "training")
    )  # a plain string is read as its enum
    assert trained.state is A.TRAINING
    store.update_adapter(AdapterChange(adapter.id, A.TRAINED, final_checkpoint="/f"))
    (member,) = store.list_pack_members(pack_id=pack.id)
    assert member.outcome == "trained"
    decision = store.record_registry_decision(adapter.id, A.REJECTED, reason="below the gate")
    assert type(decision.decision) is AdapterState and decision.decision is A.REJECTED
    assert store.get_adapter_by_id(adapter.id).state is A.REJECTED
    assert store.adapter_states([adapter.id]) == {adapter.id: A.REJECTED}
    assert all(type(s) is AdapterState for s in store.adapter_counts([job.id])[job.id])
    assert store.job_states([J.PENDING]) == {job.id: J.PENDING}
    with store.engine.connect() as c:  # the column holds the word, not the enum's name
        assert c.scalar(select(AdapterRow.state).where(AdapterRow.id == adapter.id)) == "rejected"
        assert c.scalar(select(JobRow.state).where(JobRow.id == job.id)) == "pending"


def test_a_change_sets_only_the_fields_it_names() -> None:
    change = AdapterChange("a", A.FAILED, error="boom", step=3)
    assert change.fields == {"step": 3, "error": "boom"}
    assert AdapterChange("a", error=None).fields == {"error": None}  # None clears; unset keeps
    assert repr(change) == "AdapterChange('a', state=<AdapterState.FAILED: 'failed'>, step=3, error='boom')"
    with pytest.raises(ValueError, match="'finished' is not a valid AdapterState"):
        AdapterChange("a", "finished")  # type: ignore[arg-type]


def test_the_api_json_keeps_the_words_and_views_hold_the_enums(tmp_path: Path, tiny_base: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    settings = Settings(
        home=tmp_path / "home", api_token="admin", data_roots=str(data), model_roots=str(tiny_base.parent)
    )
    settings.home.mkdir()
    headers = {"Authorization": "Bearer admin"}
    spec = {
        "name": "job",
        "project": "p",
        "base_model": str(tiny_base),
        "adapters": [{"name": "a", "data": {"path": str(data / "a.jsonl")}}],
    }
    with TestClient(create_app(settings, start_controller=False)) as api:
        made = api.post("/v1/jobs", json=spec, headers=headers)
        assert made.status_code == 201, made.text
        shown = api.get(f"/v1/jobs/{made.json()['id']}", headers=headers).json()
    assert shown["state"] == "pending"
    assert [a["state"] for a in shown["adapters"]] == ["queued"]
    assert shown["adapter_states"] == {"queued": 1}
    view = JobView.model_validate(shown)  # what the remote client makes of it
    assert type(view.state) is JobState and type(view.adapters[0].state) is AdapterState
    assert [type(s) for s in view.adapter_states] == [AdapterState]
    assert view.model_dump(mode="json") == shown  # and back: the same JSON


# ---- typed boundaries: a pack's shape, what its row keeps, what Ray is asked for ----


def test_a_pack_shape_says_what_its_row_keeps_and_what_ray_runs() -> None:
    spec = JobSpec.model_validate(
        {
            "name": "j",
            "base_model": "tiny",
            "adapters": [{"name": "a", "data": {"path": "a.jsonl"}}],
            "resources": {"workers": 2, "cpus_per_worker": 3, "max_failures": 1, "memory_gb_per_worker": 4},
        }
    )
    shape = PackShape.of(spec)
    assert (shape.workers, shape.cpus_per_worker, shape.memory_gb, shape.max_adapters) == (2, 3.0, 4.0, 8)
    assert shape.record() == {  # the pack row's `resources`, as before: every field by name
        "workers": 2,
        "cpus_per_worker": 3.0,
        "gpus_per_worker": 0,
        "max_failures": 1,
        "memory_gb": 4.0,
        "max_adapters": 8,
        "activation_checkpointing": "auto",
        "max_tokens_per_pass": None,
    }
    options = shape.fit_options("/runs")
    assert options == FitOptions(
        workers=2, cpus_per_worker=3.0, gpus_per_worker=0, max_failures=1, storage_path="/runs", num_threads=3
    )
    assert options.resources_per_worker == {"CPU": 3.0}  # no GPU key on a CPU pack
    gpu = replace(shape, gpus_per_worker=1, cpus_per_worker=0.5).fit_options("/runs")
    assert gpu.resources_per_worker == {"CPU": 0.5, "GPU": 1} and gpu.num_threads == 1
    with pytest.raises(TypeError):  # keywords only past the plan and channel: no options dict to spread
        fit_pack("{}", None, **shape.record())  # type: ignore[call-arg]
