"""The store on SQLite and PostgreSQL (see conftest.py), plus the pure lifecycle rules it enforces."""

from __future__ import annotations

import threading
from datetime import UTC

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from orchestrator.spec.states import (
    ADAPTER_FINISHED,
    AdapterState,
    InvalidTransition,
    JobState,
    check_transition,
    job_state_from_adapters,
)
from orchestrator.store import (
    AdapterChange,
    Conflict,
    NewAdapter,
    NewEvent,
    NotFound,
    Store,
    StoreError,
    config_hash,
)
from orchestrator.store.models import AdapterRow, JobRow, ProjectRow
from workers.contract.plan import DataConfig, LoraConfig, TrainConfig

A = AdapterState


def new(name: str, **kw) -> NewAdapter:
    return NewAdapter(name=name, base_model="tiny", data={"path": f"{name}.jsonl"}, lora={"r": 8}, **kw)


def counts(store: Store) -> tuple[int, int, int]:
    with store.engine.connect() as c:
        return tuple(c.scalar(select(func.count()).select_from(t)) for t in (ProjectRow, JobRow, AdapterRow))


def walk(store: Store, adapter_id: str, *states: AdapterState) -> None:
    for state in states:
        store.update_adapter(AdapterChange(adapter_id, state=state))


# ---- jobs ----


def test_create_get_and_list_jobs(store: Store) -> None:
    job, adapters, created = store.create_job("p", "first", {"k": [1, 2]}, [new("a"), new("b", priority=3)])
    assert created and job.state == "pending" and job.spec == {"k": [1, 2]}
    assert job.created_at.tzinfo == UTC and store.get_job(job.id) == job
    assert [a.name for a in adapters] == ["a", "b"]
    a = store.get_adapter("p", "a")
    assert a == adapters[0] and store.get_adapter_by_id(a.id) == a
    assert (a.state, a.job_id, a.step) == ("queued", job.id, 0)
    assert (a.depth, a.root_id, a.parent_id) == (0, a.id, None)
    assert a.lora == LoraConfig(r=8) and a.data == DataConfig(path="a.jsonl")  # typed, validated once
    assert a.config_hash == config_hash("tiny", "none", "float32", a.lora, TrainConfig(), a.data)
    second, _, _ = store.create_job("q", "second", {}, [new("a")])  # names are unique per project only
    assert [j.id for j in store.list_jobs()] == [second.id, job.id]  # newest first
    assert [j.id for j in store.list_jobs(project="p")] == [job.id]
    store.set_job_state(second.id, JobState.RUNNING)
    assert [j.id for j in store.list_jobs(states=["running"])] == [second.id]
    assert [a.name for a in store.list_adapters(job_id=job.id)] == ["b", "a"]  # priority first
    assert {a.project for a in store.list_adapters(states=[A.QUEUED])} == {"p", "q"}


def test_missing_rows_are_not_found_and_named(store: Store) -> None:
    with pytest.raises(NotFound, match="job 'nope'"):
        store.get_job("nope")
    with pytest.raises(NotFound, match="adapter p/ghost"):
        store.get_adapter("p", "ghost")
    with pytest.raises(NotFound, match="adapter 'nope'"):
        store.update_adapter(AdapterChange("nope", step=1))
    with pytest.raises(NotFound, match="pack 'nope'"):
        store.finish_pack("nope", "failed")


def test_idempotency_key_returns_the_existing_job(store: Store) -> None:
    job, adapters, created = store.create_job("p", "j", {"x": 1}, [new("a")], idempotency_key="key-1")
    again, again_adapters, created_again = store.create_job(
        "p", "j", {"x": 1}, [new("a")], idempotency_key="key-1"
    )
    assert created and not created_again
    assert again == job and again_adapters == adapters
    assert counts(store) == (1, 1, 1)
    with pytest.raises(Conflict, match="idempotency key 'key-1'"):
        store.create_job("p", "j", {"x": 2}, [new("z")], idempotency_key="key-1")


def test_idempotency_keys_belong_to_their_project(store: Store) -> None:
    """Another project's key is never met: reusing it neither names that project's job (once a 409
    with its id, project and name) nor lets one project claim the keys another will use."""
    alices, _, _ = store.create_job("alice", "secret-job", {"x": 1}, [new("a")], idempotency_key="k")
    bobs, _, created = store.create_job("bob", "mine", {"y": 2}, [new("b")], idempotency_key="k")
    assert created and bobs.id != alices.id and bobs.project == "bob"
    again, _, created_again = store.create_job("bob", "mine", {"y": 2}, [new("b")], idempotency_key="k")
    assert again == bobs and not created_again
    with pytest.raises(Conflict) as refused:  # bob's own key, another spec: names bob's job only
        store.create_job("bob", "other", {"z": 3}, [new("c")], idempotency_key="k")
    assert bobs.id in str(refused.value) and alices.id not in str(refused.value)
    assert "alice" not in str(refused.value) and "secret-job" not in str(refused.value)
    # a key bob used first is still alice's to use
    store.create_job("bob", "first", {}, [new("d")], idempotency_key="alice-next")
    _, _, alice_created = store.create_job("alice", "later", {}, [new("e")], idempotency_key="alice-next")
    assert alice_created


def test_a_parent_outside_the_allowed_projects_is_not_found_and_nothing_is_written(store: Store) -> None:
    _, (secret,), _ = store.create_job("alice", "j", {}, [new("secret")])
    before = counts(store)
    with pytest.raises(NotFound) as refused:
        store.create_job("bob", "steal", {}, [new("stolen", parent_id=secret.id)], parent_projects={"bob"})
    assert str(refused.value) == f"parent adapter id {secret.id!r} of adapter 'stolen' not found"
    assert counts(store) == before
    _, (child,), _ = store.create_job("bob", "ok", {}, [new("child", parent_id=secret.id)])  # admin: any
    assert child.parent_id == secret.id


def test_taken_adapter_name_is_a_conflict_and_nothing_is_written(store: Store) -> None:
    store.create_job("p", "j", {}, [new("a")])
    before = counts(store)
    with pytest.raises(Conflict, match="p/a"):
        store.create_job("p", "j2", {}, [new("b"), new("a")])
    with pytest.raises(Conflict, match=r"more than once: \['c'\]"):
        store.create_job("new-project", "j3", {}, [new("c"), new("c")])
    assert counts(store) == before
    with pytest.raises(NotFound):
        store.get_adapter("p", "b")


def test_job_transitions(store: Store) -> None:
    job, _, _ = store.create_job("p", "j", {}, [new("a")])
    running = store.set_job_state(job.id, "running")
    assert running.state == "running" and running.updated_at >= job.updated_at
    failed = store.set_job_state(job.id, "failed", error="boom")
    assert (failed.state, failed.error) == ("failed", "boom")
    assert store.set_job_state(job.id, "running").state == "running"  # `lorafleet retry`
    store.set_job_state(job.id, "succeeded")
    with pytest.raises(InvalidTransition, match=f"job '{job.id}' cannot go from 'succeeded' to 'running'"):
        store.set_job_state(job.id, "running")
    assert store.update_job(job.id, mlflow_run_id="run-1").mlflow_run_id == "run-1"
    with pytest.raises(TypeError, match="unexpected keyword argument 'name'"):  # typed: no such field
        store.update_job(job.id, name="renamed")  # type: ignore[call-arg]


# ---- adapters ----


def test_adapter_transitions_and_timestamps(store: Store) -> None:
    _, (a, b), _ = store.create_job("p", "j", {}, [new("a"), new("b")])
    with pytest.raises(InvalidTransition) as refused:
        store.update_adapter(AdapterChange(a.id, state="trained"))
    assert "adapter 'p/a' cannot go from 'queued' to 'trained'" in str(refused.value)
    assert store.get_adapter_by_id(a.id).state == "queued"  # the refused change wrote nothing

    training = store.update_adapter(AdapterChange(a.id, state=A.TRAINING, step=3))
    assert training.started_at is not None and training.finished_at is None and training.step == 3
    requeued = store.update_adapter(AdapterChange(a.id, state=A.QUEUED))  # lost worker: back to the queue
    assert requeued.started_at == training.started_at and requeued.finished_at is None
    walk(store, a.id, A.TRAINING)
    trained = store.update_adapter(
        AdapterChange(a.id, state=A.TRAINED, final_checkpoint="/ck/final", eval_loss=1.5)
    )
    assert trained.finished_at is not None and trained.started_at == training.started_at
    assert (trained.final_checkpoint, trained.eval_loss) == ("/ck/final", 1.5)
    walk(store, a.id, A.EVALUATED, A.PROMOTED, A.PROMOTED)  # re-promotion moves the alias
    assert store.get_adapter_by_id(a.id).finished_at == trained.finished_at

    cancelled = store.update_adapter(AdapterChange(b.id, state=A.CANCELLED))
    assert cancelled.finished_at is not None
    with pytest.raises(InvalidTransition, match="it may go to: queued"):  # only a person's retry
        store.update_adapter(AdapterChange(b.id, state=A.TRAINING))
    with pytest.raises(TypeError, match="unexpected keyword argument 'name'"):  # not a settable field
        AdapterChange(b.id, name="x")  # type: ignore[call-arg]


def test_a_queued_adapter_keeps_why_it_waits_until_it_leaves_the_queue(store: Store) -> None:
    _, (a,), _ = store.create_job("p", "j", {}, [new("a")])
    assert a.waiting is None
    reason = "waiting: project 'p' runs 4 adapters, its cap is 4"
    assert store.update_adapter(AdapterChange(a.id, waiting=reason)).waiting == reason
    assert store.get_adapter("p", "a").waiting == reason
    assert (
        store.update_adapter(AdapterChange(a.id, state=A.TRAINING)).waiting is None
    )  # placed: no longer waiting


def test_seq_is_fifo_across_jobs_and_priority_wins(store: Store) -> None:
    _, first, _ = store.create_job("p", "j1", {}, [new("a"), new("b")])
    _, second, _ = store.create_job("q", "j2", {}, [new("c"), new("d", priority=1)])
    seqs = [a.seq for a in first + second]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert [a.name for a in store.list_adapters()] == ["d", "a", "b", "c"]


def test_seq_is_unique_under_concurrent_submits(store: Store) -> None:
    errors: list[BaseException] = []

    def submit(worker: int) -> None:
        try:
            for i in range(3):
                store.create_job(f"p{worker}", f"j{i}", {}, [new(f"a{i}"), new(f"b{i}")])
        except BaseException as exc:  # surfaced below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    seqs = sorted(a.seq for a in store.list_adapters())
    assert seqs == list(range(seqs[0], seqs[0] + 24))
    for job in store.list_jobs():  # a job's adapters got consecutive numbers
        job_seqs = [a.seq for a in store.list_adapters(job_id=job.id)]
        assert job_seqs[1] == job_seqs[0] + 1


# ---- lineage ----


def test_lineage_over_three_levels(store: Store) -> None:
    # the child comes first: parents named within the job are resolved (and inserted) before it
    _, (b, a), _ = store.create_job("p", "j1", {}, [new("b", parent_name="a"), new("a")])
    assert (a.depth, a.root_id, b.depth, b.root_id, b.parent_id) == (0, a.id, 1, a.id, a.id)
    _, (c, d), _ = store.create_job("q", "j2", {}, [new("c", parent_id=b.id), new("d", parent_id=a.id)])
    assert (c.parent_id, c.root_id, c.depth) == (b.id, a.id, 2)
    assert (d.parent_id, d.root_id, d.depth) == (a.id, a.id, 1)
    _, (other,), _ = store.create_job("p", "j3", {}, [new("other")])

    assert [x.name for x in store.ancestors(c.id)] == ["a", "b"]
    assert store.ancestors(a.id) == []
    assert [x.name for x in store.children(a.id)] == ["b", "d"]
    assert store.children(c.id) == []
    assert [x.name for x in store.subtree(a.id)] == ["a", "b", "d", "c"]
    assert [x.name for x in store.subtree(other.id)] == ["other"]
    with pytest.raises(NotFound):
        store.subtree(b.id)  # not a root
    with pytest.raises(NotFound):
        store.ancestors("nope")


def test_bad_parents_write_nothing(store: Store) -> None:
    before = counts(store)
    with pytest.raises(NotFound, match="parent adapter id 'nope' of adapter 'x'"):
        store.create_job("p", "j", {}, [new("x", parent_id="nope")])
    with pytest.raises(NotFound, match="parent 'ghost' of adapter 'x' is not in this job"):
        store.create_job("p", "j", {}, [new("x", parent_name="ghost")])
    with pytest.raises(StoreError, match="own ancestor"):
        store.create_job("p", "j", {}, [new("x", parent_name="y"), new("y", parent_name="x")])
    assert counts(store) == before


# ---- packs, attempts, checkpoints ----


def test_packs_attempts_and_checkpoints(store: Store) -> None:
    _, (a, b), _ = store.create_job("p", "j", {}, [new("a"), new("b")])
    pack = store.create_pack("pk1", base_model="tiny", resources={"workers": 1}, ray_run_name="pack-pk1")
    assert (pack.id, pack.state, pack.resources, pack.finished_at) == ("pk1", "running", {"workers": 1}, None)
    for adapter in (a, b):
        store.add_pack_member(pack.id, adapter.id)
        store.update_adapter(AdapterChange(adapter.id, state=A.TRAINING))
    store.update_adapter(AdapterChange(a.id, state=A.QUEUED))  # the pack lost it: attempt 1 ends as "queued"

    store.add_checkpoint(a.id, 5, "/ck/5")
    store.add_checkpoint(a.id, 10, "/ck/10")
    assert store.latest_checkpoint(a.id).path == "/ck/10"
    assert store.latest_checkpoint(b.id) is None
    with pytest.raises(NotFound):
        store.add_checkpoint("nope", 1, "/x")

    failed = store.finish_pack(pack.id, "failed", error="worker died")
    assert (failed.state, failed.error) == ("failed", "worker died") and failed.finished_at is not None
    with pytest.raises(InvalidTransition, match="pack 'pk1'"):
        store.finish_pack(pack.id, "succeeded")
    with pytest.raises(Conflict, match="pack 'pk1' is failed"):
        store.add_pack_member(pack.id, a.id)

    second = store.create_pack(base_model="tiny")
    member = store.add_pack_member(second.id, a.id)
    assert member.attempt == 2 and member.left_at is None
    store.update_adapter(AdapterChange(a.id, state=A.TRAINING))
    store.add_checkpoint(a.id, 10, "/ck/10-again")  # resumed and wrote step 10 again: the newest wins
    store.add_checkpoint(a.id, 20, "/ck/final", final=True)
    store.update_adapter(AdapterChange(a.id, state=A.TRAINED))
    store.finish_pack(second.id, "succeeded")

    latest = store.latest_checkpoint(a.id)
    assert (latest.step, latest.final, latest.path) == (20, True, "/ck/final")
    assert [c.path for c in store.list_checkpoints(a.id)] == ["/ck/5", "/ck/10", "/ck/10-again", "/ck/final"]
    history = [(m.pack_id, m.attempt, m.outcome) for m in store.list_pack_members(adapter_id=a.id)]
    assert history == [("pk1", 1, "queued"), (second.id, 2, "trained")]
    assert [(m.adapter_id, m.outcome) for m in store.list_pack_members("pk1")] == [
        (a.id, "queued"),
        (b.id, "failed"),  # still aboard when the pack failed
    ]
    assert [p.id for p in store.list_packs()] == ["pk1", second.id]
    assert [p.id for p in store.list_packs(states=["succeeded"])] == [second.id]


# ---- events, metrics, registry ----


def test_events_are_batched_and_paged(store: Store) -> None:
    job, (a,), _ = store.create_job("p", "j", {}, [new("a")])
    other, _, _ = store.create_job("p", "k", {}, [new("b")])
    batch = [NewEvent(job.id, "step", a.id, step=i, payload={"loss": 1.0 / (i + 1)}) for i in range(25)]
    batch.insert(10, NewEvent(other.id, "note", payload={"x": 1}))
    assert store.record_events(batch) == 26
    assert store.record_events([]) == 0
    store.record_events([NewEvent(job.id, "eval", a.id, step=25, payload={"loss": float("nan"), "v": [1.0]})])

    pages, after = [], 0
    while page := store.list_events(job.id, after_id=after, limit=10):
        pages.append(page)
        after = page[-1].id
    assert [len(p) for p in pages] == [10, 10, 6]
    events = [e for p in pages for e in p]
    assert [e.step for e in events] == list(range(26))
    assert events[-1].payload == {"loss": None, "v": [1.0]}
    assert [e.kind for e in store.list_events(other.id)] == ["note"]
    with pytest.raises(NotFound, match="unknown jobs"):
        store.record_events([NewEvent("nope", "step")])


def test_an_engine_event_is_recorded_once_however_often_it_is_replayed(store: Store) -> None:
    job, (a,), _ = store.create_job("p", "j", {}, [new("a")])
    batch = [NewEvent(job.id, "step", a.id, step=i, event_id=f"e{i}") for i in range(5)]
    assert store.record_events(batch[:3]) == 3
    assert store.unrecorded(["e1", "e3", "e4"]) == {"e3", "e4"}
    assert store.record_events([*batch, batch[4]]) == 2  # the first three are known, e4 repeats
    assert store.record_events([NewEvent(job.id, "done", a.id, 5), NewEvent(job.id, "done", a.id, 5)]) == 2
    assert [e.step for e in store.list_events(job.id)] == [0, 1, 2, 3, 4, 5, 5]


def test_concurrent_first_writes_of_a_new_metric_all_land(store: Store) -> None:
    """Writers racing to create the same summary row are serialised on the adapter row, not refused
    (on PostgreSQL two inserts of a new key used to conflict)."""
    _, (a,), _ = store.create_job("p", "j", {}, [new("a")])
    errors: list[Exception] = []
    start = threading.Barrier(8)

    def write(i: int) -> None:
        start.wait()
        try:
            store.upsert_metrics(a.id, {"train_loss": (float(10 - i), i)})
        except Exception as exc:  # any refusal is the bug
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    (summary,) = store.get_metrics(a.id)
    assert summary.best_value == 3.0


def test_metric_summaries_keep_last_and_best(store: Store) -> None:
    _, (a,), _ = store.create_job("p", "j", {}, [new("a")])
    store.upsert_metrics(a.id, {"train_loss": (2.0, 1), "accuracy": (0.5, 1)})
    store.upsert_metrics(a.id, {"train_loss": (1.0, 2), "accuracy": (0.7, 2)})
    store.upsert_metrics(a.id, {"train_loss": (1.5, 3), "accuracy": (0.6, 3), "eval_loss": (float("nan"), 3)})
    store.upsert_metrics(a.id, {"margin": (3.0, 1)}, lower_is_better={"margin"})
    store.upsert_metrics(a.id, {"margin": (4.0, 2)}, lower_is_better={"margin"})
    got = {m.key: (m.last_value, m.best_value, m.step) for m in store.get_metrics(a.id)}
    assert got == {"accuracy": (0.6, 0.7, 3), "margin": (4.0, 3.0, 2), "train_loss": (1.5, 1.0, 3)}


def test_an_adapters_final_eval_and_its_jobs_spec_are_found(store: Store) -> None:
    """The judged samples stay in the event log: the newest final eval of the adapter is found there,
    not another adapter's nor an intermediate eval; job specs come back by id in one call."""
    job, (a, b), _ = store.create_job("p", "j", {"eval": {"scorers": ["token_f1"]}}, [new("a"), new("b")])
    assert store.final_eval(a) is None
    store.record_events(
        [
            NewEvent(job.id, "eval", a.id, 5, {"final": True, "samples": [{"prompt": "old"}]}),
            NewEvent(job.id, "eval", a.id, 10, {"final": True, "samples": [{"prompt": "new"}]}),
            NewEvent(job.id, "eval", a.id, 12, {"final": False}),
            NewEvent(job.id, "eval", b.id, 10, {"final": True, "samples": [{"prompt": "b's"}]}),
        ]
    )
    final = store.final_eval(a)
    assert final is not None and final.step == 10 and final.payload["samples"] == [{"prompt": "new"}]
    assert store.job_specs([job.id, "nope"]) == {job.id: {"eval": {"scorers": ["token_f1"]}}}


def test_registry_decisions_and_history(store: Store) -> None:
    _, (a,), _ = store.create_job("p", "j", {}, [new("a")])
    walk(store, a.id, A.TRAINING, A.TRAINED, A.EVALUATED)
    store.record_registry_decision(
        a.id, "rejected", metric="eval_loss", value=2.5, reason="eval_loss 2.5 > max 2.0"
    )
    assert store.get_adapter_by_id(a.id).state == "rejected"
    with pytest.raises(InvalidTransition):
        store.record_registry_decision(a.id, "rejected", reason="again")
    forced = store.record_registry_decision(
        a.id, "promoted", model_name="p.a", version=1, alias="champion", reason="forced by alice"
    )
    assert (forced.model_name, forced.version, forced.alias) == ("p.a", 1, "champion")
    store.record_registry_decision(a.id, "promoted", model_name="p.a", version=2, alias="champion")
    assert store.get_adapter_by_id(a.id).state == "promoted"
    store.record_registry_decision(a.id, "rejected", reason="note only", transition=False)
    history = store.registry_history(a.id)
    assert [(h.decision, h.version) for h in history] == [
        ("rejected", None),
        ("promoted", 1),
        ("promoted", 2),
        ("rejected", None),
    ]
    assert history[0].reason == "eval_loss 2.5 > max 2.0" and history[0].value == 2.5
    with pytest.raises(ValueError, match="`decision`"):
        store.record_registry_decision(a.id, "maybe")


# ---- the lifecycle rules themselves (pure) ----


@pytest.mark.parametrize(
    ("kind", "src", "dst", "ok"),
    [
        ("job", "pending", "running", True),
        ("job", "pending", "succeeded", True),
        ("job", "running", "partial", True),
        ("job", "succeeded", "failed", False),
        ("adapter", "queued", "training", True),
        ("adapter", "training", "queued", True),
        ("adapter", "trained", "evaluated", True),
        ("adapter", "evaluated", "failed", True),
        ("adapter", "rejected", "promoted", True),
        ("adapter", "promoted", "promoted", True),
        ("adapter", "queued", "queued", False),
        ("adapter", "trained", "training", False),
        ("adapter", "promoted", "rejected", False),
        ("adapter", "failed", "queued", True),  # `lorafleet retry`
        ("adapter", "failed", "training", False),
        ("adapter", "cancelled", "queued", True),  # `lorafleet retry NAME`
        ("adapter", "cancelled", "training", False),
        ("job", "cancelled", "running", True),
        ("adapter", "queued", "bogus", False),
        ("pack", "running", "succeeded", True),
        ("pack", "failed", "running", False),
    ],
)
def test_transition_table(kind: str, src: str, dst: str, ok: bool) -> None:
    if ok:
        check_transition(kind, src, dst)
    else:
        with pytest.raises(InvalidTransition) as err:
            check_transition(kind, src, dst, entity="x")
        refused = err.value
        assert (refused.kind, refused.from_state, refused.to_state, refused.entity) == (kind, src, dst, "x")


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (["trained", "promoted", "rejected", "evaluated"], "succeeded"),
        (["trained", "failed"], "partial"),
        (["failed", "failed"], "failed"),
        (["failed", "cancelled"], "failed"),
        (["trained", "failed", "cancelled"], "partial"),
        (["trained", "cancelled"], "cancelled"),
        (["cancelled"], "cancelled"),
        (["queued", "queued"], "pending"),
        (["queued", "trained"], "running"),
        ([], "succeeded"),
    ],
)
def test_job_state_from_adapters(states: list[str], expected: str) -> None:
    assert job_state_from_adapters(states) == expected


@given(st.lists(st.sampled_from(list(AdapterState)), max_size=8))
def test_job_state_is_finished_exactly_when_every_adapter_is(states: list[AdapterState]) -> None:
    finished = all(s in ADAPTER_FINISHED for s in states)
    assert (job_state_from_adapters(states) not in (JobState.PENDING, JobState.RUNNING)) == finished
