"""What users see: plain JSON-able models shared by the service, the HTTP API, the client and the CLI.

The remote client parses the API's JSON into these same classes, so embedded and remote use give the same
objects, and `--json` output is their `model_dump`. States are the lifecycle's enums (`StrEnum`s), whose
JSON is the same strings as ever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.spec.states import JOB_TERMINAL, AdapterState, JobKind, JobState


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


BASE, PARENT = "base_", "parent_"


class Score(_View):
    """One task score of an adapter (a scorer's `eval_<scorer>`, or the token accuracy) with what it
    lifts over: the base model and, for a child, its parent, measured on the same eval records."""

    metric: str = Field(description="e.g. `eval_exact_match`; higher is better.")
    value: float
    base: float | None = Field(default=None, description="The base model's value (`base_<metric>`).")
    parent: float | None = Field(default=None, description="The parent's value (`parent_<metric>`).")
    base_lift: float | None = Field(default=None, description="value - base.")
    parent_lift: float | None = Field(default=None, description="value - parent.")

    @property
    def label(self) -> str:
        """`exact_match 0.92 (base 0.05, +0.87)`: what a table shows."""
        name = self.metric.removeprefix("eval_")
        against = [
            f"{who} {other:.2f}, {lift:+.2f}"
            for who, other, lift in (
                ("base", self.base, self.base_lift),
                ("parent", self.parent, self.parent_lift),
            )
            if other is not None and lift is not None
        ]
        return f"{name} {self.value:.2f}" + (f" ({'; '.join(against)})" if against else "")


def scores(metrics: Mapping[str, float], first: Sequence[str] = ()) -> list[Score]:
    """The task scores in `metrics` (latest values), the metrics named in `first` leading (the gate's,
    then the adapter's scorers, in its order): every `eval_*` metric but a loss that has a base or parent
    counterpart, so a lift can be shown."""
    found = [
        m
        for m in metrics
        if m.startswith("eval_") and not m.endswith("loss") and (BASE + m in metrics or PARENT + m in metrics)
    ]
    ordered = [m for m in dict.fromkeys(first) if m in found] + sorted(m for m in found if m not in first)
    out = []
    for metric in ordered:
        value, base, parent = metrics[metric], metrics.get(BASE + metric), metrics.get(PARENT + metric)
        out.append(
            Score(
                metric=metric,
                value=value,
                base=base,
                parent=parent,
                base_lift=None if base is None else value - base,
                parent_lift=None if parent is None else value - parent,
            )
        )
    return out


class AdapterView(_View):
    id: str
    project: str
    name: str
    job_id: str
    state: AdapterState
    parent: str | None = Field(description="project/name of the parent adapter, if branched.")
    root: str
    depth: int
    base_model: str
    step: int
    steps: int
    eval_loss: float | None
    final_checkpoint: str | None
    parent_checkpoint: str | None
    data_fingerprint: str | None
    config_hash: str
    error: str | None
    waiting: str | None = Field(
        default=None, description="Why a queued adapter waits (its project's cap, busy workers, its parent)."
    )
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Latest value of every recorded metric: losses, `eval_<scorer>` task scores, and the "
        "base's (`base_*`) and parent's (`parent_*`) on the same eval records.",
    )
    scores: list[Score] = Field(
        default_factory=list,
        description="The task scores with their lifts over the base and the parent, the main one first "
        "(the promotion gate's metric, else the first scorer).",
    )
    created_at: datetime
    updated_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.project}/{self.name}"


class JobView(_View):
    id: str
    project: str
    name: str
    state: JobState
    error: str | None
    kind: JobKind = Field(
        default=JobKind.TRAIN,
        description="`train`: trained from a spec; `session`: a training session driven call by call, "
        "its saved states its adapters.",
    )
    end_reason: str | None = Field(default=None, description="Why a session ended.")
    created_at: datetime
    updated_at: datetime
    adapters: list[AdapterView] = Field(
        description="The job's first adapters, first come first, at most the server's "
        "`LORAFLEET_JOB_VIEW_ADAPTERS` (none in a list of jobs); `GET /v1/adapters?job_id=` pages "
        "through all of them, and `Client.job(id).adapters` does so for you."
    )
    adapter_count: int = Field(default=0, description="How many adapters the job has in all.")
    adapter_states: dict[AdapterState, int] = Field(
        default_factory=dict, description="How many of the job's adapters are in each state."
    )

    @property
    def done(self) -> bool:
        return self.state in JOB_TERMINAL

    @property
    def has_more_adapters(self) -> bool:
        """Whether `adapters` leaves some out (a view holds a bounded number of them)."""
        return len(self.adapters) < self.adapter_count


class AdapterPage(_View):
    """One page of adapters, first come first; `next_after` is the cursor of the next page (None: last)."""

    adapters: list[AdapterView]
    next_after: int | None


class EventView(_View):
    id: int
    job_id: str
    adapter: str | None
    kind: str
    step: int | None
    payload: dict[str, Any]
    created_at: datetime


class LineageNode(_View):
    name: str
    parent: str | None
    status: AdapterState
    metrics: dict[str, float] = Field(
        description="As `AdapterView.metrics`: the base's and parent's values give each score's lift."
    )
    children: list[LineageNode] = Field(default_factory=list)


class RegistryView(_View):
    """One promotion decision: promoted (model version + alias) or rejected, and why."""

    adapter_id: str
    decision: AdapterState = Field(description="`promoted` or `rejected`.")
    model_name: str | None
    version: int | None
    alias: str | None
    metric: str | None
    value: float | None
    reason: str | None
    created_at: datetime

    @classmethod
    def of(cls, record: Any) -> RegistryView:
        return cls.model_validate(record, from_attributes=True)


class TokenView(_View):
    """A project token without its secret: what `lorafleet token list` shows."""

    id: str
    project: str
    role: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, record: Any) -> TokenView:
        return cls.model_validate(record, from_attributes=True)


class SessionView(_View):
    """A live training session (`POST /v1/sessions`): a LoRA adapter held by the server, driven call by
    call (`TrainingClient`). It lives until closed, saved with `close`, or idle past the server's
    `LORAFLEET_SESSION_IDLE_SECONDS`."""

    id: str
    project: str
    base_model: str
    quantization: str
    dtype: str
    rank: int
    alpha: float
    target_modules: list[str] | str
    seed: int
    from_state: str | None = Field(default=None, description="The adapter or path it started from.")
    step: int = Field(description="Optimizer steps taken so far.")
    created_at: datetime
    last_used_at: datetime
    saved_states: list[str] = Field(
        default_factory=list,
        description="Its saved states, oldest first: adapters `project/name` of the session's job.",
    )
