"""The controller's decisions, without Ray, SQL or MLflow: records and events in, changes out."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from orchestrator.control import decisions
from orchestrator.control.decisions import AdapterChange, Ask, Capacity
from orchestrator.spec.states import AdapterState, JobState
from orchestrator.store import AdapterRecord
from workers.contract.plan import (
    AdapterDone,
    CheckpointEvent,
    DataConfig,
    EvalEvent,
    EvalSample,
    LoraConfig,
    StartEvent,
    StepEvent,
    TrainConfig,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
A = AdapterState


def adapter(id: str, state: str = "queued", **fields) -> AdapterRecord:
    values = {
        "id": id,
        "project": "p",
        "name": id,
        "job_id": "job",
        "state": state,
        "priority": 0,
        "seq": 1,
        "base_model": "/models/base",
        "quantization": "none",
        "dtype": "float32",
        "lora": LoraConfig(),
        "train": TrainConfig(),
        "data": DataConfig(path=Path("/data/a.jsonl")),
        "parent_id": None,
        "root_id": id,
        "depth": 0,
        "parent_checkpoint": None,
        "data_fingerprint": None,
        "config_hash": "h",
        "output_dir": None,
        "final_checkpoint": None,
        "step": 0,
        "eval_loss": None,
        "error": None,
        "mlflow_run_id": None,
        "created_at": NOW,
        "updated_at": NOW,
        "started_at": None,
        "finished_at": None,
    }
    return AdapterRecord(**(values | fields))


def test_a_child_waits_for_its_parent_and_fails_with_it() -> None:
    training = adapter("parent", "training")
    trained = adapter("parent2", "evaluated", final_checkpoint="/ckpt")
    failed = adapter("parent3", "failed")
    kids = [
        adapter("root"),
        adapter("waits", parent_id="parent"),
        adapter("goes", parent_id="parent2"),
        adapter("orphan", parent_id="parent3"),
    ]
    parents = {p.id: p for p in (training, trained, failed)}
    ready, failures = decisions.ready(kids, parents)
    assert [a.id for a in ready] == ["root", "goes"]
    assert [(c.adapter_id, c.state) for c in failures] == [("orphan", A.FAILED)]
    assert "p/parent3 is failed" in failures[0].fields["error"]


def test_a_poison_job_fails_once_with_its_reason_and_only_its_unfinished_adapters() -> None:
    job = [adapter("a"), adapter("b", "training"), adapter("c", "evaluated"), adapter("d", "cancelled")]
    changes = decisions.fail_all(job, "`base_model` 'x/y' cannot be loaded: not found")
    assert [(c.adapter_id, c.state) for c in changes] == [("a", A.FAILED), ("b", A.FAILED)]
    assert all("base_model" in c.fields["error"] for c in changes)
    # once failed, the same rule has nothing more to do: no retry loop
    again = [adapter("a", "failed"), adapter("b", "failed"), job[2], job[3]]
    assert decisions.fail_all(again, "same") == []


def test_resources_a_local_cluster_can_never_give_are_refused_but_a_cluster_may_autoscale() -> None:
    local = Capacity(cpus_per_node=2, gpus_per_node=0, nodes=1, fixed=True)
    assert decisions.infeasible(Ask(1, 1, 0), local) is None
    assert "`resources.workers` 3" in decisions.infeasible(Ask(3, 1, 0), local)
    assert "cpus_per_worker" in decisions.infeasible(Ask(1, 64, 0), local)
    assert "gpus_per_worker" in decisions.infeasible(Ask(1, 1, 1), local)
    assert decisions.infeasible(Ask(3, 64, 1), Capacity(2, 0, 1, fixed=False)) is None


def test_events_become_row_changes() -> None:
    queued = adapter("a")
    start = decisions.on_event(
        queued,
        StartEvent(pack_id="k", adapter="a", step=0, data_fingerprint="f", train_examples=1, eval_examples=0),
    )
    assert start == AdapterChange("a", A.TRAINING, data_fingerprint="f")
    step = decisions.on_event(
        adapter("a", "training"),
        StepEvent(pack_id="k", adapter="a", step=3, loss=1.5, lr=0.1, grad_norm=1, tokens=9, tokens_per_s=1),
    )
    assert step.state is None and step.fields == {"step": 3} and step.metrics == {"train_loss": (1.5, 3)}
    ckpt = decisions.on_event(
        adapter("a", "training"), CheckpointEvent(pack_id="k", adapter="a", step=3, path=Path("/c/3"))
    )
    assert ckpt.checkpoint == (3, "/c/3", False)


def test_a_final_eval_records_every_named_metric_at_its_step() -> None:
    final = EvalEvent(
        pack_id="k",
        adapter="a",
        step=40,
        eval_loss=0.5,
        perplexity=1.65,
        eval_tokens=100,
        final=True,
        metrics={"eval_token_accuracy": 0.8, "eval_exact_match": 0.92, "base_eval_exact_match": 0.05},
        samples=[EvalSample(prompt="2+2?", reference="4", output="4", scores={"eval_exact_match": 1.0})],
    )
    change = decisions.on_event(adapter("a", "training"), final)
    assert change.fields == {"eval_loss": 0.5}
    assert change.metrics == {
        "eval_loss": (0.5, 40),
        "perplexity": (1.65, 40),
        "eval_token_accuracy": (0.8, 40),
        "eval_exact_match": (0.92, 40),
        "base_eval_exact_match": (0.05, 40),
    }


def test_done_trains_fails_or_cancels_and_a_settled_adapter_is_left_alone() -> None:
    def done(status: str, **kw) -> AdapterDone:
        return AdapterDone(pack_id="k", adapter="a", step=5, status=status, **kw)

    trained = decisions.on_done(
        adapter("a", "training"), done("trained", final_dir=Path("/f"), eval_loss=0.5, baseline_eval_loss=0.7)
    )
    assert trained.state == A.TRAINED and trained.fields["final_checkpoint"] == "/f"
    assert trained.metrics == {"parent_eval_loss": (0.7, 5)}
    failed = decisions.on_done(adapter("a", "training"), done("failed", error="line 9: bad JSON"))
    assert failed.state == A.FAILED and failed.fields["error"] == "line 9: bad JSON"
    # the user cancelled it while the pack was finishing: the cancel stands
    assert decisions.on_done(adapter("a", "cancelled"), done("trained")) is None
    assert decisions.evaluated([adapter("a", "trained"), adapter("b", "failed")]) == [
        AdapterChange("a", A.EVALUATED)
    ]


def test_a_pack_that_exits_requeues_untaken_offers_and_fails_silent_members() -> None:
    members = {
        "done": adapter("done", "evaluated"),
        "offered": adapter("offered", "training"),
        "lost": adapter("lost", "training"),
    }
    changes = decisions.on_pack_exit(members, withdrawn=["offered"], error="RayTaskError: OOM")
    assert [(c.adapter_id, c.state) for c in changes] == [("offered", A.QUEUED), ("lost", A.FAILED)]
    assert changes[1].fields["error"] == "RayTaskError: OOM"


def test_cancel_during_refill_cancels_queued_now_and_asks_packs_for_the_rest() -> None:
    job = [
        adapter("q"),
        adapter("in-pack", "training"),
        adapter("between", "training"),
        adapter("x", "evaluated"),
    ]
    now, in_flight = decisions.cancel(job, in_pack={"in-pack": "pack1"})
    assert [(c.adapter_id, c.state) for c in now] == [("q", A.CANCELLED), ("between", A.CANCELLED)]
    assert in_flight == ["in-pack"]


def test_controller_restart_requeues_what_no_live_pack_holds() -> None:
    training = [adapter("a", "training"), adapter("b", "training")]
    assert decisions.reconcile(training, held=["b"]) == [AdapterChange("a", A.QUEUED)]
    assert decisions.reconcile(training, held=[]) == [
        AdapterChange("a", A.QUEUED),
        AdapterChange("b", A.QUEUED),
    ]


def test_a_job_settles_only_when_its_adapters_have() -> None:
    assert decisions.job_outcome(["queued", "queued"], False) == JobState.PENDING
    assert decisions.job_outcome(["training", "queued"], False) == JobState.RUNNING
    assert decisions.job_outcome(["trained", "evaluated"], False) == JobState.RUNNING  # not yet evaluated
    assert decisions.job_outcome(["evaluated", "evaluated"], False) == JobState.SUCCEEDED
    assert decisions.job_outcome(["evaluated", "promoted"], True) == JobState.RUNNING  # gate still to run
    assert decisions.job_outcome(["rejected", "promoted"], True) == JobState.SUCCEEDED
    assert decisions.job_outcome(["failed", "evaluated"], False) == JobState.PARTIAL
    assert decisions.job_outcome(["failed", "cancelled"], False) == JobState.FAILED


def test_a_yielded_adapter_goes_back_to_the_queue_at_its_step() -> None:
    done = AdapterDone(pack_id="k", adapter="a", step=7, status="yielded")
    assert decisions.on_done(adapter("a", "training"), done) == AdapterChange("a", A.QUEUED, step=7)
    assert decisions.on_done(adapter("a", "cancelled"), done) is None  # the user's cancel stands
    # a yield that crossed the user's cancel (asked of the pack, not confirmed yet) is a cancel
    crossed = decisions.on_event(adapter("a", "training"), done, cancelling=True)
    assert crossed == AdapterChange("a", A.CANCELLED, step=7, announce=True)


def test_every_queued_adapter_says_why_it_waits_and_only_changes_are_written() -> None:
    parent = adapter("parent", "training")
    kids = [adapter("kid", parent_id="parent"), adapter("free")]
    assert decisions.parent_waits(kids, {"parent": parent}) == {
        "kid": "waiting for its parent p/parent (training)"
    }
    done = adapter("parent", "evaluated", final_checkpoint="/ckpt")
    assert decisions.parent_waits(kids, {"parent": done}) == {}
    reasons = {"kid": "waiting for its parent p/parent (training)", "free": "waiting for a free worker"}
    queued = [adapter("kid", waiting=reasons["kid"]), adapter("free"), adapter("gone", "training")]
    changes = decisions.waiting([*queued], reasons | {"gone": "x"})
    assert changes == [AdapterChange("free", None, waiting="waiting for a free worker")]


def test_an_adapter_no_worker_can_hold_fails_on_a_fixed_cluster_and_waits_on_a_growing_one() -> None:
    adapters = [adapter("big"), adapter("small")]
    never = [("big", "needs 9.00 GiB on one worker (...), but the largest worker has 4.00 GiB; lower ...")]
    failures, reasons = decisions.never_fits(adapters, never, fixed=True)
    assert [(c.adapter_id, c.state, c.announce) for c in failures] == [("big", A.FAILED, True)]
    assert failures[0].fields["error"].startswith("no worker can hold it: needs 9.00 GiB") and reasons == {}
    failures, reasons = decisions.never_fits(adapters, never, fixed=False)
    assert failures == [] and reasons["big"].startswith("waiting for a bigger worker")
    assert "largest worker has 4.00 GiB" in reasons["big"]


def test_a_pack_failure_leads_with_its_root_cause_in_one_line_without_colour_codes() -> None:
    """Before: the reason was Ray's `ActorDiedError` text in terminal colours, cut at 4000 characters,
    so the cause at the end of the worker's traceback (`ENOSPC`) was lost."""
    traceback = "\n".join(f'  File "/x/trainer.py", line {i}, in step' for i in range(300))
    died = (
        "ActorDiedError: \x1b[36mray::RayTrainWorker\x1b[39m The actor died because of an error raised.\n"
        f"Traceback (most recent call last):\n{traceback}\n"
        "\x1b[31mOSError: [Errno 28] No space left on device: "
        "'/s/a/.ckpt-tmp/adapter_model.safetensors'\x1b[0m"
    )
    reason = decisions.failure_reason(died)
    first = reason.splitlines()[0]
    assert first == (
        "storage is full (ENOSPC: No space left on device) at /s/a/.ckpt-tmp/adapter_model.safetensors: "
        "free space or grow the volume, then retry"
    )
    assert "\x1b" not in reason and len(reason) <= decisions.MAX_REASON_CHARS
    read_only = decisions.failure_reason("OSError: [Errno 30] Read-only file system: '/s/a'")
    assert read_only.startswith("storage is read-only (EROFS) at /s/a: remount it read-write")
    nested = "TrainingFailedError: training failed\nTraceback:\n  ...\nValueError: bad targets `q_projx`"
    assert decisions.failure_reason(nested).splitlines()[0] == "ValueError: bad targets `q_projx`"
    assert decisions.failure_reason("loss diverged") == "loss diverged"


def test_checkpoints_storage_holds_but_sql_missed_are_recorded() -> None:
    a = adapter("a", "failed")
    stored = [(2, "/s/a/checkpoint-00000002"), (4, "/s/a/checkpoint-00000004")]
    changes = decisions.stored_checkpoints(a, known_steps=[2], on_storage=stored)
    assert changes == [AdapterChange("a", checkpoint=(4, "/s/a/checkpoint-00000004", False))]
    assert decisions.stored_checkpoints(a, known_steps=[2, 4], on_storage=stored) == []


def test_retry_requeues_only_failed_adapters_and_clears_their_error() -> None:
    failed = adapter("f", "failed", error="storage is full (ENOSPC)")
    changes = decisions.retry([failed, adapter("t", "trained"), adapter("c", "cancelled")])
    assert changes == [AdapterChange("f", AdapterState.QUEUED, error=None)]


def test_only_a_parent_that_can_still_give_weights_is_branched_from() -> None:
    assert decisions.branch_refusal(adapter("p", "training")) is None  # the child waits for it
    assert decisions.branch_refusal(adapter("p", "rejected", final_checkpoint="/ck")) is None
    for state in ("failed", "cancelled"):
        refusal = decisions.branch_refusal(adapter("p", state))
        assert refusal is not None and f"is {state}" in refusal and "lorafleet retry p --project p" in refusal


def test_a_retry_takes_a_failed_or_cancelled_adapter_whose_parent_can_give_weights() -> None:
    assert decisions.retry_refusal(adapter("a", "failed"), None) is None
    assert decisions.retry_refusal(adapter("a", "cancelled"), adapter("p", "queued")) is None
    for state in ("queued", "training", "trained", "promoted"):
        assert "only a failed or cancelled" in str(decisions.retry_refusal(adapter("a", state), None))
    orphan = decisions.retry_refusal(adapter("a", "failed", parent_id="p"), adapter("p", "cancelled"))
    assert orphan is not None and "retry the parent first" in orphan


def test_a_retry_starts_over_only_when_the_data_changed_since_the_attempt_began() -> None:
    assert decisions.fresh_start("abc", "abc") is False  # same data: resume the newest checkpoint
    assert decisions.fresh_start("abc", "def") is True  # fixed data: old checkpoints would mix them
    assert decisions.fresh_start(None, "def") is False  # never began: nothing to resume or drop


def test_delete_refuses_a_promoted_an_active_or_a_parent_adapter_with_the_reason() -> None:
    for state in ("failed", "cancelled", "trained", "evaluated", "rejected"):
        assert decisions.delete_refusal(adapter("a", state), []) is None
    assert "registry" in str(decisions.delete_refusal(adapter("a", "promoted"), []))
    assert "lorafleet cancel job" in str(decisions.delete_refusal(adapter("a", "training"), []))
    kids = [f"p/k{i}" for i in range(7)]
    assert "(p/k0, p/k1, p/k2, p/k3, p/k4 and 2 more)" in str(
        decisions.delete_refusal(adapter("a", "trained"), kids)
    )
