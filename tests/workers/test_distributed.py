"""Data parallel packs: two gloo workers train the same adapters as one process does."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.workers.conftest import TaskFactory, final_weights, max_weight_diff, plan_of
from workers.contract.plan import EvalEvent, PackPlan
from workers.training.pack import run_pack


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, plan_json: str, evals: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        events: list = []
        run_pack(PackPlan.model_validate_json(plan_json), emit=events.append)
        if rank == 0:
            evals.update({e.adapter: e.model_dump(mode="json") for e in events if isinstance(e, EvalEvent)})
        else:
            assert not events, "only rank 0 reports"
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_match_one_process(tiny_base: Path, make_task: TaskFactory) -> None:
    def tasks(out: str):
        return [
            make_task("counting", out=out, steps=6, batch_size=4),
            make_task("colors", out=out, steps=6, batch_size=3, lora={"r": 8}),
        ]

    single_tasks = tasks("single")
    single_events: list = []
    run_pack(plan_of(tiny_base, *single_tasks), emit=single_events.append)

    parallel_tasks = tasks("parallel")
    with mp.Manager() as manager:
        evals = manager.dict()
        mp.spawn(
            _worker,
            args=(2, _free_port(), plan_of(tiny_base, *parallel_tasks).model_dump_json(), evals),
            nprocs=2,
            join=True,
        )
        parallel_evals = dict(evals)

    for one, two in zip(single_tasks, parallel_tasks, strict=True):
        assert max_weight_diff(final_weights(one), final_weights(two)) <= 1e-5
    single_evals = {e.adapter: e for e in single_events if isinstance(e, EvalEvent)}
    assert single_evals.keys() == parallel_evals.keys() == {"counting", "colors"}
    for name, single in single_evals.items():
        parallel = EvalEvent.model_validate(parallel_evals[name])
        assert abs(single.eval_loss - parallel.eval_loss) <= 1e-5
        # The final eval's generations, split over the workers and gathered, are the one process's.
        assert single.final and parallel.final and "eval_exact_match" in parallel.metrics
        assert [s.output for s in parallel.samples] == [s.output for s in single.samples]
        assert [s.base_output for s in parallel.samples] == [s.base_output for s in single.samples]
        for metric, value in single.metrics.items():
            assert abs(value - parallel.metrics[metric]) <= 1e-5, metric
