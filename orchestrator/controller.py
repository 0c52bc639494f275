"""The controller: makes what runs on Ray match what SQL says should run, one tick at a time.

SQL is the source of truth; the controller holds only what it can rebuild (running Ray task handles). Each
tick it (1) drains progress events from running packs into SQL in one batch, (2) reaps finished Ray Train
runs, (3) asks the pure scheduler where queued adapters go, and launches new packs or offers refills to
running ones. On start it reconciles: whatever SQL says was running belonged to a dead controller, so
those adapters go back to the queue and resume from their last checkpoints.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray

from orchestrator import scheduler as sched
from orchestrator.packrun import EVENTS, PackChannel, fit_pack_task
from orchestrator.settings import Settings
from orchestrator.spec import JobSpec
from orchestrator.states import AdapterState, JobState, job_state_from_adapters
from orchestrator.store import AdapterRecord, NewEvent, Store
from workers.plan import (
    AdapterDone,
    AdapterTask,
    CheckpointEvent,
    DataConfig,
    EvalEvent,
    Event,
    LoraConfig,
    PackPlan,
    StartEvent,
    StepEvent,
    TrainConfig,
)

log = logging.getLogger(__name__)

FINISHED_OK = {AdapterState.TRAINED, AdapterState.EVALUATED, AdapterState.PROMOTED, AdapterState.REJECTED}
FINISHED = FINISHED_OK | {AdapterState.FAILED, AdapterState.CANCELLED}
DEFAULT_GPU_BUDGET_GB = 16.0


@dataclass(frozen=True)
class PackShape:
    """Ray resources of a pack; adapters share a pack only if their jobs ask for the same shape."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    memory_gb: float | None
    max_adapters: int

    @classmethod
    def of(cls, spec: JobSpec) -> PackShape:
        r = spec.resources
        return cls(
            r.workers,
            r.cpus_per_worker,
            r.gpus_per_worker,
            r.max_failures,
            r.memory_gb_per_worker,
            r.max_adapters_per_worker,
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

    @property
    def used_bytes(self) -> int:
        return self.base_bytes + sum(self.member_bytes.values())


class Controller:
    def __init__(
        self, settings: Settings, store: Store, on_events: Callable[[list[Event]], None] | None = None
    ):
        self.settings = settings
        self.store = store
        self.on_events = on_events
        self.running: dict[str, RunningPack] = {}
        self._specs: dict[str, JobSpec] = {}
        self._infos: dict[sched.BaseKey, sched.BaseModelInfo] = {}
        self._channel: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.RLock()

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
                ray.cancel(pack.ref, force=True, recursive=True)
            self.running.clear()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.tick_seconds):
            try:
                self.tick()
            except Exception:  # a bad tick must not kill the controller; the next one retries
                log.exception("controller tick failed")

    def _ensure_ray(self) -> None:
        if not ray.is_initialized():
            if self.settings.ray_address:
                ray.init(address=self.settings.ray_address, namespace="lorafleet")
            else:
                ray.init(
                    num_cpus=self.settings.ray_num_cpus or os.cpu_count(),
                    include_dashboard=False,
                    namespace="lorafleet",
                    log_to_driver=False,
                )
        if self._channel is None:
            self._channel = PackChannel.remote()

    def reconcile(self) -> None:
        """Adopt SQL's view after a restart: packs SQL thinks run belonged to a dead controller."""
        with self._lock:
            for pack in self.store.list_packs(states=["running"]):
                if pack.id not in self.running:
                    self.store.finish_pack(pack.id, "failed", error="controller restarted")
            for adapter in self.store.list_adapters(states=[AdapterState.TRAINING.value]):
                if not any(adapter.id in p.members.values() for p in self.running.values()):
                    self.store.update_adapter(adapter.id, state=AdapterState.QUEUED.value)

    # ---- one tick ----

    def tick(self) -> None:
        with self._lock:
            self._ensure_ray()
            refs = [p.ref for p in self.running.values()]
            done_refs, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
            self._apply_events(self._drain())
            for pack in [p for p in self.running.values() if p.ref in done_refs]:
                self._reap(pack)
            self._schedule()
            self._settle_jobs()

    def _drain(self) -> list[Event]:
        batches = ray.get(self._channel.drain.remote())
        return [event for batch in batches for event in EVENTS.validate_json(batch)]

    def _apply_events(self, events: list[Event]) -> None:
        """Record every event in one batch; fold them into the adapters' rows, one step update per adapter."""
        if not events:
            return
        last_step = {(e.pack_id, e.adapter): i for i, e in enumerate(events) if isinstance(e, StepEvent)}
        rows: list[NewEvent] = []
        job_of: dict[str, str] = {}
        for i, event in enumerate(events):
            pack = self.running.get(event.pack_id)
            adapter_id = pack.members.get(event.adapter) if pack else None
            if adapter_id is None:
                continue
            if adapter_id not in job_of:
                job_of[adapter_id] = self.store.get_adapter_by_id(adapter_id).job_id
            payload = event.model_dump(mode="json")
            rows.append(NewEvent(job_of[adapter_id], event.kind, adapter_id, event.step, payload))
            if not isinstance(event, StepEvent) or last_step[(event.pack_id, event.adapter)] == i:
                self._apply_event(self.store.get_adapter_by_id(adapter_id), event)
        self.store.record_events(rows)
        if self.on_events is not None:
            self.on_events(events)

    def _apply_event(self, adapter: AdapterRecord, event: Event) -> None:
        if isinstance(event, StartEvent):
            if adapter.state == AdapterState.QUEUED.value:
                self.store.update_adapter(adapter.id, state=AdapterState.TRAINING.value)
            self.store.update_adapter(adapter.id, data_fingerprint=event.data_fingerprint)
        elif isinstance(event, StepEvent):
            if adapter.state == AdapterState.QUEUED.value:
                self.store.update_adapter(adapter.id, state=AdapterState.TRAINING.value)
            self.store.update_adapter(adapter.id, step=event.step)
            self.store.upsert_metrics(adapter.id, {"train_loss": (event.loss, event.step)})
        elif isinstance(event, EvalEvent):
            self.store.update_adapter(adapter.id, eval_loss=event.eval_loss)
            self.store.upsert_metrics(
                adapter.id,
                {"eval_loss": (event.eval_loss, event.step), "perplexity": (event.perplexity, event.step)},
            )
        elif isinstance(event, CheckpointEvent):
            self.store.add_checkpoint(adapter.id, event.step, str(event.path), event.final)
        elif isinstance(event, AdapterDone):
            self._finish_adapter(adapter, event)

    def _finish_adapter(self, adapter: AdapterRecord, done: AdapterDone) -> None:
        pack = self.running.get(done.pack_id)
        if pack is not None:  # its slot and memory are free for a refill
            pack.members.pop(done.adapter, None)
            pack.member_bytes.pop(done.adapter, None)
        if adapter.state in {s.value for s in FINISHED}:
            return
        if adapter.state == AdapterState.QUEUED.value and done.status != "cancelled":
            self.store.update_adapter(adapter.id, state=AdapterState.TRAINING.value)
        fields: dict[str, Any] = {"step": done.step, "error": done.error}
        if done.final_dir is not None:
            fields["final_checkpoint"] = str(done.final_dir)
        if done.eval_loss is not None:
            fields["eval_loss"] = done.eval_loss
        if done.baseline_eval_loss is not None:  # the parent on this adapter's eval data, for the gate
            self.store.upsert_metrics(adapter.id, {"parent_eval_loss": (done.baseline_eval_loss, done.step)})
        self.store.update_adapter(adapter.id, state=done.status, **fields)

    def _reap(self, pack: RunningPack) -> None:
        error = ray.get(pack.ref)
        self.running.pop(pack.pack_id, None)
        for task_json in ray.get(self._channel.withdraw.remote(pack.pack_id)):
            name = AdapterTask.model_validate_json(task_json).name
            adapter_id = pack.members.pop(name, None)
            if adapter_id is not None:
                self.store.update_adapter(adapter_id, state=AdapterState.QUEUED.value)
        for adapter_id in pack.members.values():  # in the pack but never reported done: the run died
            adapter = self.store.get_adapter_by_id(adapter_id)
            if adapter.state not in {s.value for s in FINISHED}:
                reason = error or "the pack ended without reporting this adapter"
                self.store.update_adapter(adapter_id, state=AdapterState.FAILED.value, error=reason)
        self.store.finish_pack(pack.pack_id, "failed" if error else "succeeded", error=error)

    # ---- scheduling ----

    def _schedule(self) -> None:
        ready = self._ready_adapters()
        if not ready:
            return
        by_shape: dict[PackShape, list[AdapterRecord]] = {}
        for adapter in ready:
            by_shape.setdefault(PackShape.of(self._spec(adapter.job_id)), []).append(adapter)
        free_slots = self._free_slots()
        for shape, adapters in by_shape.items():
            demands = [self._demand(a) for a in adapters]
            records = {a.id: a for a in adapters}
            idle = self._idle_workers(shape, free_slots)
            workers = idle + [self._worker_state(p) for p in self.running.values() if p.shape == shape]
            infos = {d.base: self._info(d.base) for d in demands}
            for placement in sched.schedule(demands, workers, infos):
                chosen = self._unique_names([records[i] for i in placement.adapter_ids])
                if placement.refill:
                    self._offer(self.running[placement.worker_id], chosen)
                else:
                    free_slots -= 1
                    self._launch(placement, shape, chosen)

    def _ready_adapters(self) -> list[AdapterRecord]:
        """Queued adapters whose parent (if any) has finished training; children of failures fail."""
        ready = []
        for adapter in self.store.list_adapters(states=[AdapterState.QUEUED.value]):
            if adapter.parent_id is None:
                ready.append(adapter)
                continue
            parent = self.store.get_adapter_by_id(adapter.parent_id)
            if parent.state in {s.value for s in FINISHED_OK} and parent.final_checkpoint:
                ready.append(adapter)
            elif parent.state in (AdapterState.FAILED.value, AdapterState.CANCELLED.value):
                self.store.update_adapter(
                    adapter.id,
                    state=AdapterState.FAILED.value,
                    error=f"parent {parent.project}/{parent.name} is {parent.state}; nothing to branch from",
                )
        return ready

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
        """Packs that may start now: one per GPU on a GPU cluster, else one per CPU (Ray queues the rest)."""
        resources = ray.cluster_resources()
        total = max(1, int(resources.get("GPU", 0)) or int(resources.get("CPU", 1)))
        return max(0, total - len(self.running))

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
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return int(psutil.virtual_memory().total * 0.8 / cpus)

    def _demand(self, adapter: AdapterRecord) -> sched.AdapterDemand:
        spec = self._spec(adapter.job_id)
        lora, train = LoraConfig.model_validate(adapter.lora), TrainConfig.model_validate(adapter.train)
        targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
        return sched.AdapterDemand(
            adapter_id=adapter.id,
            project=adapter.project,
            base=self._base_key(adapter),
            priority=adapter.priority,
            seq=adapter.seq,
            r=lora.r,
            target_modules=targets,
            batch_size=train.batch_size,
            max_seq_len=train.max_seq_len,
            needs_gpu=spec.resources.gpus_per_worker > 0,
        )

    @staticmethod
    def _base_key(adapter: AdapterRecord) -> sched.BaseKey:
        return sched.BaseKey(adapter.base_model, adapter.quantization, adapter.dtype)

    def _info(self, base: sched.BaseKey) -> sched.BaseModelInfo:
        if base not in self._infos:
            from transformers import AutoConfig

            self._infos[base] = sched.model_info_from_config(
                AutoConfig.from_pretrained(base.base_model).to_dict()
            )
        return self._infos[base]

    def _spec(self, job_id: str) -> JobSpec:
        if job_id not in self._specs:
            self._specs[job_id] = JobSpec.model_validate(self.store.get_job(job_id).spec)
        return self._specs[job_id]

    def _task(self, adapter: AdapterRecord) -> AdapterTask:
        init_from = None
        if adapter.parent_id is not None:
            parent = self.store.get_adapter_by_id(adapter.parent_id)
            init_from = Path(parent.final_checkpoint) if parent.final_checkpoint else None
            self.store.update_adapter(adapter.id, parent_checkpoint=str(init_from))
        return AdapterTask(
            name=adapter.name,
            lora=LoraConfig.model_validate(adapter.lora),
            train=TrainConfig.model_validate(adapter.train),
            data=DataConfig.model_validate(adapter.data),
            output_dir=Path(adapter.output_dir),
            init_from=init_from,
            baseline_from=init_from,
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
            tokenizer=spec.tokenizer,
            quantization=placement.base.quantization,
            dtype=placement.base.dtype,  # type: ignore[arg-type]
            device="cuda" if gpu else "cpu",
            adapters=[self._task(a) for a in adapters],
            max_adapters=shape.max_adapters,
        )
        self.store.create_pack(
            pack_id,
            base_model=plan.base_model,
            quantization=plan.quantization,
            dtype=plan.dtype,
            resources=shape.__dict__,
            ray_run_name=f"pack-{pack_id}",
        )
        options = {
            "workers": shape.workers,
            "cpus_per_worker": shape.cpus_per_worker,
            "gpus_per_worker": shape.gpus_per_worker,
            "max_failures": shape.max_failures,
            "storage_path": str(self.settings.storage_dir),
            "num_threads": max(1, int(shape.cpus_per_worker)),
        }
        ref = fit_pack_task.remote(plan.model_dump_json(), self._channel, options)
        base_bytes = sched.base_memory_bytes(placement.base, self._info(placement.base))
        pack = RunningPack(pack_id, placement.base, shape, ref, base_bytes)
        self.running[pack_id] = pack
        self._join(pack, adapters)

    def _offer(self, pack: RunningPack, adapters: list[AdapterRecord]) -> None:
        adapters = [a for a in adapters if a.name not in pack.members]
        if adapters:
            tasks = [self._task(a).model_dump_json() for a in adapters]
            ray.get(self._channel.offer.remote(pack.pack_id, tasks))
            self._join(pack, adapters)

    def _join(self, pack: RunningPack, adapters: list[AdapterRecord]) -> None:
        info = self._info(pack.base)
        for adapter in adapters:
            pack.members[adapter.name] = adapter.id
            pack.member_bytes[adapter.name] = sched.adapter_memory_bytes(self._demand(adapter), info)
            self.store.add_pack_member(pack.pack_id, adapter.id)
            self.store.update_adapter(adapter.id, state=AdapterState.TRAINING.value)

    # ---- jobs ----

    def _settle_jobs(self) -> None:
        for job in self.store.list_jobs(states=[JobState.PENDING.value, JobState.RUNNING.value]):
            states = [a.state for a in self.store.list_adapters(job_id=job.id)]
            if all(s in {x.value for x in FINISHED} for s in states):
                self.store.set_job_state(job.id, job_state_from_adapters(states).value)
            elif job.state == JobState.PENDING.value and any(s != AdapterState.QUEUED.value for s in states):
                self.store.set_job_state(job.id, JobState.RUNNING.value)

    def cancel_job(self, job_id: str) -> None:
        """Queued adapters are cancelled now; running ones leave their pack between two steps."""
        with self._lock:
            for adapter in self.store.list_adapters(job_id=job_id):
                if adapter.state == AdapterState.QUEUED.value:
                    self.store.update_adapter(adapter.id, state=AdapterState.CANCELLED.value)
                elif adapter.state == AdapterState.TRAINING.value:
                    for pack in self.running.values():
                        if pack.members.get(adapter.name) == adapter.id:
                            ray.get(self._channel.cancel.remote(pack.pack_id, [adapter.name]))
