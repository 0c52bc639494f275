"""The controller's decisions as pure functions: what SQL and one tick's events say in, changes out.

Like Ray Train v2's failure policy, deciding is kept apart from doing: the controller gathers facts
(records from SQL, events drained from packs, which packs exited and why, what the cluster has), asks
these functions what should change, and applies the answer through one method. So every rule (which
adapters are ready, which fail and why, what a finished pack means for its members, when a job is
settled) is tested here without Ray, SQL or MLflow, including the cases that once hurt: a poison job,
a cancel while a refill is on offer, a controller restart.

The one rule behind the failure cases: a problem that belongs to one job fails that job's adapters
once, with the reason, and never stops the controller from serving the others.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.spec.states import (
    ADAPTER_ACTIVE,
    ADAPTER_AWAITING_GATE,
    ADAPTER_FINISHED,
    ADAPTER_TERMINAL,
    ADAPTER_TRAINED,
    AdapterState,
    JobState,
    adapter_state_after,
    job_state_from_adapters,
)
from orchestrator.store import UNSET, AdapterChange, AdapterRecord
from workers.contract.plan import (
    AdapterDone,
    CheckpointEvent,
    EvalEvent,
    Event,
    Outcome,
    StartEvent,
    StepEvent,
)
from workers.storage import FULL_ERRNOS, READ_ONLY_ERRNOS, describe_fault

_A = AdapterState


@dataclass(frozen=True)
class Capacity:
    """The most a single Ray node offers (a pack's workers each need one node's worth)."""

    cpus_per_node: float
    gpus_per_node: float
    nodes: int
    fixed: bool  # a local Ray never grows; a cluster may autoscale, so waiting can make sense there


@dataclass(frozen=True)
class Ask:
    """What a pack of one job asks of Ray."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float


# ---- readiness ----


def ready(
    queued: Sequence[AdapterRecord], parents: Mapping[str, AdapterRecord]
) -> tuple[list[AdapterRecord], list[AdapterChange]]:
    """Queued adapters that may be placed now, and the failures of children whose parent cannot train.

    A child waits until its parent finished training with a final checkpoint; if the parent failed or
    was cancelled, the child fails with that reason instead of waiting forever.
    """
    placeable, failed = [], []
    for adapter in queued:
        if adapter.parent_id is None:
            placeable.append(adapter)
            continue
        parent = parents[adapter.parent_id]
        if parent.state in ADAPTER_TRAINED and parent.final_checkpoint:
            placeable.append(adapter)
        elif parent.state in ADAPTER_TERMINAL:
            reason = f"parent {parent.qualified_name} is {parent.state}; nothing to branch from"
            failed.append(AdapterChange(adapter.id, _A.FAILED, error=reason, announce=True))
    return placeable, failed


def parent_waits(queued: Sequence[AdapterRecord], parents: Mapping[str, AdapterRecord]) -> dict[str, str]:
    """Why each child that `ready` holds back waits: its parent has not finished training yet."""
    reasons = {}
    for adapter in queued:
        parent = parents.get(adapter.parent_id) if adapter.parent_id else None
        if parent is None or parent.state in ADAPTER_TERMINAL:
            continue  # no parent, or one `ready` fails it with
        if not (parent.state in ADAPTER_TRAINED and parent.final_checkpoint):
            reasons[adapter.id] = f"waiting for its parent {parent.qualified_name} ({parent.state})"
    return reasons


def never_fits(
    adapters: Sequence[AdapterRecord], never: Iterable[tuple[str, str]], fixed: bool
) -> tuple[list[AdapterChange], dict[str, str]]:
    """Adapters no worker could hold even if idle (`scheduler.unplaceable`'s reasons). On a cluster that
    never grows (a local Ray) waiting cannot help: they fail now, with the numbers and the fix. On one
    that may autoscale they wait, saying why. Returns (failures, waiting reasons)."""
    by_id = {a.id: a for a in adapters}
    failures, reasons = [], {}
    for adapter_id, reason in never:
        if adapter_id not in by_id:
            continue
        if fixed:
            text = f"no worker can hold it: {reason}"
            failures.append(AdapterChange(adapter_id, _A.FAILED, error=text, announce=True))
        else:
            reasons[adapter_id] = f"waiting for a bigger worker (none can hold it now): {reason}"
    return failures, reasons


def waiting(queued: Iterable[AdapterRecord], reasons: Mapping[str, str]) -> list[AdapterChange]:
    """Record why queued adapters wait, writing only the reasons that changed (one row per change, not
    one per adapter per tick)."""
    return [
        AdapterChange(a.id, None, waiting=reasons[a.id])
        for a in queued
        if a.state == _A.QUEUED and a.id in reasons and a.waiting != reasons[a.id]
    ]


def infeasible(ask: Ask, capacity: Capacity) -> str | None:
    """Why a pack can never start on this cluster (None if it can, or might after autoscaling)."""
    if not capacity.fixed:
        return None
    if ask.cpus_per_worker > capacity.cpus_per_node:
        return (
            f"`resources.cpus_per_worker` {ask.cpus_per_worker:g} is more than a Ray node has "
            f"({capacity.cpus_per_node:g} CPUs); lower it"
        )
    if ask.gpus_per_worker > capacity.gpus_per_node:
        return (
            f"`resources.gpus_per_worker` {ask.gpus_per_worker:g} is more than a Ray node has "
            f"({capacity.gpus_per_node:g} GPUs); lower it or use a GPU cluster"
        )
    total_cpus = capacity.cpus_per_node * capacity.nodes
    if ask.workers * ask.cpus_per_worker > total_cpus:
        return (
            f"`resources.workers` {ask.workers} x `cpus_per_worker` {ask.cpus_per_worker:g} needs "
            f"{ask.workers * ask.cpus_per_worker:g} CPUs; the cluster has {total_cpus:g}"
        )
    return None


def fail_all(adapters: Iterable[AdapterRecord], reason: str) -> list[AdapterChange]:
    """A job-level problem (bad base model, impossible resources): its unfinished adapters fail, once."""
    return [
        AdapterChange(a.id, _A.FAILED, error=reason, announce=True)
        for a in adapters
        if a.state in ADAPTER_ACTIVE
    ]


# ---- events from packs ----


def on_event(adapter: AdapterRecord, event: Event, cancelling: bool = False) -> AdapterChange | None:
    """What one engine event changes on its adapter's row (step events: only the last of a batch).
    `cancelling`: the user cancelled the adapter and its pack has not confirmed yet (see `on_done`)."""
    if isinstance(event, StartEvent):
        state = _A.TRAINING if adapter.state == _A.QUEUED else None
        return AdapterChange(adapter.id, state, data_fingerprint=event.data_fingerprint)
    if isinstance(event, StepEvent):
        state = _A.TRAINING if adapter.state == _A.QUEUED else None
        return AdapterChange(
            adapter.id, state, step=event.step, metrics={"train_loss": (event.loss, event.step)}
        )
    if isinstance(event, EvalEvent):  # the losses, and every named metric (scores, base's, parent's)
        metrics = {name: (value, event.step) for name, value in event.metrics.items()}
        metrics |= {"eval_loss": (event.eval_loss, event.step), "perplexity": (event.perplexity, event.step)}
        return AdapterChange(adapter.id, None, eval_loss=event.eval_loss, metrics=metrics)
    if isinstance(event, CheckpointEvent):
        return AdapterChange(adapter.id, checkpoint=(event.step, str(event.path), event.final))
    if isinstance(event, AdapterDone):
        return on_done(adapter, event, cancelling)
    return None


def on_done(adapter: AdapterRecord, done: AdapterDone, cancelling: bool = False) -> AdapterChange | None:
    """An adapter left its pack: trained, failed (with the engine's reason), cancelled, or yielded (back
    to the queue, to resume from the checkpoint it wrote as it left). A yield that crossed the user's
    cancel (`cancelling`: asked, not yet confirmed by the pack) is a cancel: back in the queue, the
    adapter would train again although its job was cancelled."""
    if adapter.state in ADAPTER_FINISHED:
        return None  # already settled (e.g. cancelled by the user before the pack noticed)
    state = adapter_state_after(done.status, cancelling)
    if done.status == Outcome.YIELDED:  # announced if a cancel crossed it: the engine said `yielded`
        return AdapterChange(adapter.id, state, step=done.step, announce=state == _A.CANCELLED)
    metrics = {}
    if done.baseline_eval_loss is not None:  # the parent on this adapter's eval data, for the gate
        metrics["parent_eval_loss"] = (done.baseline_eval_loss, done.step)
    return AdapterChange(
        adapter.id,
        state,
        step=done.step,
        error=failure_reason(done.error) if done.error else None,
        final_checkpoint=UNSET if done.final_dir is None else str(done.final_dir),
        eval_loss=UNSET if done.eval_loss is None else done.eval_loss,
        metrics=metrics,
    )


def on_pack_exit(
    members: Mapping[str, AdapterRecord], withdrawn: Iterable[str], error: str | None
) -> list[AdapterChange]:
    """A pack's Ray Train run ended. Offers it never took go back to the queue; members it never
    reported done failed with the run's error (after Ray Train's own restarts were spent)."""
    withdrawn = set(withdrawn)
    changes = []
    for name, adapter in members.items():
        if adapter.state in ADAPTER_FINISHED:
            continue
        if name in withdrawn:
            changes.append(AdapterChange(adapter.id, _A.QUEUED))
        else:
            reason = error or "the pack ended without reporting this adapter"
            changes.append(AdapterChange(adapter.id, _A.FAILED, error=reason, announce=True))
    return changes


MAX_REASON_CHARS = 4000
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]*)')?(?: -> '([^'\n]*)')?")
_EXCEPTION_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure)\b.*:.*\S")


def failure_reason(text: str) -> str:
    """A failure's text as an operator needs it: the root cause first, in one line, then the details.

    A pack's error is a traceback (Ray's `ActorDiedError` or `TrainingFailedError` wrapping the
    worker's), in terminal colours, whose cause is its last line; cut at a length limit, the cause was
    the part lost. So colour codes go, a storage refusal (full, read-only) becomes `describe_fault`'s
    line, else the last exception line leads, and only the details after it are cut."""
    clean = _ANSI.sub("", text).strip()
    lines = [line.strip() for line in clean.splitlines() if line.strip()]
    head = lines[0] if lines else "failed without a reason"
    storage_faults = [m for m in _ERRNO.finditer(clean) if int(m.group(1)) in FULL_ERRNOS | READ_ONLY_ERRNOS]
    if storage_faults:
        number, strerror, source, dest = storage_faults[-1].groups()
        head = describe_fault(OSError(int(number), strerror.strip(), source, None, dest))
    else:
        causes = [line for line in lines if _EXCEPTION_LINE.match(line)]
        head = causes[-1] if causes else head
    head = " ".join(head.split())
    return head if clean in ("", head) else f"{head}\n{clean}"[:MAX_REASON_CHARS]


def stored_checkpoints(
    adapter: AdapterRecord, known_steps: Iterable[int], on_storage: Iterable[tuple[int, str]]
) -> list[AdapterChange]:
    """The complete checkpoints storage holds that SQL never heard of (the pack died before their
    events reached the controller): recorded, so SQL's newest is storage's newest, the one a retry
    resumes from."""
    known = set(known_steps)
    return [
        AdapterChange(adapter.id, checkpoint=(step, path, False))
        for step, path in on_storage
        if step not in known
    ]


def retry(adapters: Iterable[AdapterRecord]) -> list[AdapterChange]:
    """A person's retry of a job, once the cause is fixed (storage freed, remounted): its failed
    adapters go back to the queue, their error cleared. Each resumes from the newest complete checkpoint
    in its output directory (the engine looks there first), so no finished step is trained twice."""
    return [AdapterChange(a.id, _A.QUEUED, error=None) for a in adapters if a.state == _A.FAILED]


def evaluated(trained: Iterable[AdapterRecord]) -> list[AdapterChange]:
    """Trained adapters are `evaluated` at once: their final eval ran in the pack (on their own eval
    data, and the parent's on the same data), so the registry may judge them; it does not wait for the
    MLflow mirror, which may be down."""
    return [AdapterChange(a.id, _A.EVALUATED) for a in trained if a.state == _A.TRAINED]


# ---- the user, and restarts ----


def cancel(
    adapters: Iterable[AdapterRecord], in_pack: Mapping[str, str]
) -> tuple[list[AdapterChange], list[str]]:
    """Cancel a job: queued adapters (and those only offered to a pack) now; adapters training in a
    pack leave it between two steps. Returns the changes and the ids to ask their packs to drop."""
    now, in_flight = [], []
    for adapter in adapters:
        if adapter.state == _A.QUEUED:
            now.append(AdapterChange(adapter.id, _A.CANCELLED, announce=True))
        elif adapter.state == _A.TRAINING:
            if adapter.id in in_pack:
                in_flight.append(adapter.id)
            else:  # no pack holds it (it was between packs): nothing to wait for
                now.append(AdapterChange(adapter.id, _A.CANCELLED, announce=True))
    return now, in_flight


def reconcile(training: Iterable[AdapterRecord], held: Iterable[str]) -> list[AdapterChange]:
    """After a controller (re)start: adapters SQL says are training but no live pack holds go back to
    the queue; they resume from their last checkpoints."""
    held = set(held)
    return [AdapterChange(a.id, _A.QUEUED) for a in training if a.id not in held]


# ---- jobs ----


def job_outcome(states: Iterable[AdapterState], auto_promote: bool) -> JobState | None:
    """The state a job should show now, or None to leave it.

    A job is done only once every adapter settled: trained adapters of a job with auto-promotion must
    first be promoted or rejected, so a user who sees `succeeded` also sees the registry's answer.
    """
    waiting = ADAPTER_ACTIVE | ADAPTER_AWAITING_GATE if auto_promote else ADAPTER_ACTIVE | {_A.TRAINED}
    found = {AdapterState(s) for s in states}
    if found & waiting:
        return JobState.PENDING if found == {_A.QUEUED} else JobState.RUNNING
    return job_state_from_adapters(found)


# ---- one adapter, by name: retry, delete, branch ----


def branch_refusal(parent: AdapterRecord) -> str | None:
    """Why nothing may branch from `parent` now, or None. A failed or cancelled parent can never give
    weights (until a person retries it), so a child of it is refused at submit with the fix, rather
    than accepted to fail later and burn a second name. A parent still queued or training is fine: the
    child waits for it."""
    if parent.state in ADAPTER_TERMINAL:
        return (
            f"parent {parent.qualified_name!r} is {parent.state}: it has no weights to branch from; "
            f"retry it first (`lorafleet retry {parent.name} --project {parent.project}`) "
            "or branch from another adapter"
        )
    return None


def retry_refusal(adapter: AdapterRecord, parent: AdapterRecord | None) -> str | None:
    """Why `adapter` cannot be retried, or None. Only a failed or cancelled adapter trains again (a
    trained one is done; a queued or training one is already on its way); a child of a parent that
    cannot give weights would only fail again at once, so the parent comes first."""
    if adapter.state not in ADAPTER_TERMINAL:
        return (
            f"adapter {adapter.qualified_name} is {adapter.state}: only a failed or cancelled adapter "
            "is retried"
        )
    if parent is not None and parent.state in ADAPTER_TERMINAL:
        return (
            f"adapter {adapter.qualified_name}'s parent {parent.qualified_name} is {parent.state}: "
            f"retry the parent first (`lorafleet retry {parent.name} --project {parent.project}`)"
        )
    return None


def fresh_start(recorded_fingerprint: str | None, current_fingerprint: str) -> bool:
    """Whether a retried adapter starts again from step 0 instead of resuming its newest checkpoint.

    It does when its data changed since its last attempt began (the fingerprint covers the data files'
    bytes and the settings that choose rows): the person fixed the data and expects the fixed file to be
    what the adapter learns from. Resuming would mix the two: the weights, optimizer moments and the
    position in the sample order all come from the old data, and the resumed steps would index rows of
    a file they were never drawn from. An attempt that never began (it failed loading its data, before
    any checkpoint) recorded no fingerprint: nothing to resume, so nothing to throw away either."""
    return recorded_fingerprint is not None and recorded_fingerprint != current_fingerprint


def delete_refusal(adapter: AdapterRecord, children: Sequence[str]) -> str | None:
    """Why `adapter` cannot be deleted, or None. A promoted adapter is what a registry alias served
    (a model version points at its files); a parent's weights are its children's starting point and
    lineage; a queued or training one is in a pack's hands (cancel it first). Anything else (failed,
    cancelled, trained, evaluated, rejected) may go, freeing its name."""
    who = f"adapter {adapter.qualified_name}"
    if adapter.state == _A.PROMOTED:
        return f"{who} is promoted: the model registry serves its weights; it cannot be deleted"
    if adapter.state in ADAPTER_ACTIVE:
        return f"{who} is {adapter.state}: cancel its job first (`lorafleet cancel {adapter.job_id}`)"
    if children:
        shown = ", ".join(children[:5]) + (f" and {len(children) - 5} more" if len(children) > 5 else "")
        return f"{who} has children ({shown}): delete them first, or keep it as their parent"
    return None
