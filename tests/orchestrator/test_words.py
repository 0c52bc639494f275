"""One word per concept: the engine's outcome becomes an adapter's state in one place, a state becomes
MLflow's run status in one place, and every outcome and state has its answer. Pure: no SQL, Ray or MLflow
server."""

from __future__ import annotations

import pytest
from mlflow.entities import RunStatus

from orchestrator.spec.states import (
    ADAPTER_TRANSITIONS,
    AdapterState,
    JobState,
    adapter_state_after,
)
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
