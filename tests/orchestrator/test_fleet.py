"""The controller's tick at fleet scale, driven by simulated packs (`orchestrator.control.simulated`): the
real controller, service and store (SQLite and PostgreSQL), no Ray and no training.

- an adapter no worker can ever hold fails once, with the reason, and its neighbours train on;
- a `cancel` is served while a tick loads a new base model's config (the lock is not held meanwhile);
- `Store.apply_changes` writes a batch as the one-by-one updates did (moot changes skipped, metrics
  folded, checkpoints recorded once).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestrator.control.controller import Controller
from orchestrator.control.simulated import SimulatedPacks
from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.spec.states import AdapterState
from orchestrator.store import AdapterChange, NewAdapter, Store

SETTLED = {"succeeded", "partial", "failed", "cancelled"}


def _spec(base: Path, data: Path, name: str, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "base_model": str(base),
        "tokenizer": str(base),
        "train": {"steps": 3, "eval_every": 2, "checkpoint_every": 2},
        "resources": {"memory_gb_per_worker": 4, "max_adapters_per_worker": 4},
        "adapters": adapters,
    }


@pytest.fixture
def fleet(tmp_path: Path, db_url: str) -> Any:
    settings = Settings(home=tmp_path / "home", db_url=db_url)
    settings.home.mkdir()
    store = Store.open(settings.database_url)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello {i}"}) + "\n" for i in range(8)))
    yield settings, store, Service(settings, store), data
    store.close()


def _tick_until_settled(controller: Controller, store: Store, job_id: str, ticks: int = 50) -> None:
    for _ in range(ticks):
        controller.tick()
        if store.get_job(job_id).state in SETTLED:
            return
    raise AssertionError(f"job {job_id} did not settle in {ticks} ticks: {store.get_job(job_id).state}")


def test_an_adapter_no_worker_can_hold_fails_once_with_the_reason_and_its_neighbours_train(
    fleet: Any, tiny_base: Path
) -> None:
    settings, store, service, data = fleet
    huge = {"batch_size": 256, "max_seq_len": 1_000_000, "steps": 1}  # activations far over 4 GiB
    job = service.submit(
        _spec(
            tiny_base,
            data,
            "mixed",
            [
                {"name": "huge", "data": {"path": str(data)}, "train": huge},
                {"name": "fine", "data": {"path": str(data)}},
            ],
        )
    )
    controller = Controller(settings, store, packs=SimulatedPacks(nodes=2, cpus_per_node=2))

    _tick_until_settled(controller, store, job.id)
    for _ in range(3):  # settled stays settled: nothing fails twice
        controller.tick()

    huge_adapter = store.get_adapter("default", "huge")
    assert huge_adapter.state == AdapterState.FAILED
    assert huge_adapter.error.startswith("no worker can hold it: ")
    assert "GiB" in huge_adapter.error
    fine = store.get_adapter("default", "fine")
    assert fine.state == AdapterState.EVALUATED and fine.step == 3 and fine.final_checkpoint
    done = [e for e in store.list_events(job.id) if e.kind == "done" and e.adapter_id == huge_adapter.id]
    assert len(done) == 1 and done[0].payload["error"] == huge_adapter.error
    settled = store.get_job(job.id)
    assert settled.state == "partial" and "huge: no worker can hold it" in settled.error


def test_cancel_is_served_while_a_tick_loads_a_base_models_config(fleet: Any, tiny_base: Path) -> None:
    """The config is read by `AutoConfig.from_pretrained` (on a hub id: a download) before the tick takes
    its lock: while it is being opened, another thread's cancel runs to the end. Under a lock held
    through the load, the cancel would wait for the tick, which waits for it here: the join times out."""
    settings, store, service, data = fleet
    other = service.submit(_spec(tiny_base, data, "other", [{"name": "o", "data": {"path": str(data)}}]))
    service.submit(_spec(tiny_base, data, "first", [{"name": "f", "data": {"path": str(data)}}]))
    controller = Controller(settings, store, packs=SimulatedPacks())
    config = str(tiny_base / "config.json")
    served: list[bool] = []

    def during_the_load(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or served or not args or str(args[0]) != config:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        served.append(False)  # once: the cancel's own reads must not come back here
        cancel = threading.Thread(target=controller.cancel_job, args=(other.id,))
        cancel.start()
        cancel.join(timeout=120)  # a hang, not a speed: the lock held through the load never frees
        served[0] = not cancel.is_alive()

    sys.addaudithook(during_the_load)  # hooks stay for the process; this one acts once, in this test
    controller.tick()

    assert served == [True]
    assert store.get_adapter("default", "o").state == AdapterState.CANCELLED
    assert store.get_adapter("default", "f").state == AdapterState.TRAINING  # the tick went on


def test_apply_changes_writes_a_batch_as_one_by_one_updates_would(store: Store) -> None:
    _, (a, b), _ = store.create_job(
        "p",
        "j",
        {},
        [
            NewAdapter(name="a", base_model="base", data={"path": "/a.jsonl"}),
            NewAdapter(name="b", base_model="base", data={"path": "/b.jsonl"}),
        ],
    )
    store.create_pack("pk", base_model="base")
    store.add_pack_member("pk", a.id)
    store.update_adapter(AdapterChange(a.id, state="training"))
    store.add_checkpoint(a.id, 2, "/out/a/checkpoint-2")
    store.upsert_metrics(a.id, {"train_loss": (1.5, 1), "accuracy": (0.5, 1)})

    announced = store.apply_changes(
        [
            AdapterChange(a.id, None, step=2, metrics={"train_loss": (1.2, 2), "accuracy": (0.4, 2)}),
            AdapterChange(a.id, checkpoint=(2, "/out/a/checkpoint-2", False)),  # recorded already
            AdapterChange(a.id, None, step=3, metrics={"train_loss": (1.3, 3), "accuracy": (0.7, 3)}),
            AdapterChange(a.id, checkpoint=(3, "/out/a/final", True)),
            AdapterChange(a.id, "trained", final_checkpoint="/out/a/final", announce=True),
            AdapterChange(b.id, "trained", step=9, announce=True),  # queued -> trained: moot
            AdapterChange(b.id, "cancelled", announce=True),
            AdapterChange(b.id, None, eval_loss=0.5, metrics={"eval_loss": (float("nan"), 1)}),
        ]
    )

    assert [(r.name, r.state) for r in announced] == [("a", "trained"), ("b", "cancelled")]
    a_now, b_now = store.get_adapter_by_id(a.id), store.get_adapter_by_id(b.id)
    assert (a_now.state, a_now.step, a_now.final_checkpoint) == ("trained", 3, "/out/a/final")
    assert (b_now.state, b_now.step, b_now.eval_loss) == ("cancelled", 0, 0.5)
    metrics = {m.key: (m.last_value, m.best_value, m.step) for m in store.get_metrics(a.id)}
    assert metrics == {"train_loss": (1.3, 1.2, 3), "accuracy": (0.7, 0.7, 3)}
    assert store.get_metrics(b.id) == []  # NaN is no value
    steps = [(c.step, c.path, c.final) for c in store.list_checkpoints(a.id)]
    assert steps == [(2, "/out/a/checkpoint-2", False), (3, "/out/a/final", True)]
    (member,) = store.list_pack_members("pk")
    assert member.outcome == "trained"  # leaving `training` closed its pack attempt
