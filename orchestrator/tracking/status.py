"""What an adapter's or a job's state is called in MLflow: the one place our lifecycle meets MLflow's
`RunStatus`.

Pure (no MLflow import: the mirror loads MLflow lazily), so the mapping is tested on its own; the names
are `mlflow.entities.RunStatus`'s, which `set_terminated` takes.
"""

from __future__ import annotations

from typing import Literal

from orchestrator.spec.states import AdapterState, JobState

RunStatusName = Literal["RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"]

_A, _J = AdapterState, JobState

_ADAPTER: dict[AdapterState, RunStatusName] = {
    _A.QUEUED: "SCHEDULED",
    _A.TRAINING: "RUNNING",
    # training succeeded, whatever the promotion gate said: the run's work is done
    _A.TRAINED: "FINISHED",
    _A.EVALUATED: "FINISHED",
    _A.PROMOTED: "FINISHED",
    _A.REJECTED: "FINISHED",
    _A.FAILED: "FAILED",
    _A.CANCELLED: "KILLED",
}

_JOB: dict[JobState, RunStatusName] = {
    _J.PENDING: "SCHEDULED",
    _J.RUNNING: "RUNNING",
    _J.SUCCEEDED: "FINISHED",
    _J.FAILED: "FAILED",
    _J.PARTIAL: "FAILED",  # some adapters failed: the news that matters in a runs table
    _J.CANCELLED: "KILLED",
}


def run_status(state: AdapterState | JobState) -> RunStatusName:
    """MLflow's run status for an adapter's run (its state) or a job's run (the job's state). Only the
    enums: "failed" alone does not say whose state it is."""
    if isinstance(state, AdapterState):
        return _ADAPTER[state]
    if isinstance(state, JobState):
        return _JOB[state]
    raise TypeError(f"expected an AdapterState or a JobState, got {state!r}")
