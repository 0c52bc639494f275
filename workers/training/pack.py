"""Run one PackPlan to completion in this process: the engine's single entry point.

Tests and benchmarks call `run_pack` directly; the controller calls it inside Ray Train's
`train_loop_per_worker`, where torch.distributed is already set up when the pack has several workers.
Re-running the same plan is safe: adapters with a final checkpoint are reported as done, the others
resume from their latest checkpoint, which is how a worker restarted by Ray Train's FailureConfig resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from workers.contract.plan import AdapterTask, Event, PackPlan, PackResult
from workers.engine.adapters import LoraKernel
from workers.engine.model import load_base
from workers.training.trainer import EmitFn, PackTrainer

T = TypeVar("T")
RefillFn = Callable[[int], list[AdapterTask]]
CancelledFn = Callable[[], Collection[str]]


def _ignore(_: Event) -> None:
    pass


def _from_rank0(ask: Callable[[], T], distributed: bool) -> T:
    """Ask once on rank 0 and share the answer, so every worker adds and drops the same adapters."""
    if not distributed:
        return ask()
    box: list[object] = [ask() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def run_pack(
    plan: PackPlan,
    emit: EmitFn = _ignore,
    refill: RefillFn | None = None,
    cancelled: CancelledFn | None = None,
    kernel: LoraKernel = "auto",
    yielding: CancelledFn | None = None,
) -> PackResult:
    """Load the base once, train every adapter of `plan` (and any `refill` hands in), report as we go.

    Between steps, `refill(free_slots)` may hand in queued adapters of the same base to fill the slots of
    finished ones (continuous refill), `cancelled()` names adapters to drop now, and `yielding()` names
    adapters to make room for other work (each leaves at its next optimizer-step boundary, checkpointed,
    reporting `yielded`); all are optional and are asked on rank 0 only.
    """
    base = load_base(
        plan.base_model,
        tokenizer=plan.tokenizer,
        quantization=plan.quantization,
        dtype=plan.dtype,
        device=plan.device,
        home=Path(plan.bases_home) if plan.bases_home else None,
    )
    trainer = PackTrainer(
        base,
        plan.base_model,
        emit,
        plan.pack_id,
        kernel=kernel,
        checkpointing=plan.activation_checkpointing,
        memory_budget_bytes=plan.memory_budget_bytes,
        max_tokens_per_pass=plan.max_tokens_per_pass,
        allow_user_scorers=plan.allow_user_scorers,
    )
    capacity = plan.capacity
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for task in plan.adapters:
        trainer.add(task)
    while True:
        if cancelled is not None:
            for name in _from_rank0(lambda: sorted(cancelled()), distributed):
                trainer.cancel(name)
        if yielding is not None:
            for name in _from_rank0(lambda: sorted(yielding()), distributed):
                trainer.request_yield(name)
        free = capacity - len(trainer.active)
        if refill is not None and free > 0:
            for task in _from_rank0(lambda free=free: refill(free), distributed):
                trainer.add(task)
        if not trainer.active:
            break
        trainer.step()
    return PackResult(pack_id=plan.pack_id, adapters=dict(trainer.done))
