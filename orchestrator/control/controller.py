"""The controller: makes what runs on Ray match what SQL says should run, one tick at a time.

SQL is the source of truth; the controller holds only what it can rebuild (running Ray task handles). Each
tick it (1) drains progress events from running packs into SQL in one batch, (2) reaps finished Ray Train
runs, (3) asks the pure scheduler where queued adapters go, and launches new packs or offers refills to
running ones. What it took from Ray but could not write (the database was down) it keeps, in order, and
writes first on a later tick: drained events, and the exits of packs reaped meanwhile. On start it
reconciles: whatever SQL says was running belonged to a dead controller, so those adapters go back to the
queue and resume from their last checkpoints.

What should change is decided by `orchestrator.control.decisions` (pure); this class gathers the facts, does
the Ray side, and writes every adapter change through `_apply`. A failure that belongs to one job (a base
model that does not load, resources the cluster can never give, a placement that cannot launch) fails
that job's adapters once with the reason; the tick goes on for everyone else.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import ray

from orchestrator.control import decisions
from orchestrator.control.decisions import AdapterChange
from orchestrator.control.packrun import EVENTS, EventLog, RayPacks
from orchestrator.control.runtime import ClusterView, FitOptions, PackRuntime
from orchestrator.scheduling import scheduler as sched
from orchestrator.settings import Settings
from orchestrator.spec.job import JobSpec
from orchestrator.spec.states import AdapterState, JobKind, JobState, PackState
from orchestrator.store import AdapterRecord, Conflict, DatabaseUnavailable, NewEvent, Store
from workers import storage
from workers.bases.catalog import base_config
from workers.contract import memory
from workers.contract.plan import (
    AdapterDone,
    AdapterTask,
    Event,
    Outcome,
    PackPlan,
    StartEvent,
    StepEvent,
)
from workers.training import checkpoint as ckpt

log = logging.getLogger(__name__)

DEFAULT_GPU_BUDGET_GB = 16.0
WRITE_BATCH = 5000  # events recorded per batch: a tick of 1,000 adapters' steps in one
YIELD_ASK_SECONDS = 300.0  # an adapter asked to yield leaves within a step; one that has not is asked again


@dataclass(frozen=True)
class PackShape:
    """Ray resources of a pack; adapters share a pack only if their jobs ask for the same shape."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    memory_gb: float | None
    max_adapters: int
    activation_checkpointing: str = "auto"
    max_tokens_per_pass: int | None = None

    @classmethod
    def of(cls, spec: JobSpec) -> PackShape:
        r = spec.resources
        return cls(
            workers=r.workers,
            cpus_per_worker=r.cpus_per_worker,
            gpus_per_worker=r.gpus_per_worker,
            max_failures=r.max_failures,
            memory_gb=r.memory_gb_per_worker,
            max_adapters=r.max_adapters_per_worker,
            activation_checkpointing=r.activation_checkpointing,
            max_tokens_per_pass=r.max_tokens_per_pass,
        )

    def record(self) -> dict[str, Any]:
        """What the pack's row keeps of its shape (`PackRecord.resources`): every field, by name."""
        return asdict(self)

    def fit_options(self, storage_path: str) -> FitOptions:
        """How Ray runs a pack of this shape: its workers and what each asks of a node; torch in each
        worker uses as many threads as it has CPUs."""
        return FitOptions(
            workers=self.workers,
            cpus_per_worker=self.cpus_per_worker,
            gpus_per_worker=self.gpus_per_worker,
            max_failures=self.max_failures,
            storage_path=storage_path,
            num_threads=max(1, int(self.cpus_per_worker)),
        )


@dataclass
class RunningPack:
    pack_id: str
    base: sched.BaseKey
    shape: PackShape
    ref: Any
    base_bytes: int
    members: dict[str, str] = field(default_factory=dict)  # adapter name in the pack -> adapter id
    member_bytes: dict[str, int] = field(default_factory=dict)  # adapter name -> its memory estimate
    owners: dict[str, AdapterRecord] = field(default_factory=dict)  # adapter name -> its row when it joined
    began: dict[str, float] = field(default_factory=dict)  # adapter name -> when it started (monotonic)

    def leave(self, name: str) -> None:
        for held in (self.members, self.member_bytes, self.owners, self.began):
            held.pop(name, None)

    @property
    def used_bytes(self) -> int:
        return self.base_bytes + sum(self.member_bytes.values())


@dataclass(frozen=True)
class ExitedPack:
    """What Ray said when a pack ended (taken once: the task's result and the offers it never took),
    kept until SQL has recorded it, so an outage at a pack's end cannot leave its adapters `training`."""

    pack_id: str
    members: dict[str, str]  # adapter name -> id, of those still in the pack at its end
    withdrawn: list[str]
    error: str | None


def _done_event(adapter: AdapterRecord) -> NewEvent:
    """The `done` event of an adapter the controller settled (failed before or outside its pack, or
    cancelled while queued): the event log, its watchers and the MLflow mirror learn it like any other,
    in the engine's words (the controller settles an adapter only as failed or cancelled)."""
    status = {AdapterState.FAILED: Outcome.FAILED, AdapterState.CANCELLED: Outcome.CANCELLED}[adapter.state]
    done = AdapterDone(
        pack_id="", adapter=adapter.name, step=adapter.step, status=status, error=adapter.error
    )
    return NewEvent(adapter.job_id, "done", adapter.id, adapter.step, done.model_dump(mode="json"))


def remove_output(adapter: AdapterRecord) -> None:
    """Remove the adapter's output directory (checkpoints, final weights), or raise: files left behind
    would be resumed by what trains next in that directory (the adapter restarted on fixed data, or
    the next adapter of a freed name). Storage that refuses writes raises its `OSError` (the API says
    503/507 with the cause); any other refusal is a `Conflict` naming the cause and the directory."""
    location = adapter.output_dir
    if not location:
        return
    try:
        if storage.is_remote(location):
            storage.remove(location)
        else:
            shutil.rmtree(location)
    except FileNotFoundError:
        return
    except OSError as exc:
        if storage.storage_fault(exc) is not None:
            raise
        raise Conflict(
            f"the files of adapter {adapter.qualified_name} under {location} cannot be removed "
            f"({exc.strerror or exc}); nothing else was changed: fix that, then ask again"
        ) from exc


def connect_ray(settings: Settings) -> None:
    """Join `LORAFLEET_RAY_ADDRESS`'s cluster, or start a local Ray (once per process).

    A server calls this before its HTTP loop starts: `ray.init` installs a SIGTERM handler of its own,
    which must come first so the server's graceful-shutdown handler replaces it, not the other way round.
    """
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace="lorafleet", log_to_driver=False)
    else:
        ray.init(
            num_cpus=settings.ray_num_cpus or os.cpu_count(),
            include_dashboard=False,
            namespace="lorafleet",
            log_to_driver=False,
        )


def ray_session_dir() -> str | None:
    """The session directory of the Ray this process started or joined (None if none)."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


class Controller:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        on_events: Callable[[list[Event]], None] | None = None,
        packs: PackRuntime | None = None,
    ):
        self.settings = settings
        self.store = store
        self.on_events = on_events
        # Ray Train by default; `simulated.SimulatedPacks` drives the control plane without training
        self.packs: PackRuntime = packs or RayPacks(
            lambda: connect_ray(settings), fixed=settings.ray_address is None
        )
        self.running: dict[str, RunningPack] = {}
        self._specs: dict[str, JobSpec] = {}
        # a base's shape, or why its config cannot load; filled outside the lock (`_prepare`)
        self._infos: dict[sched.BaseKey, memory.BaseModelInfo | Exception] = {}
        self._cluster: ClusterView | None = None  # read once per tick (`_prepare`)
        self._queued: dict[str, AdapterRecord] = {}  # queued adapters as last read (`_queued_adapters`)
        self._judged: dict[tuple[str, PackShape, int], str | None] = {}  # `_never_fits`' verdicts
        self._demands: dict[str, tuple[AdapterRecord, sched.AdapterDemand]] = {}  # `_demand`'s, by record
        # adapters asked to yield that have not left their pack yet -> when they were asked (monotonic)
        self._yielding: dict[str, float] = {}
        self._cancelling: set[str] = set()  # adapters whose cancel their pack has not confirmed yet
        # drained from Ray, not yet in SQL, oldest first, each with its adapter's record from when it joined
        self._unwritten: list[tuple[Event, AdapterRecord]] = []
        self._exited: dict[str, ExitedPack] = {}  # reaped on Ray, not yet settled in SQL
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        # Worker slots training sessions' Ray hosts hold (`service.session_hosts`; set by the service):
        # packs start only on the slots left, so packs and hosts never overcommit the same GPU.
        self.session_hosts: Callable[[], int] = lambda: 0

    def on_ray(self) -> bool:
        """Whether packs run on Ray here (Ray Train, started): session hosts then run there too."""
        return isinstance(self.packs, RayPacks) and self._thread is not None and ray.is_initialized()

    # ---- lifecycle ----

    def start(self) -> None:
        """Connect to Ray, reconcile with SQL, and tick in a background thread."""
        if self._thread is not None:
            return
        self._ensure_ray()
        self.reconcile()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lorafleet-controller", daemon=True)
        self._thread.start()

    def stop(self, abandon_running: bool = False) -> None:
        """Stop ticking. `abandon_running` kills packs without recording anything, as a crash would."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if abandon_running:
            for pack in self.running.values():
                self.packs.kill(pack.ref)
            self.running.clear()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.tick_seconds):
            try:
                self.tick()
            except DatabaseUnavailable as exc:  # an outage: what was taken from Ray waits for the next tick
                log.warning("controller tick waits for the database (%s)", exc)
            except Exception:  # a bad tick must not kill the controller; the next one retries
                log.exception("controller tick failed")

    def _ensure_ray(self) -> None:
        self.packs.connect()

    def reconcile(self) -> None:
        """Adopt SQL's view after a restart: packs SQL thinks run belonged to a dead controller."""
        with self._lock:
            for pack in self.store.list_packs(states=[PackState.RUNNING]):
                if pack.id not in self.running:
                    self._replay(pack.id)
                    self.store.finish_pack(pack.id, PackState.FAILED, error="controller restarted")
            held = [a for p in self.running.values() for a in p.members.values()]
            training = self.store.list_adapters(states=[AdapterState.TRAINING])
            self._apply(decisions.reconcile(training, held))

    # ---- one tick ----

    def tick(self) -> None:
        """Take everything Ray has to say first (it is said once), then write it: a database outage
        mid-tick leaves it in `_unwritten` and `_exited`, written first, in order, on a later tick.

        The slow facts (a new base model's config, what the cluster offers) are gathered before the lock
        is taken, so a `cancel` or `retry` never waits on them."""
        self._prepare()
        with self._lock:
            self._ensure_ray()
            refs = [p.ref for p in self.running.values()]
            done_refs = self.packs.ended(refs)
            self._take_events(self._drain())
            for pack in [p for p in self.running.values() if p.ref in done_refs]:
                self._exited[pack.pack_id] = self._reap(pack)
            self._write_unwritten()
            for exited in list(self._exited.values()):
                self._settle_exit(exited)
                del self._exited[exited.pack_id]
            self._schedule()
            self._apply(decisions.evaluated(self.store.list_adapters(states=[AdapterState.TRAINED])))
            self._settle_jobs()

    def _apply(self, changes: list[AdapterChange]) -> None:
        """The one place the controller changes adapters, in one transaction per call. A change the
        lifecycle no longer allows (the adapter moved on meanwhile, e.g. a cancel raced a finish) is
        moot, not an error (`Store.apply_changes` skips it)."""
        announced = self.store.apply_changes(changes)
        if announced:
            self.store.record_events([_done_event(record) for record in announced])

    def _prepare(self) -> None:
        """Outside the lock: what the cluster offers now, and the config of every base model a queued
        adapter names that this controller has not loaded yet (`AutoConfig.from_pretrained` may read
        the hub or convert a GGUF header: seconds that would otherwise block a cancel)."""
        self._ensure_ray()
        self._cluster = self.packs.cluster()
        try:
            bases = self.store.queued_bases()
        except DatabaseUnavailable:
            return  # the tick takes what Ray says and keeps it until the database answers
        for base in bases:
            key = sched.BaseKey(*base)
            if key not in self._infos:
                self._infos[key] = self._load_info(key)

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        for batch in self.packs.drain():
            try:
                events += EVENTS.validate_json(batch)
            except ValueError:  # a worker of another version: drop its batch, keep the tick
                log.exception("dropped a batch of events the controller cannot read")
        return events

    def _take_events(self, events: list[Event]) -> None:
        """Events from running packs: queued (with their adapter, resolved now, as a `done` frees its
        slot) for `_write_unwritten`, which records them and folds them into their adapters' rows."""
        placed = []
        for event in events:
            pack = self.running.get(event.pack_id)
            adapter_id = pack.members.get(event.adapter) if pack else None
            if pack is not None and adapter_id is not None:
                placed.append((event, pack.owners[event.adapter]))
                if isinstance(event, StartEvent):  # its time slice counts from here, not from the offer
                    pack.began[event.adapter] = time.monotonic()
                if isinstance(event, AdapterDone):  # its slot and memory are free for a refill
                    pack.leave(event.adapter)
                    self._yielding.pop(adapter_id, None)
        self._unwritten += placed
        if self.on_events is not None and events:
            self.on_events(events)

    def _write_unwritten(self) -> None:
        """Write what was taken from Ray and not yet written, oldest first, each batch forgotten only once
        written: a batch that fails (the database is down) is retried whole on the next tick, and the
        events' ids keep a batch written twice (half written before the failure) recorded once."""
        while self._unwritten:
            batch = self._unwritten[:WRITE_BATCH]
            self._record(batch)
            del self._unwritten[: len(batch)]
            # a cancel is confirmed once the adapter's `done` is recorded (a yield crossing it then
            # ended the adapter as cancelled, see `decisions.on_event`)
            self._cancelling.difference_update(a.id for e, a in batch if isinstance(e, AdapterDone))

    def _record(self, placed: list[tuple[Event, AdapterRecord]]) -> None:
        """Record events (each engine event once, by its id) and apply the new ones to their adapters:
        one row update per adapter for a run of step events (the last one carries the state).

        The records come with the events (their adapters' rows when they joined the pack); only the
        states, which may have moved since (a cancel), are read again, in one query: decisions about
        events read an adapter's id and state, and reading whole rows cost a tick more than writing."""
        if not placed:
            return
        fresh = self.store.unrecorded([e.id for e, _ in placed])
        placed = [(e, a) for e, a in placed if e.id in fresh]
        last_step = {a.id: i for i, (e, a) in enumerate(placed) if isinstance(e, StepEvent)}
        states = self.store.adapter_states({a.id for _, a in placed})
        adapters = {
            a.id: a if a.state == states[a.id] else replace(a, state=states[a.id])
            for _, a in placed
            if a.id in states
        }
        rows: list[NewEvent] = []
        changes: list[AdapterChange] = []
        for i, (event, joined) in enumerate(placed):
            adapter_id = joined.id
            if adapter_id not in adapters:
                continue  # deleted meanwhile: nothing to record it against
            adapter = adapters[adapter_id]
            payload = event.model_dump(mode="json")
            rows.append(NewEvent(adapter.job_id, event.kind, adapter_id, event.step, payload, event.id))
            if isinstance(event, StepEvent) and last_step[adapter_id] != i:
                continue
            change = decisions.on_event(adapter, event, adapter_id in self._cancelling)
            if change is not None:
                changes.append(change)
                if change.state is not None:  # what the next event of it sees
                    adapters[adapter_id] = replace(adapter, state=change.state)
        self._apply(changes)
        self.store.record_events(rows)

    def _replay(self, pack_id: str) -> None:
        """Record what a dead controller's pack logged but the controller never heard (its last
        events, often its last checkpoints and completions), so nothing the engine reported is lost."""
        members = self.store.adapters_by_id([m.adapter_id for m in self.store.list_pack_members(pack_id)])
        names = {adapter.name: adapter for adapter in members.values()}
        events = EventLog(self.settings.storage_root, pack_id).read()
        placed = [(e, names[e.adapter]) for e in events if e.adapter in names]
        for i in range(0, len(placed), WRITE_BATCH):
            self._record(placed[i : i + WRITE_BATCH])

    def _reap(self, pack: RunningPack) -> ExitedPack:
        """The Ray side of a pack's end (no SQL): `_settle_exit` records it, once the database answers."""
        self.running.pop(pack.pack_id, None)
        for adapter_id in pack.members.values():
            self._yielding.pop(adapter_id, None)
        error = self.packs.outcome(pack.ref)
        error = decisions.failure_reason(error) if error else None
        withdrawn = [AdapterTask.model_validate_json(t).name for t in self.packs.withdraw(pack.pack_id)]
        return ExitedPack(pack.pack_id, dict(pack.members), withdrawn, error)

    def _settle_exit(self, exited: ExitedPack) -> None:
        """Members that left without a `done` are settled by the pack's exit; then the pack is closed.
        Runs after the pack's events are written, so those that finished are already settled by them.
        SQL then learns every complete checkpoint storage holds of them (a failing pack may have written
        one whose event never arrived)."""
        found = self.store.adapters_by_id(exited.members.values())
        members = {name: found[i] for name, i in exited.members.items() if i in found}
        self._apply(decisions.on_pack_exit(members, exited.withdrawn, exited.error))
        for adapter in members.values():
            self._record_stored_checkpoints(adapter)
        state = PackState.FAILED if exited.error else PackState.SUCCEEDED
        self.store.finish_pack(exited.pack_id, state, error=exited.error)
        self._cancelling.difference_update(exited.members.values())

    def _record_stored_checkpoints(self, adapter: AdapterRecord) -> None:
        """SQL learns the checkpoints storage holds but whose events died with the pack, so it names
        the newest complete one (a retry resumes from it). Storage that cannot even be listed now
        (remounted, unreachable) leaves SQL as it is; the next reap lists again."""
        try:
            on_storage = ckpt.stored_steps(adapter.output_dir)
        except OSError as exc:
            log.warning("cannot list the checkpoints of %s: %s", adapter.qualified_name, exc)
            return
        known = [c.step for c in self.store.list_checkpoints(adapter.id)]
        self._apply(decisions.stored_checkpoints(adapter, known, on_storage))

    # ---- scheduling ----

    def _queued_adapters(self) -> list[AdapterRecord]:
        """Queued adapters in scheduling order (priority, then first come). Only rows new or changed
        since the last tick are read whole (by `updated_at`): at 10,000 queued, reading and validating
        every row each tick cost the tick seconds."""
        versions = self.store.queued_versions()
        known = self._queued
        stale = [i for i, at in versions.items() if i not in known or known[i].updated_at != at]
        fresh = self.store.adapters_by_id(stale)
        self._queued = {
            i: fresh.get(i, known.get(i))  # type: ignore[misc]
            for i in versions
            if i in fresh or (i in known and i not in stale)
        }
        queued = [a for a in self._queued.values() if a.state == AdapterState.QUEUED]
        return sorted(queued, key=lambda a: (-a.priority, a.seq))

    def _never_fits(
        self, shape: PackShape, demands: list[sched.AdapterDemand], infos: dict[sched.BaseKey, Any]
    ) -> list[tuple[str, str]]:
        """`scheduler.unplaceable` against an idle worker of `shape`, judged once per adapter and
        budget (a demand does not change while it waits), not again each tick for all the queue."""
        idle = self._idle_workers(shape, 1)
        budget = idle[0].memory_bytes
        unjudged = [d for d in demands if (d.adapter_id, shape, budget) not in self._judged]
        verdicts = dict(sched.unplaceable(unjudged, idle, infos)) if unjudged else {}
        for d in unjudged:
            self._judged[(d.adapter_id, shape, budget)] = verdicts.get(d.adapter_id)
        never = []
        for d in demands:
            reason = self._judged[(d.adapter_id, shape, budget)]
            if reason is not None:
                never.append((d.adapter_id, reason))
        return never

    def _schedule(self) -> None:
        queued = self._queued_adapters()
        live = {a.id for a in queued}
        self._judged = {k: v for k, v in self._judged.items() if k[0] in live}
        self._demands = {i: kept for i, kept in self._demands.items() if i in live}
        parents = self.store.adapters_by_id({a.parent_id for a in queued if a.parent_id})
        ready, orphans = decisions.ready(queued, parents)
        self._apply(orphans)
        reasons = decisions.parent_waits(queued, parents)  # why each adapter left queued waits
        waiting_for_worker: list[sched.AdapterDemand] = []
        by_shape: dict[PackShape, list[AdapterRecord]] = {}
        shapes: dict[str, PackShape] = {}  # by job
        for adapter in self._placeable(ready):
            if adapter.job_id not in shapes:
                shapes[adapter.job_id] = PackShape.of(self._spec(adapter.job_id))
            by_shape.setdefault(shapes[adapter.job_id], []).append(adapter)
        free_slots = self._free_slots()
        fixed = self._capacity().fixed
        for shape, adapters in by_shape.items():
            demands = [self._demand(a) for a in adapters]
            records = {a.id: a for a in adapters}
            idle = self._idle_workers(shape, free_slots)
            workers = idle + [self._worker_state(p) for p in self.running.values() if p.shape == shape]
            infos = {base: self._info(base) for base in {d.base for d in demands}}
            # judged against an idle worker of this shape, whether or not one is free now
            never = self._never_fits(shape, demands, infos)
            failures, too_big = decisions.never_fits(adapters, never, fixed)
            self._apply(failures)
            reasons |= too_big
            never_ids = {adapter_id for adapter_id, _ in never}
            demands = [d for d in demands if d.adapter_id not in never_ids]
            share = self._share()  # counts every running pack, this tick's launches included
            # every slot taken: nothing can be placed, and 10,000 queued would cost the tick seconds
            room = any(len(w.running_adapters) < w.max_adapters for w in workers)
            placements = sched.schedule(demands, workers, infos, share) if room else []
            unplaced = sched.waiting_reasons(demands, placements, share)
            reasons |= unplaced
            waiting_for_worker += [
                d for d in demands if unplaced.get(d.adapter_id) == sched.WAITING_FOR_WORKER
            ]
            for placement in placements:
                chosen = self._unique_names([records[i] for i in placement.adapter_ids])
                try:
                    if placement.refill:
                        self._offer(self.running[placement.worker_id], chosen)
                    else:
                        free_slots -= 1
                        self._launch(placement, shape, chosen)
                except Exception as exc:  # this placement's jobs fail; the others go on
                    log.exception("could not start a pack for %s", [a.qualified_name for a in chosen])
                    self._fail_jobs(chosen, f"could not start a pack: {type(exc).__name__}: {exc}")
        handed_over = self._ask_yields(waiting_for_worker, {a.id: a for a in queued})
        self._apply(decisions.waiting(queued, {i: r for i, r in reasons.items() if i not in handed_over}))

    def _share(self) -> sched.FairShare:
        """What each project and job runs now, over every pack, and the admin's caps."""
        projects: Counter[str] = Counter()
        jobs: Counter[tuple[str, str]] = Counter()
        for pack in self.running.values():
            for owner in pack.owners.values():
                projects[owner.project] += 1
                jobs[(owner.project, owner.job_id)] += 1
        return sched.FairShare(projects, jobs, self.settings.project_max_adapters, self.settings.project_caps)

    def _ask_yields(self, waiting: list[sched.AdapterDemand], records: dict[str, AdapterRecord]) -> set[str]:
        """Ask adapters holding more than a fair share to make room for `waiting` (left waiting for a
        worker this tick) once they have trained a time slice (`scheduler.yields`). They leave their
        packs at their next optimizer step with a checkpoint, go back to the queue, and resume there.

        The place is handed over: a waiting adapter that can join the yielding one's pack (same base and
        shape, another name) is offered to it first, so the pack takes it as the other leaves instead of
        ending and a new pack starting (~20 s of Ray Train start-up saved). Returns the ids handed over.
        """
        slice_seconds = self.settings.yield_after_seconds
        if slice_seconds is None or not waiting:
            return set()
        now = time.monotonic()
        for adapter_id, asked in list(self._yielding.items()):
            if now - asked > YIELD_ASK_SECONDS:  # the request was lost (e.g. a restarted worker): ask again
                del self._yielding[adapter_id]
        running, where = [], {}
        for pack in self.running.values():
            for name, owner in pack.owners.items():
                began = pack.began.get(name)
                running.append(
                    sched.RunningAdapter(
                        owner.id,
                        owner.project,
                        owner.job_id,
                        owner.priority,
                        pack.base,
                        None if began is None else now - began,
                        alone=len(pack.owners) == 1,
                    )
                )
                where[owner.id] = (pack, name)
        demands = {d.adapter_id: d for d in waiting}
        handed_over: set[str] = set()
        for adapter_id, for_id in sched.yields(waiting, running, self._yielding, slice_seconds):
            pack, name = where[adapter_id]
            record = records[for_id]
            joins = (
                demands[for_id].base == pack.base
                and PackShape.of(self._spec(record.job_id)) == pack.shape
                and record.name not in pack.members
            )
            if joins:  # offered before the yield is asked, so it is there when the slot frees
                self._offer(pack, [record])
                handed_over.add(for_id)
            log.info(
                "asking %s to yield its place in pack %s to %s", name, pack.pack_id, record.qualified_name
            )
            self.packs.ask_yield(pack.pack_id, [name])
            self._yielding[adapter_id] = now
        return handed_over

    def _placeable(self, ready: list[AdapterRecord]) -> list[AdapterRecord]:
        """Ready adapters whose job can run at all. A job whose stored spec, base model or resources
        cannot work fails here, once, with the reason, and the rest are scheduled as if it were not."""
        placeable = []
        failed_jobs: set[str] = set()
        capacity = self._capacity()
        problems: dict[tuple[str, sched.BaseKey], str | None] = {}  # judged once per job and base
        for adapter in ready:
            if adapter.job_id in failed_jobs:
                continue
            key = (adapter.job_id, self._base_key(adapter))
            if key not in problems:
                problems[key] = self._job_problem(adapter, capacity)
            reason = problems[key]
            if reason is None:
                placeable.append(adapter)
            else:
                failed_jobs.add(adapter.job_id)
                self._apply(decisions.fail_all(self.store.list_adapters(job_id=adapter.job_id), reason))
        return placeable

    def _job_problem(self, adapter: AdapterRecord, capacity: decisions.Capacity) -> str | None:
        try:
            spec = self._spec(adapter.job_id)
        except Exception as exc:
            return f"the stored job spec cannot be read: {exc}"
        r = spec.resources
        reason = decisions.infeasible(
            decisions.Ask(r.workers, r.cpus_per_worker, r.gpus_per_worker), capacity
        )
        if reason is not None:
            return reason
        try:
            self._info(self._base_key(adapter))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            return f"`base_model` {adapter.base_model!r} cannot be loaded: {first}"
        return None

    def _fail_jobs(self, adapters: list[AdapterRecord], reason: str) -> None:
        for job_id in {a.job_id for a in adapters}:
            self._apply(decisions.fail_all(self.store.list_adapters(job_id=job_id), reason))

    def _capacity(self) -> decisions.Capacity:
        return self._view().capacity

    def _view(self) -> ClusterView:
        """This tick's view of the cluster (read by `_prepare`; a call outside a tick reads it now)."""
        if self._cluster is None:
            self._cluster = self.packs.cluster()
        return self._cluster

    def _unique_names(self, adapters: list[AdapterRecord]) -> list[AdapterRecord]:
        """Same-named adapters of different projects cannot share a pack; the rest wait a tick."""
        seen: set[str] = set()
        chosen = []
        for adapter in adapters:
            if adapter.name not in seen:
                seen.add(adapter.name)
                chosen.append(adapter)
        return chosen

    def _free_slots(self) -> int:
        """Packs that may start now: one per GPU on a GPU cluster, else one per CPU (Ray queues the rest),
        less the slots session hosts hold."""
        view = self._view()
        total = max(1, view.total_gpus or view.total_cpus)
        return max(0, total - len(self.running) - self.session_hosts())

    def _idle_workers(self, shape: PackShape, count: int) -> list[sched.WorkerState]:
        return [
            sched.WorkerState(
                worker_id=f"idle-{i}",
                memory_bytes=self._budget(shape),
                has_gpu=shape.gpus_per_worker > 0,
                max_adapters=shape.max_adapters,
                running_base=None,
                running_adapters=(),
                used_bytes=0,
            )
            for i in range(count)
        ]

    def _worker_state(self, pack: RunningPack) -> sched.WorkerState:
        return sched.WorkerState(
            worker_id=pack.pack_id,
            memory_bytes=self._budget(pack.shape),
            has_gpu=pack.shape.gpus_per_worker > 0,
            max_adapters=pack.shape.max_adapters,
            running_base=pack.base,
            running_adapters=tuple(pack.members.values()),
            used_bytes=pack.used_bytes,
        )

    def _budget(self, shape: PackShape) -> int:
        """A worker's memory: `memory_gb_per_worker` if the job says, else a GPU default or a RAM share."""
        if shape.memory_gb:
            return int(shape.memory_gb * 2**30)
        if shape.gpus_per_worker > 0:
            return int(DEFAULT_GPU_BUDGET_GB * 2**30)
        view = self._view()
        return int(view.memory_bytes * 0.8 / max(1, view.total_cpus))

    def _demand(self, adapter: AdapterRecord) -> sched.AdapterDemand:
        """What the scheduler knows of an adapter; kept while its record is the one read (a queue of
        10,000 is asked each tick)."""
        kept = self._demands.get(adapter.id)
        if kept is not None and kept[0] is adapter:
            return kept[1]
        demand = self._new_demand(adapter)
        self._demands[adapter.id] = (adapter, demand)
        return demand

    def _new_demand(self, adapter: AdapterRecord) -> sched.AdapterDemand:
        spec = self._spec(adapter.job_id)
        train = adapter.train
        return sched.AdapterDemand(
            adapter_id=adapter.id,
            project=adapter.project,
            base=self._base_key(adapter),
            priority=adapter.priority,
            seq=adapter.seq,
            lora=adapter.lora,
            batch_size=train.batch_size,
            max_seq_len=train.max_seq_len,
            needs_gpu=spec.resources.gpus_per_worker > 0,
            job=adapter.job_id,
            pass_tokens=memory.default_pass_tokens(
                spec.resources.gpus_per_worker > 0,
                spec.resources.max_tokens_per_pass,
                spec.resources.max_adapters_per_worker * train.batch_size * train.max_seq_len,
            ),
        )

    @staticmethod
    def _base_key(adapter: AdapterRecord) -> sched.BaseKey:
        return sched.BaseKey(adapter.base_model, adapter.quantization, adapter.dtype)

    def _info(self, base: sched.BaseKey) -> memory.BaseModelInfo:
        """The base's shape, from its config (loaded once, by `_prepare` outside the lock; a failure is
        remembered, not retried each tick)."""
        if base not in self._infos:
            self._infos[base] = self._load_info(base)
        found = self._infos[base]
        if isinstance(found, Exception):
            raise found
        return found

    def _load_info(self, base: sched.BaseKey) -> memory.BaseModelInfo | Exception:
        try:
            config = base_config(base.base_model, self.settings.home)  # a catalogued name, a GGUF file
            return memory.model_info_from_config(config.to_dict())
        except Exception as exc:
            return exc

    def _spec(self, job_id: str) -> JobSpec:
        if job_id not in self._specs:
            self._specs[job_id] = self.store.get_job(job_id).job_spec
        return self._specs[job_id]

    def _task(self, adapter: AdapterRecord) -> AdapterTask:
        init_from = None
        if adapter.parent_id is not None:
            parent = self.store.get_adapter_by_id(adapter.parent_id)
            init_from = parent.final_checkpoint
            self.store.update_adapter(AdapterChange(adapter.id, parent_checkpoint=init_from))
        return AdapterTask(
            name=adapter.name,
            lora=adapter.lora,
            train=adapter.train,
            data=adapter.data,
            output_dir=adapter.output_dir,
            init_from=init_from,
            baseline_from=init_from,
            eval=self._spec(adapter.job_id).eval_of(adapter.name),
            max_record_bytes=self.settings.max_record_bytes,
        )

    def _launch(self, placement: sched.Placement, shape: PackShape, adapters: list[AdapterRecord]) -> None:
        if not adapters:
            return
        spec = self._spec(adapters[0].job_id)
        pack_id = uuid.uuid4().hex[:12]
        gpu = shape.gpus_per_worker > 0
        plan = PackPlan(
            pack_id=pack_id,
            base_model=placement.base.base_model,
            bases_home=str(self.settings.home),
            tokenizer=spec.tokenizer,
            quantization=placement.base.quantization,
            dtype=placement.base.dtype,  # type: ignore[arg-type]
            device="cuda" if gpu else "cpu",
            adapters=[self._task(a) for a in adapters],
            max_adapters=shape.max_adapters,
            memory_budget_bytes=self._budget(shape),  # `auto` checkpointing turns on above it
            activation_checkpointing=shape.activation_checkpointing,  # type: ignore[arg-type]
            max_tokens_per_pass=shape.max_tokens_per_pass,
        )
        self.store.create_pack(
            pack_id,
            base_model=plan.base_model,
            quantization=plan.quantization,
            dtype=plan.dtype,
            resources=shape.record(),
            ray_run_name=f"pack-{pack_id}",
        )
        ref = self.packs.launch(plan, shape.fit_options(self.settings.storage_root))
        info = self._info(placement.base)  # the base, and one pass's activations if steps run in passes
        base_bytes = sched.base_memory_bytes(placement.base, info)
        base_bytes += sched.pass_memory_bytes(self._demand(adapters[0]), info)
        pack = RunningPack(pack_id, placement.base, shape, ref, base_bytes)
        self.running[pack_id] = pack
        self._join(pack, adapters)

    def _offer(self, pack: RunningPack, adapters: list[AdapterRecord]) -> None:
        adapters = [a for a in adapters if a.name not in pack.members]
        if adapters:
            tasks = [self._task(a).model_dump_json() for a in adapters]
            self.packs.offer(pack.pack_id, tasks)
            self._join(pack, adapters)

    def _join(self, pack: RunningPack, adapters: list[AdapterRecord]) -> None:
        info = self._info(pack.base)
        for adapter in adapters:
            pack.members[adapter.name] = adapter.id
            pack.owners[adapter.name] = replace(adapter, state=AdapterState.TRAINING)  # as applied below
            pack.member_bytes[adapter.name] = sched.adapter_memory_bytes(self._demand(adapter), info)
            self.store.add_pack_member(pack.pack_id, adapter.id)
        self._apply([AdapterChange(adapter.id, AdapterState.TRAINING) for adapter in adapters])

    # ---- jobs ----

    def _settle_jobs(self) -> None:
        """Jobs whose adapters all settled get their outcome. Judged on counts of states (one query for
        every open job); only a job that settles now has its adapters read, for its failures."""
        jobs = self.store.job_states([JobState.PENDING, JobState.RUNNING], kind=JobKind.TRAIN)
        counts = self.store.adapter_counts(list(jobs))
        for job_id, state in jobs.items():
            try:
                auto = self._spec(job_id).promotion.auto
            except Exception:
                auto = False
            outcome = decisions.job_outcome(list(counts[job_id]), auto)
            if outcome is None or outcome == state:
                continue
            if outcome == JobState.PENDING:
                continue  # never back from running
            adapters = self.store.list_adapters(job_id=job_id)
            failures = [
                f"{a.name}: {a.error}" for a in adapters if a.state == AdapterState.FAILED and a.error
            ]
            error = "; ".join(failures)[:4000] if failures else None
            self.store.set_job_state(job_id, outcome, error=error)

    def retry_job(self, job_id: str, fresh: Collection[str] = ()) -> None:
        """Requeue a finished job's failed adapters (under the lock: a tick settling the job at the same
        moment would otherwise mark it failed again over queued adapters). Those in `fresh` (their data
        changed, `decisions.fresh_start`) start again from step 0; the others resume."""
        with self._lock:
            job = self.store.get_job(job_id)
            changes = decisions.retry(self.store.list_adapters(job_id=job_id))
            if not changes:
                raise Conflict(f"job {job_id} has no failed adapters to retry (it is {job.state})")
            for change in changes:
                if change.adapter_id in fresh:
                    self._forget_progress(change.adapter_id)
            if job.state != JobState.RUNNING:
                self.store.update_job(job_id, JobState.RUNNING, error=None)
            self._apply(changes)

    def retry_adapter(self, adapter_id: str, fresh: bool) -> None:
        """A person's retry of one failed or cancelled adapter: back to the queue under its own name,
        its job running again; from step 0 if `fresh` (its data changed), else from its newest complete
        checkpoint (the engine resumes from the output directory's newest). Checked again under the lock:
        the adapter or its parent may have moved since the caller looked."""
        with self._lock:
            adapter = self.store.get_adapter_by_id(adapter_id)
            parent = self.store.get_adapter_by_id(adapter.parent_id) if adapter.parent_id else None
            refusal = decisions.retry_refusal(adapter, parent)
            if refusal is not None:
                raise Conflict(refusal)
            if fresh:
                self._forget_progress(adapter_id)
            job = self.store.get_job(adapter.job_id)
            if job.state != JobState.RUNNING:
                self.store.update_job(job.id, JobState.RUNNING, error=None)
            self._apply([AdapterChange(adapter_id, AdapterState.QUEUED, error=None)])

    def _forget_progress(self, adapter_id: str) -> None:
        """Files first, then SQL: a crash between them leaves SQL naming checkpoints that are gone,
        which the next retry clears again; never SQL reset over old checkpoints the engine would resume."""
        remove_output(self.store.get_adapter_by_id(adapter_id))
        self.store.forget_progress(adapter_id)

    def delete_adapter(self, adapter_id: str) -> AdapterRecord:
        """Delete an adapter that may go (`decisions.delete_refusal`): its files, then its rows.
        Under the lock, so no tick queues or places it meanwhile and the `deleted` event's id follows
        every event the controller wrote before it (the MLflow mirror's cursor relies on that order)."""
        with self._lock:
            adapter = self.store.get_adapter_by_id(adapter_id)
            children = [c.qualified_name for c in self.store.children(adapter_id)]
            refusal = decisions.delete_refusal(adapter, children)
            if refusal is not None:
                raise Conflict(refusal)
            remove_output(adapter)
            return self.store.delete_adapter(adapter_id, deletable=[adapter.state])

    def cancel_job(self, job_id: str) -> None:
        """Queued adapters are cancelled now; running ones leave their pack between two steps.

        In batches, since this holds the controller's lock: one transaction for the adapters cancelled
        now, one batch of events, one request per pack (2,000 adapters one by one once froze every
        other job's progress for half a minute)."""
        with self._lock:
            in_pack = {i: p.pack_id for p in self.running.values() for i in p.members.values()}
            now, in_flight = decisions.cancel(self.store.list_adapters(job_id=job_id), in_pack)
            cancelled = [change.adapter_id for change in now]
            by_pack: dict[str, dict[str, str]] = {}  # pack id -> {member name: adapter id}
            for adapter_id in in_flight:
                pack = self.running[in_pack[adapter_id]]
                name = next(n for n, i in pack.members.items() if i == adapter_id)
                by_pack.setdefault(pack.pack_id, {})[name] = adapter_id
            for pack_id, members in by_pack.items():
                self._ensure_ray()
                withdrawn = self.packs.cancel(pack_id, list(members))
                self._cancelling.update(members.values())  # a yield crossing this cancel must not requeue it
                pack = self.running[pack_id]
                for name in set(withdrawn) & set(members):  # only offered, never taken: never started
                    pack.leave(name)
                    cancelled.append(members[name])
            moved = self.store.transition_adapters(cancelled, AdapterState.CANCELLED)
            self.store.record_events([_done_event(record) for record in moved])
