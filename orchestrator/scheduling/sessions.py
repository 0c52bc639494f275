"""Where a new training session goes: a pure decision over plain numbers (no Ray, no SQL).

A session lives on a *host*: one loaded base (`workers.sessions.host.SessionHost`, in this process or
in a Ray actor) holding many sessions' adapters, which share its clock cycles. Placing a session is the
same question the scheduler answers for a pack's adapters (`orchestrator.scheduling.scheduler`), asked by
the same memory model (`workers.contract.memory`):

- **A host costs** its base (weights, runtime, one head chunk: `memory.base_bytes`) plus one training
  pass of `memory.CPU_PASS_TOKENS` tokens (every session may target every linear, so the pass keeps the
  inputs of `o_proj` and `down_proj` too). Below that a host cannot run a cycle at all.
- **A session costs** its adapter's parameters at `memory.lora_bytes_per_param` (fp32 weight, gradient
  and AdamW moments; on CPU what the allocator keeps of each step's temporaries as well).
- **A host holds** at most `sessions_per_host` sessions and at most what fits its worker's memory
  (`worker_bytes`: `LORAFLEET_SESSION_HOST_MEMORY_GB`, else what a pack's worker gets).

`place` then decides, in this order: refuse with 429 when the project already holds its
`sessions_per_project`; refuse with 422 when the base and one such session can never fit one worker
(nothing will change that but a smaller base, rank or dtype, or more memory); join the fullest host of
the same base that still has room (fewest hosts, so bases are loaded once and cycles are shared); start a
new host when a worker is free (`free_workers`: worker slots no pack and no other host holds); else
refuse with 503, retryable, saying what is full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workers.contract import memory
from workers.contract.plan import LoraConfig

HostKey = tuple[str, str, str]  # (base model, quantization, dtype)
HostKind = Literal["local", "ray"]
RETRY_AFTER_S = 10  # told with a 503: a session closing or a pack ending frees room within seconds


@dataclass(frozen=True)
class HostState:
    """A running host as placement sees it."""

    host_id: str
    key: HostKey
    kind: HostKind
    sessions: int  # sessions it holds now
    used_bytes: int  # its base and pass (`host_bytes`) plus its sessions' (`session_bytes` each)


@dataclass(frozen=True)
class Room:
    """What the cluster offers a new host now."""

    worker_bytes: int  # the memory one host may use (one worker's)
    free_workers: int  # hosts that may start now: worker slots no pack and no host holds


@dataclass(frozen=True)
class Limits:
    sessions_per_host: int
    sessions_per_project: int | None  # None: no cap


@dataclass(frozen=True)
class Ask:
    """A session to place: its project, its base, and what it and a new host of its base would cost."""

    project: str
    key: HostKey
    session_bytes: int
    host_bytes: int


@dataclass(frozen=True)
class Join:
    host_id: str


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class Refuse:
    """No place: `status` 429 (the project's cap), 503 (full for now: retry after `retry_after`), 422
    (never fits). `field` names the setting or request field to change."""

    status: Literal[422, 429, 503]
    field: str
    reason: str

    @property
    def retry_after(self) -> int | None:
        return RETRY_AFTER_S if self.status in (429, 503) else None


Placement = Join | Start | Refuse


def session_bytes(info: memory.BaseModelInfo, lora: LoraConfig, dtype: str, cpu: bool) -> int:
    """What one session's adapter and optimizer keep resident."""
    return memory.lora_param_count(info, lora) * memory.lora_bytes_per_param(dtype, cpu)


def host_bytes(info: memory.BaseModelInfo, quantization: str, dtype: str, cpu: bool) -> int:
    """What a host costs with no session: the loaded base and one pass of `CPU_PASS_TOKENS` tokens (the
    least it runs a cycle with; a GPU host plans larger passes out of whatever memory is left)."""
    tokens = memory.CPU_PASS_TOKENS
    activations = memory.activation_bytes_per_token(
        info, dtype, width=tokens, checkpointing=False, lora=memory.LoraInputs(True, True), cpu=cpu
    )
    return memory.base_bytes(info, quantization, dtype) + int(tokens * activations)


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def place(ask: Ask, hosts: list[HostState], project_sessions: int, room: Room, limits: Limits) -> Placement:
    """Where `ask` goes (see the module docstring). `project_sessions`: the sessions its project holds."""
    cap = limits.sessions_per_project
    if cap is not None and project_sessions >= cap:
        return Refuse(
            429,
            "sessions_per_project",
            f"project {ask.project!r} holds {project_sessions} sessions, its cap "
            f"(LORAFLEET_SESSIONS_PER_PROJECT={cap}); close one (or save_state with close) and retry",
        )
    need = ask.host_bytes + ask.session_bytes
    if need > room.worker_bytes:
        return Refuse(
            422,
            "base_model",
            f"base {ask.key[0]!r} ({ask.key[1]}, {ask.key[2]}) with one session needs {_gb(need)} "
            f"(base and pass {_gb(ask.host_bytes)}, session {_gb(ask.session_bytes)}) and a worker has "
            f"{_gb(room.worker_bytes)}: it can never fit; use a smaller base, rank or dtype, quantize, or "
            "raise LORAFLEET_SESSION_HOST_MEMORY_GB",
        )
    same = [h for h in hosts if h.key == ask.key]
    open_hosts = [
        h
        for h in same
        if h.sessions < limits.sessions_per_host and h.used_bytes + ask.session_bytes <= room.worker_bytes
    ]
    if open_hosts:
        best = max(open_hosts, key=lambda h: (h.sessions, h.host_id))
        return Join(best.host_id)
    if room.free_workers > 0:
        return Start()
    if same:
        full = (
            f"its {len(same)} host(s) of this base are full (at most "
            f"LORAFLEET_SESSIONS_PER_HOST={limits.sessions_per_host} sessions, or their memory)"
        )
    else:
        full = "no host of this base runs"
    return Refuse(
        503,
        "base_model",
        f"no worker has room for a session on {ask.key[0]!r} now: {full}, and every worker slot is held "
        f"by a pack or another base's host; retry in {RETRY_AFTER_S} s, when a session closes or a pack ends",
    )


def free_workers(total_slots: int, packs_running: int, ray_hosts: int) -> int:
    """Worker slots neither a pack nor a Ray host holds (one per GPU on a GPU cluster, else one per CPU,
    as the controller counts them for packs)."""
    return max(0, total_slots - packs_running - ray_hosts)


__all__ = [
    "Ask",
    "HostKey",
    "HostKind",
    "HostState",
    "Join",
    "Limits",
    "Placement",
    "Refuse",
    "Room",
    "Start",
    "free_workers",
    "host_bytes",
    "place",
    "session_bytes",
]
