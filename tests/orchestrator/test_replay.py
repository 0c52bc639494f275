"""A controller that starts after another died replays the packs' event logs: what the engine reported
but the dead controller never recorded is recorded once, and the adapters' rows catch up."""

from __future__ import annotations

from pathlib import Path

from orchestrator.control.controller import Controller
from orchestrator.control.packrun import EVENTS, EventLog
from orchestrator.settings import Settings
from orchestrator.store import AdapterChange, NewAdapter, NewEvent, Store
from workers.contract.plan import AdapterDone, CheckpointEvent, StartEvent, StepEvent


def test_reconcile_replays_what_the_dead_controller_never_recorded(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    settings.home.mkdir()
    store = Store.open(settings.database_url)
    job, (a, b), _ = store.create_job(
        "p",
        "j",
        {},
        [
            NewAdapter(name="a", base_model="base", data={"path": "/a.jsonl"}),
            NewAdapter(name="b", base_model="base", data={"path": "/b.jsonl"}),
        ],
    )
    store.create_pack("pk", base_model="base")
    for adapter in (a, b):
        store.add_pack_member("pk", adapter.id)
        store.update_adapter(AdapterChange(adapter.id, state="training"))

    def step(name: str, s: int) -> StepEvent:
        return StepEvent(
            pack_id="pk", adapter=name, step=s, loss=1.0, lr=0.1, grad_norm=1, tokens=s, tokens_per_s=1
        )

    start = StartEvent(
        pack_id="pk", adapter="a", step=0, data_fingerprint="f", train_examples=9, eval_examples=0
    )
    heard = [start, step("a", 1)]  # the dead controller recorded these two
    unheard = [
        step("a", 2),
        CheckpointEvent(pack_id="pk", adapter="a", step=2, path=tmp_path / "ckpt-2"),
        AdapterDone(pack_id="pk", adapter="a", step=2, status="trained", final_dir=tmp_path / "final"),
        step("b", 1),
        CheckpointEvent(pack_id="pk", adapter="b", step=1, path=tmp_path / "b-ckpt-1"),
    ]
    store.record_events(
        [NewEvent(job.id, e.kind, a.id, e.step, e.model_dump(mode="json"), e.id) for e in heard]
    )
    log = Path(EventLog(settings.storage_root, "pk").location)
    log.parent.mkdir(parents=True)
    log.write_text(
        EVENTS.dump_json(heard).decode() + "\n" + EVENTS.dump_json(unheard).decode() + "\n" + '[{"kind": "st'
    )

    Controller(settings, store).reconcile()

    finished, resumed = store.get_adapter_by_id(a.id), store.get_adapter_by_id(b.id)
    assert (finished.state, finished.step, finished.final_checkpoint) == (
        "trained",
        2,
        str(tmp_path / "final"),
    )
    assert (resumed.state, resumed.step) == ("queued", 1)  # back to the queue, from its checkpoint at 1
    assert store.latest_checkpoint(b.id).step == 1
    kinds = [(e.kind, e.step) for e in store.list_events(job.id)]
    assert kinds == [
        ("start", 0),
        ("step", 1),
        ("step", 2),
        ("checkpoint", 2),
        ("done", 2),
        ("step", 1),
        ("checkpoint", 1),
    ]
    assert store.get_pack("pk").state == "failed"
    Controller(settings, store).reconcile()  # again: nothing is recorded twice
    assert len(store.list_events(job.id)) == len(kinds)
