"""Run one PackPlan to completion in this process: the engine's single entry point.

Tests and benchmarks call `run_pack` directly; the controller calls it inside Ray Train's
`train_loop_per_worker`, where torch.distributed is already set up when the pack has several workers.
Re-running the same plan is safe: adapters with a final checkpoint are reported as done, the others
resume from their latest checkpoint, which is how a worker restarted by Ray Train's FailureConfig resumes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

from workers.model import load_base
from workers.multilora import LoraKernel
from workers.plan import AdapterTask, Event, PackPlan, PackResult
from workers.trainer import EmitFn, PackTrainer

RefillFn = Callable[[int], list[AdapterTask]]


def _ignore(_: Event) -> None:
    pass


def _next_tasks(refill: RefillFn | None, free: int, distributed: bool) -> list[AdapterTask]:
    """Ask for up to `free` queued tasks; with several workers rank 0 asks and the others follow."""
    if refill is None or free <= 0:
        return []
    if not distributed:
        return refill(free)
    box: list[object] = [refill(free) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return list(box[0])  # type: ignore[arg-type]


def run_pack(
    plan: PackPlan,
    emit: EmitFn = _ignore,
    refill: RefillFn | None = None,
    kernel: LoraKernel = "auto",
) -> PackResult:
    """Load the base once, train every adapter of `plan` (and any `refill` hands in), report as we go.

    `refill(free_slots)` is called when adapters finish, to fill their slots with queued adapters of the
    same base (continuous refill); it returns the tasks to add, possibly none.
    """
    base = load_base(
        plan.base_model,
        tokenizer=plan.tokenizer,
        quantization=plan.quantization,
        dtype=plan.dtype,
        device=plan.device,
    )
    trainer = PackTrainer(base, plan.base_model, emit, plan.pack_id, kernel=kernel)
    capacity = len(plan.adapters)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for task in plan.adapters:
        trainer.add(task)
    while True:
        for task in _next_tasks(refill, capacity - len(trainer.active), distributed):
            trainer.add(task)
        if not trainer.active:
            break
        trainer.step()
    return PackResult(pack_id=plan.pack_id, adapters=dict(trainer.done))
