"""What the store hands out and takes in: plain frozen dataclasses, never ORM rows.

A record is a snapshot read inside one transaction; it cannot lazy-load, expire or be written back by
accident, and it can cross threads. States are the lifecycle's enums (`JobState`, `AdapterState`,
`PackState`: `StrEnum`s, so SQL and JSON hold the same strings as ever); a record made from a plain string
holds the enum. Times are timezone-aware UTC on every backend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field, fields
from datetime import UTC, datetime
from enum import Enum, StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final

from orchestrator.spec.states import AdapterState, JobKind, JobState, PackState
from workers.contract.plan import DataConfig, LoraConfig, TrainConfig

if TYPE_CHECKING:
    from orchestrator.spec.job import JobSpec


def utc(value: datetime) -> datetime:
    """Aware UTC: SQLite gives back the naive UTC time we wrote, PostgreSQL an aware one in its zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def _as_enum(record: Any, name: str, enum: type[StrEnum]) -> None:
    """Hold `record.name` as `enum` (a frozen record made from a plain string, e.g. a row's value)."""
    value = getattr(record, name)
    if value is not None and type(value) is not enum:
        object.__setattr__(record, name, enum(value))


def config_hash(
    base_model: str,
    quantization: str,
    dtype: str,
    lora: LoraConfig,
    train: TrainConfig,
    data: DataConfig,
) -> str:
    """sha256 of the canonical JSON of everything an adapter is trained with (equal hash, equal inputs)."""
    canonical = json.dumps(
        {
            "base_model": base_model,
            "quantization": quantization,
            "dtype": dtype,
            "lora": lora.model_dump(mode="json"),
            "train": train.model_dump(mode="json"),
            "data": data.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---- inputs ----


@dataclass(frozen=True)
class NewAdapter:
    """An adapter to create with its job. Its parent is either an existing adapter (`parent_id`,
    resolved by the caller) or another adapter of the same new job (`parent_name`); the store derives
    `root_id` and `depth` from the parent."""

    name: str
    base_model: str
    data: DataConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quantization: str = "none"
    dtype: str = "float32"
    priority: int = 0
    parent_id: str | None = None
    parent_name: str | None = None
    config_hash: str | None = None  # default: `config_hash(...)` of the fields above
    output_dir: str | None = None

    def __post_init__(self) -> None:
        """Plain mappings are accepted and validated here, once, into the typed configs."""
        for name, model in (("data", DataConfig), ("lora", LoraConfig), ("train", TrainConfig)):
            value = getattr(self, name)
            if not isinstance(value, model):
                object.__setattr__(self, name, model.model_validate(value))


@dataclass(frozen=True)
class NewEvent:
    job_id: str
    kind: str
    adapter_id: str | None = None
    step: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    event_id: str | None = None  # the engine's id: an event replayed from its log is recorded once


# ---- entities ----


@dataclass(frozen=True)
class JobRecord:
    id: str
    project: str
    name: str
    spec: dict[str, Any]
    state: JobState
    idempotency_key: str | None
    error: str | None
    mlflow_run_id: str | None
    created_at: datetime
    updated_at: datetime
    kind: JobKind = JobKind.TRAIN
    end_reason: str | None = None  # why a session ended

    def __post_init__(self) -> None:
        _as_enum(self, "state", JobState)
        _as_enum(self, "kind", JobKind)

    @cached_property
    def job_spec(self) -> JobSpec:
        """The stored spec as the typed `JobSpec` (raises `pydantic.ValidationError` if it cannot be one:
        the raw `spec` stays readable so a bad row never breaks a listing).

        A session's spec (`SessionSpec` fields: no adapters, no data) is not a job spec; what readers of
        a job's spec ask of it for a saved state (its promotion policy, its eval settings) are then the
        defaults, so a saved state is judged as an adapter of a job that set none."""
        from orchestrator.spec.job import JobSpec

        if self.kind == JobKind.SESSION:
            return JobSpec.model_construct(
                name=self.name, project=self.project, base_model=self.spec.get("base_model", ""), adapters=[]
            )
        return JobSpec.model_validate(self.spec)


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    project: str
    name: str
    job_id: str
    state: AdapterState
    priority: int
    seq: int
    base_model: str
    quantization: str
    dtype: str
    lora: LoraConfig
    train: TrainConfig
    data: DataConfig
    parent_id: str | None
    root_id: str
    depth: int
    parent_checkpoint: str | None
    data_fingerprint: str | None
    config_hash: str
    output_dir: str | None
    final_checkpoint: str | None
    step: int
    eval_loss: float | None
    error: str | None
    mlflow_run_id: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    waiting: str | None = None  # why it is still queued, in the controller's words

    def __post_init__(self) -> None:
        _as_enum(self, "state", AdapterState)

    @property
    def qualified_name(self) -> str:
        return f"{self.project}/{self.name}"


class Unset(Enum):
    """A field an `AdapterChange` leaves as it is (None is a value: it clears the field)."""

    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


@dataclass(frozen=True)
class AdapterChange:
    """One adapter row update: a new state (or None to keep it), the fields to set (each left UNSET is
    kept), metric values to fold into its summaries and a checkpoint to record. `decisions` makes them;
    `Store.apply_changes` writes a batch of them in one transaction, `Store.update_adapter` one.

    The settable fields are this class's fields, typed: a field the store must not set (a name, a job)
    cannot be asked for, rather than being refused at run time."""

    adapter_id: str
    state: AdapterState | None = None
    _: KW_ONLY
    step: int | Unset = UNSET
    eval_loss: float | Unset | None = UNSET
    error: str | Unset | None = UNSET
    final_checkpoint: str | Unset | None = UNSET
    parent_checkpoint: str | Unset | None = UNSET
    data_fingerprint: str | Unset | None = UNSET
    output_dir: str | Unset | None = UNSET
    mlflow_run_id: str | Unset | None = UNSET
    priority: int | Unset = UNSET
    waiting: str | Unset | None = UNSET  # why it waits in the queue (leaving `queued` clears it)
    metrics: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    checkpoint: tuple[int, str, bool] | None = None  # (step, path, final)
    announce: bool = False  # the controller decided it (no engine event says so): log a `done` event

    def __post_init__(self) -> None:
        _as_enum(self, "state", AdapterState)

    @property
    def fields(self) -> dict[str, Any]:
        """The row's columns this change sets, with their new values."""
        return {name: getattr(self, name) for name in ADAPTER_FIELDS if getattr(self, name) is not UNSET}

    def __repr__(self) -> str:  # only what it changes, so a failing test's diff shows the difference
        shown = {"state": self.state} if self.state is not None else {}
        shown |= self.fields
        shown |= {"metrics": self.metrics} if self.metrics else {}
        shown |= {"checkpoint": self.checkpoint} if self.checkpoint is not None else {}
        shown |= {"announce": True} if self.announce else {}
        parts = [repr(self.adapter_id), *(f"{k}={v!r}" for k, v in shown.items())]
        return f"AdapterChange({', '.join(parts)})"


ADAPTER_FIELDS = tuple(f.name for f in fields(AdapterChange) if f.default is UNSET)
"""The adapter columns an `AdapterChange` may set."""


@dataclass(frozen=True)
class PackRecord:
    id: str
    base_model: str
    quantization: str
    dtype: str
    resources: dict[str, Any]
    state: PackState
    ray_run_name: str | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    def __post_init__(self) -> None:
        _as_enum(self, "state", PackState)


@dataclass(frozen=True)
class PackMemberRecord:
    """One attempt: `adapter_id`'s stay in `pack_id`; `outcome` is the state it left in (None: still in)."""

    pack_id: str
    adapter_id: str
    attempt: int
    joined_at: datetime
    left_at: datetime | None
    outcome: str | None  # an `AdapterState`, or the pack's `PackState` if it ended with the adapter inside


@dataclass(frozen=True)
class CheckpointRecord:
    id: int
    adapter_id: str
    step: int
    path: str
    final: bool
    created_at: datetime


@dataclass(frozen=True)
class MetricRecord:
    adapter_id: str
    key: str
    last_value: float
    best_value: float
    step: int  # of the last value
    updated_at: datetime


@dataclass(frozen=True)
class RegistryRecord:
    id: int
    adapter_id: str
    decision: AdapterState  # promoted or rejected
    model_name: str | None
    version: int | None
    alias: str | None
    metric: str | None
    value: float | None
    reason: str | None
    created_at: datetime

    def __post_init__(self) -> None:
        _as_enum(self, "decision", AdapterState)


@dataclass(frozen=True)
class EventRecord:
    id: int
    job_id: str
    adapter_id: str | None
    kind: str
    step: int | None
    payload: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class TokenRecord:
    """A project token as the store hands it out: never its secret, never its hash."""

    id: str
    project: str
    role: str  # "reader" | "member"
    name: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None
