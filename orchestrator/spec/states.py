"""The lifecycles of jobs, adapters and packs, as data.

Every state change in lorafleet goes through `check_transition`, so the allowed moves live in one table
per entity that tests (and people) can read, not in `if` chains spread over the controller. Pure: no SQL,
no Ray. States are `StrEnum`s, so records, views and events hold the enum while SQL and JSON keep the same
strings (`AdapterState.QUEUED == "queued"`). The engine's word for how an adapter left its pack
(`Outcome`) becomes an adapter state in one place, `adapter_state_after`.

Two choices that go beyond the picture in DESIGN.md, both because a job's state is *derived* from its
adapters' states, sampled once per controller tick:
- a job may go from `pending` straight to any finished state: a short job can be queued, trained and
  done between two samples, and cancelling or failing a job that never started is ordinary;
- `evaluated` is optional: the promotion gate may decide on a `trained` adapter whose eval came with
  training (DESIGN.md writes it as "trained -> (evaluated) -> promoted | rejected").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Literal

from workers.contract.plan import Outcome


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PARTIAL = "partial"  # finished, some adapters trained and some failed


class JobKind(StrEnum):
    """What a job is: trained by the controller from a spec, or a training session driven call by call
    over the API (`service.sessions`), whose state the service sets and the controller never touches."""

    TRAIN = "train"
    SESSION = "session"


class AdapterState(StrEnum):
    QUEUED = "queued"
    TRAINING = "training"
    TRAINED = "trained"
    EVALUATED = "evaluated"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"


class PackState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


_J, _A, _P = JobState, AdapterState, PackState

JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    _J.PENDING: frozenset({_J.RUNNING, _J.SUCCEEDED, _J.FAILED, _J.CANCELLED, _J.PARTIAL}),
    _J.RUNNING: frozenset({_J.SUCCEEDED, _J.FAILED, _J.CANCELLED, _J.PARTIAL}),
    _J.SUCCEEDED: frozenset(),
    _J.FAILED: frozenset({_J.RUNNING}),  # `lorafleet retry`: its failed adapters train again
    _J.CANCELLED: frozenset({_J.RUNNING}),  # `lorafleet retry NAME` of one of its cancelled adapters
    _J.PARTIAL: frozenset({_J.RUNNING}),
}

ADAPTER_TRANSITIONS: Mapping[AdapterState, frozenset[AdapterState]] = {
    _A.QUEUED: frozenset({_A.TRAINING, _A.FAILED, _A.CANCELLED}),
    # back to the queue when its worker or the controller died; it resumes from its last checkpoint
    _A.TRAINING: frozenset({_A.TRAINED, _A.FAILED, _A.CANCELLED, _A.QUEUED}),
    # failed: the evaluation itself errored
    _A.TRAINED: frozenset({_A.EVALUATED, _A.PROMOTED, _A.REJECTED, _A.FAILED}),
    _A.EVALUATED: frozenset({_A.PROMOTED, _A.REJECTED, _A.FAILED}),
    _A.PROMOTED: frozenset({_A.PROMOTED}),  # re-promotion moves the alias to a new version
    _A.REJECTED: frozenset({_A.PROMOTED}),  # a person may force a promotion past the gate
    # `lorafleet retry` once the cause is fixed (storage freed): it resumes from its newest checkpoint
    _A.FAILED: frozenset({_A.QUEUED}),
    # `lorafleet retry NAME`: a person trains a cancelled adapter after all, under its own name
    _A.CANCELLED: frozenset({_A.QUEUED}),
}

PACK_TRANSITIONS: Mapping[PackState, frozenset[PackState]] = {
    _P.RUNNING: frozenset({_P.SUCCEEDED, _P.FAILED, _P.CANCELLED}),
    _P.SUCCEEDED: frozenset(),
    _P.FAILED: frozenset(),
    _P.CANCELLED: frozenset(),
}

Kind = Literal["job", "adapter", "pack"]
_TABLES: dict[str, tuple[type[StrEnum], Mapping]] = {
    "job": (JobState, JOB_TRANSITIONS),
    "adapter": (AdapterState, ADAPTER_TRANSITIONS),
    "pack": (PackState, PACK_TRANSITIONS),
}

# Settled: nothing the controller does moves them on. A failed or cancelled adapter (and a failed, partial
# or cancelled job) may still go back to the queue, but only when a person asks (`lorafleet retry`), so it
# counts as settled
# for every decision the system takes on its own (a job is done, a child's parent cannot train, a
# watcher stops waiting); deriving these from "no transition out" stopped counting them once retry came.
JOB_TERMINAL = frozenset({_J.SUCCEEDED, _J.FAILED, _J.CANCELLED, _J.PARTIAL})
PACK_TERMINAL = frozenset(s for s, nxt in PACK_TRANSITIONS.items() if not nxt)
ADAPTER_TERMINAL = frozenset({_A.FAILED, _A.CANCELLED})
"""Settled without a trained adapter: `failed` or `cancelled` (until a person retries it). Such an
adapter has no weights, so nothing may branch from it."""
ADAPTER_TRAINED = frozenset({_A.TRAINED, _A.EVALUATED, _A.PROMOTED, _A.REJECTED})
"""Training succeeded (whatever the promotion gate later said)."""
ADAPTER_FINISHED = ADAPTER_TRAINED | ADAPTER_TERMINAL
"""Not queued or training any more."""
ADAPTER_ACTIVE = frozenset({_A.QUEUED, _A.TRAINING})
"""Waiting for or holding a place in a pack."""
ADAPTER_AWAITING_GATE = frozenset({_A.TRAINED, _A.EVALUATED})
"""Trained, with no promotion decision yet: a job that auto-promotes is not done while one is."""


class InvalidTransition(ValueError):
    """A state change the lifecycle does not allow; names the entity and both states."""

    def __init__(self, kind: str, from_state: str, to_state: str, entity: str | None = None) -> None:
        self.kind, self.from_state, self.to_state, self.entity = kind, str(from_state), str(to_state), entity
        allowed = ", ".join(sorted(allowed_transitions(kind, from_state))) if kind in _TABLES else ""
        who = f"{kind} {entity!r}" if entity else kind
        hint = f"it may go to: {allowed}" if allowed else f"{self.from_state!r} is final"
        super().__init__(f"{who} cannot go from {self.from_state!r} to {self.to_state!r}; {hint}")


def allowed_transitions(kind: Kind | str, from_state: str) -> frozenset[str]:
    """The states `kind` may move to from `from_state` (empty for a final or unknown state)."""
    if kind not in _TABLES:
        raise ValueError(f"unknown entity kind {kind!r}; expected one of {sorted(_TABLES)}")
    enum, table = _TABLES[kind]
    try:
        return frozenset(s.value for s in table[enum(from_state)])
    except ValueError:
        return frozenset()


def check_transition(kind: Kind | str, from_state: str, to_state: str, entity: str | None = None) -> None:
    """Raise `InvalidTransition` unless `kind` may go from `from_state` to `to_state`."""
    if str(to_state) not in allowed_transitions(kind, from_state):
        raise InvalidTransition(kind, from_state, to_state, entity)


def job_state_from_adapters(states: Iterable[AdapterState]) -> JobState:
    """What a job's state is, given its adapters' states.

    - any adapter still queued or training: `pending` if all are queued, else `running`
      (callers settle a job only once this returns a finished state);
    - all trained (or evaluated, promoted, rejected: training succeeded), or no adapters: `succeeded`;
    - some failed: `partial` if any trained, else `failed` (a failure is the news that matters even
      when other adapters were cancelled);
    - none failed, some cancelled: `cancelled` (the user stopped the job; finished adapters stay trained).
    """
    found = {AdapterState(s) for s in states}
    unfinished = found - ADAPTER_FINISHED
    if unfinished:
        return JobState.PENDING if found == {AdapterState.QUEUED} else JobState.RUNNING
    if AdapterState.FAILED in found:
        return JobState.PARTIAL if found & ADAPTER_TRAINED else JobState.FAILED
    if AdapterState.CANCELLED in found:
        return JobState.CANCELLED
    return JobState.SUCCEEDED


def adapter_state_after(outcome: Outcome | str, cancelling: bool = False) -> AdapterState:
    """The state an adapter goes to when it leaves its pack with `outcome`: the one place the engine's
    word becomes the lifecycle's. `yielded` goes back to the queue (to resume from the checkpoint it wrote
    as it left), unless the user's cancel crossed it (`cancelling`: asked, not yet confirmed by the pack):
    queued again, it would train although its job was cancelled."""
    match Outcome(outcome):
        case Outcome.TRAINED:
            return AdapterState.TRAINED
        case Outcome.FAILED:
            return AdapterState.FAILED
        case Outcome.CANCELLED:
            return AdapterState.CANCELLED
        case Outcome.YIELDED:
            return AdapterState.CANCELLED if cancelling else AdapterState.QUEUED
