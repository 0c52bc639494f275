"""What the store hands out and takes in: plain frozen dataclasses, never ORM rows.

A record is a snapshot read inside one transaction; it cannot lazy-load, expire or be written back by
accident, and it can cross threads. States are plain strings (compare with `states.AdapterState`, a
`StrEnum`). Times are timezone-aware UTC on every backend.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def utc(value: datetime) -> datetime:
    """Aware UTC: SQLite gives back the naive UTC time we wrote, PostgreSQL an aware one in its zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def config_hash(
    base_model: str,
    quantization: str,
    dtype: str,
    lora: dict[str, Any],
    train: dict[str, Any],
    data: dict[str, Any],
) -> str:
    """sha256 of the canonical JSON of everything an adapter is trained with (equal hash, equal inputs)."""
    canonical = json.dumps(
        {
            "base_model": base_model,
            "quantization": quantization,
            "dtype": dtype,
            "lora": lora,
            "train": train,
            "data": data,
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
    data: dict[str, Any]
    lora: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    quantization: str = "none"
    dtype: str = "float32"
    priority: int = 0
    parent_id: str | None = None
    parent_name: str | None = None
    config_hash: str | None = None  # default: `config_hash(...)` of the fields above
    output_dir: str | None = None


@dataclass(frozen=True)
class NewEvent:
    job_id: str
    kind: str
    adapter_id: str | None = None
    step: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)


# ---- entities ----


@dataclass(frozen=True)
class JobRecord:
    id: str
    project: str
    name: str
    spec: dict[str, Any]
    state: str
    idempotency_key: str | None
    error: str | None
    mlflow_run_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    project: str
    name: str
    job_id: str
    state: str
    priority: int
    seq: int
    base_model: str
    quantization: str
    dtype: str
    lora: dict[str, Any]
    train: dict[str, Any]
    data: dict[str, Any]
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

    @property
    def qualified_name(self) -> str:
        return f"{self.project}/{self.name}"


@dataclass(frozen=True)
class PackRecord:
    id: str
    base_model: str
    quantization: str
    dtype: str
    resources: dict[str, Any]
    state: str
    ray_run_name: str | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class PackMemberRecord:
    """One attempt: `adapter_id`'s stay in `pack_id`; `outcome` is the state it left in (None: still in)."""

    pack_id: str
    adapter_id: str
    attempt: int
    joined_at: datetime
    left_at: datetime | None
    outcome: str | None


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
    decision: str
    model_name: str | None
    version: int | None
    alias: str | None
    metric: str | None
    value: float | None
    reason: str | None
    created_at: datetime


@dataclass(frozen=True)
class EventRecord:
    id: int
    job_id: str
    adapter_id: str | None
    kind: str
    step: int | None
    payload: dict[str, Any]
    created_at: datetime
