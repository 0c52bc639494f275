"""The MLflow mirror, read back with MlflowClient; and nothing is lost while MLflow is down."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow import MlflowClient

from orchestrator.registry.promotion import Registry
from orchestrator.store import AdapterChange, NewAdapter, NewEvent, Store
from orchestrator.tracking.mirror import CURSOR, Tracker, experiment_name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job_with_events(store: Store, final_dir: Path) -> tuple[str, dict[str, str]]:
    data = {"path": "/data/x.jsonl"}
    job, adapters, _ = store.create_job(
        "proj",
        "job",
        {"base_model": "base", "adapters": [{}, {}]},
        [
            NewAdapter(name="root", base_model="base", data=data, lora={"r": 4}, train={"steps": 3}),
            NewAdapter(name="child", base_model="base", data=data, parent_name="root", train={"steps": 2}),
        ],
    )
    ids = {a.name: a.id for a in adapters}
    events = []
    for name, steps in (("root", 3), ("child", 2)):
        events.append(
            NewEvent(
                job.id,
                "start",
                ids[name],
                0,
                {"pack_id": "p1", "data_fingerprint": "f" * 64, "train_examples": 10, "eval_examples": 2},
            )
        )
        events += [
            NewEvent(
                job.id,
                "step",
                ids[name],
                s,
                {"loss": 3.0 / s, "lr": 1e-3, "tokens_per_s": 100.0, "grad_norm": 0.5},
            )
            for s in range(1, steps + 1)
        ]
        events.append(NewEvent(job.id, "eval", ids[name], steps, {"eval_loss": 1.5, "perplexity": 4.48}))
        events.append(
            NewEvent(job.id, "done", ids[name], steps, {"status": "trained", "final_dir": str(final_dir)})
        )
    store.record_events(events)
    for name in ("root", "child"):
        store.update_adapter(AdapterChange(ids[name], state="training"))
        store.update_adapter(AdapterChange(ids[name], state="trained", final_checkpoint=str(final_dir)))
    store.set_job_state(job.id, "succeeded")
    return job.id, ids


def test_mirror_survives_mlflow_being_down_and_catches_up_later(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'lf.db'}")
    final_dir = tmp_path / "final"
    final_dir.mkdir()
    (final_dir / "adapter_config.json").write_text("{}")
    job_id, ids = _job_with_events(store, final_dir)

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    tracker = Tracker(store, uri)
    assert tracker.sync_quietly() is False  # nobody listens: training goes on, nothing is mirrored yet
    assert store.get_cursor(CURSOR) == 0

    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--default-artifact-root",
            (tmp_path / "artifacts").as_uri(),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": "*"},
    )
    try:
        deadline = time.monotonic() + 90
        while not tracker.sync_quietly():
            assert time.monotonic() < deadline, "MLflow server did not come up"
            time.sleep(1)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(experiment_name("proj"))
        runs = client.search_runs([experiment.experiment_id])
        by_kind = {r.data.tags["lorafleet.kind"] + ":" + r.info.run_name: r for r in runs}
        assert set(by_kind) == {"job:job", "adapter:root", "adapter:child"}
        job_run = by_kind["job:job"]
        assert job_run.info.status == "FINISHED" and job_run.data.params["base_model"] == "base"
        child = by_kind["adapter:child"]
        assert child.data.tags["mlflow.parentRunId"] == job_run.info.run_id
        assert child.data.tags["lorafleet.lineage_path"] == "root/child"
        assert child.data.tags["lorafleet.parent"] == "proj/root"
        assert child.data.tags["lorafleet.root"] == "proj/root"
        assert child.data.tags["lorafleet.data_fingerprint"] == "f" * 64
        assert child.data.params["train.steps"] == "2" and child.info.status == "FINISHED"
        history = client.get_metric_history(by_kind["adapter:root"].info.run_id, "train_loss")
        assert [m.step for m in history] == [1, 2, 3]
        assert [a.path for a in client.list_artifacts(child.info.run_id, "adapter")] == [
            "adapter/adapter_config.json"
        ]
        assert store.get_adapter_by_id(ids["child"]).mlflow_run_id == child.info.run_id
        assert store.get_job(job_id).mlflow_run_id == job_run.info.run_id
        assert tracker.sync() == 0  # the cursor moved: nothing is mirrored twice
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_embedded_store_mirrors_in_process(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'lf.db'}")
    final_dir = tmp_path / "final"
    final_dir.mkdir()
    (final_dir / "adapter_model.safetensors").write_bytes(b"x")
    _job_with_events(store, final_dir)
    tracker = Tracker(store, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow-artifacts")
    assert tracker.sync() == 11  # start, steps, eval and done of both adapters
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name("proj"))
    assert experiment.artifact_location.startswith((tmp_path / "mlflow-artifacts").as_uri())
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_an_adapter_that_fails_before_training_gets_one_failed_run_with_its_reason(tmp_path: Path) -> None:
    """A controller-decided failure (e.g. a base model that does not load) has no start event: its
    `done` event is the adapter's first, and still makes exactly one run, failed, with the reason, and
    times taken from the event."""
    store = Store.open(f"sqlite:///{tmp_path / 'lf.db'}")
    job, (adapter,), _ = store.create_job(
        "proj", "job", {}, [NewAdapter(name="a", base_model="x/y", data={"path": "/d.jsonl"})]
    )
    at = 1_700_000_000.0
    done = {"status": "failed", "error": "`base_model` 'x/y' cannot be loaded", "at": at}
    store.record_events([NewEvent(job.id, "done", adapter.id, 0, done)])
    Tracker(store, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts").sync()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment_name("proj")).experiment_id])
    adapter_runs = [r for r in runs if r.data.tags["lorafleet.kind"] == "adapter"]
    assert len(adapter_runs) == 1
    run = adapter_runs[0]
    assert run.info.status == "FAILED" and "base_model" in run.data.tags["lorafleet.error"]
    assert run.info.start_time == run.info.end_time == int(at * 1000)


def test_steps_redone_after_a_worker_restart_are_logged_once(tmp_path: Path) -> None:
    """A worker died after step 5 (last checkpoint at 3) and its replacement redid 4 and 5 exactly: MLflow
    keeps one point per step, none missing, even when the mirror restarts in between."""
    store = Store.open(f"sqlite:///{tmp_path / 'lf.db'}")
    job, (adapter,), _ = store.create_job(
        "proj", "job", {}, [NewAdapter(name="a", base_model="b", data={"path": "/d.jsonl"})]
    )

    def steps(first: int, last: int) -> list[NewEvent]:
        return [
            NewEvent(job.id, "step", adapter.id, s, {"loss": 1.0 / s, "lr": 0.1, "grad_norm": 1.0})
            for s in range(first, last + 1)
        ]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.record_events(steps(1, 5))
    Tracker(store, uri, tmp_path / "artifacts").sync()
    store.record_events([NewEvent(job.id, "start", adapter.id, 3, {"resumed": True}), *steps(4, 8)])
    Tracker(store, uri, tmp_path / "artifacts").sync()  # a new mirror process: it asks MLflow
    run_id = store.get_adapter_by_id(adapter.id).mlflow_run_id
    history = MlflowClient(uri).get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 9))


def test_a_mirror_asked_to_stop_leaves_its_backlog_to_the_next_start(tmp_path: Path) -> None:
    """Issue 15, item 10: with thousands of events behind, SIGTERM took ~7 min (the mirror caught up
    first). Now it stops after the batch at hand (and one more); the cursor in SQL lets the next mirror
    finish the backlog, each step of each metric logged once."""
    store = Store.open(f"sqlite:///{tmp_path / 'lf.db'}")
    new = [NewAdapter(name=f"a{i}", base_model="x/y", data={"path": "/d.jsonl"}) for i in range(4)]
    job, adapters, _ = store.create_job("proj", "job", {}, new)
    steps = range(1, 101)
    store.record_events(
        [NewEvent(job.id, "step", a.id, s, {"loss": 1.0 / s}) for a in adapters for s in steps]
    )
    last = store.list_events(job.id, limit=10_000)[-1].id
    uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"

    stopping = Tracker(store, uri, artifacts, batch_events=20)  # 20 batches of backlog
    stopping.start(period=0.01)
    deadline = time.monotonic() + 300
    while store.get_cursor(CURSOR) == 0:
        assert time.monotonic() < deadline, "the mirror never mirrored its first batch"
        time.sleep(0.01)
    stopping.stop()
    stopped_at = store.get_cursor(CURSOR)
    assert 0 < stopped_at < last, "the mirror caught up on the whole backlog before it stopped"

    resumed = Tracker(store, uri, artifacts, batch_events=20)
    assert resumed.sync() == len([e for e in store.list_events(job.id, limit=10_000) if e.id > stopped_at])
    assert store.get_cursor(CURSOR) == last
    client = MlflowClient(uri)
    for adapter in adapters:
        run_id = store.get_adapter_by_id(adapter.id).mlflow_run_id
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(steps)


def test_concurrent_promotions_while_the_mirror_syncs_leave_no_orphan_runs(tmp_path: Path) -> None:
    """Two `promote` calls per adapter at once, while the mirror thread syncs the job's events: every
    run in MLflow is one SQL knows (before, request and mirror threads both created runs for the same
    adapter), and every promotion succeeds, the first-ever registration of a model included (before,
    one of two answered RESOURCE_ALREADY_EXISTS)."""
    store = Store.open(f"sqlite:///{tmp_path / 'lf.db'}")
    final_dir = tmp_path / "final"
    final_dir.mkdir()
    (final_dir / "adapter_config.json").write_text("{}")
    names = [f"a{i}" for i in range(5)]
    data = {"path": "/data/x.jsonl"}
    spec = {
        "name": "job",
        "project": "proj",
        "base_model": "base",
        "adapters": [{"name": n, "data": data} for n in names],
    }
    job, adapters, _ = store.create_job(
        "proj", "job", spec, [NewAdapter(name=n, base_model="base", data=data) for n in names]
    )
    events = []
    for adapter in adapters:
        events.append(NewEvent(job.id, "start", adapter.id, 0, {"pack_id": "p1"}))
        events += [NewEvent(job.id, "step", adapter.id, s, {"loss": 1.0 / s}) for s in range(1, 4)]
        events.append(NewEvent(job.id, "eval", adapter.id, 3, {"eval_loss": 1.5}))
        events.append(
            NewEvent(job.id, "done", adapter.id, 3, {"status": "trained", "final_dir": str(final_dir)})
        )
        store.update_adapter(AdapterChange(adapter.id, state="training"))
        store.update_adapter(
            AdapterChange(adapter.id, state="trained", final_checkpoint=str(final_dir), eval_loss=1.5)
        )
        store.update_adapter(AdapterChange(adapter.id, state="evaluated"))
    store.record_events(events)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(store, uri, tmp_path / "artifacts")
    registry = Registry(store, tracker)
    promoters = [a.id for a in adapters for _ in range(2)]
    start = threading.Barrier(len(promoters))
    outcomes: list[object] = []

    def promote(adapter_id: str) -> None:
        start.wait()
        try:
            outcomes.append(registry.promote(adapter_id).decision)
        except Exception as exc:  # the assertion below names it
            outcomes.append(exc)

    threads = [threading.Thread(target=promote, args=(i,)) for i in promoters]
    tracker.start(period=0.01)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        tracker.stop()
    assert outcomes == ["promoted"] * len(promoters)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment_name("proj")).experiment_id])
    known = {store.get_job(job.id).mlflow_run_id} | {
        store.get_adapter_by_id(a.id).mlflow_run_id for a in adapters
    }
    assert {r.info.run_id for r in runs} == known and len(known) == 1 + len(adapters)
    for name in names:
        versions = client.search_model_versions(f"name = 'proj.{name}'")
        assert len(versions) == 2
