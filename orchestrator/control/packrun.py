"""One pack as one Ray Train run: the glue between the controller and the engine's `run_pack`.

Ray Train owns the worker group (ScalingConfig), restarts (FailureConfig: a restarted worker runs the same
plan again, and `run_pack` resumes every adapter from its latest checkpoint) and the run's storage
(RunConfig.storage_path). Adapter checkpoints are PEFT directories the engine writes under the same
storage: they are per adapter, not per pack, because adapters join and leave packs independently.

Between the controller and running packs sits one small Ray actor, `PackChannel`: workers post progress
events to it in batches and take refills and cancellations from it; the controller drains and fills it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import ray
from pydantic import TypeAdapter

from orchestrator.control.decisions import Capacity
from orchestrator.control.runtime import ClusterView, FitOptions
from workers import storage
from workers.contract.plan import AdapterTask, Event, PackPlan, StartEvent

EVENTS = TypeAdapter(list[Event])
FLUSH_SECONDS = 0.5
POLL_SECONDS = 0.5


@ray.remote(num_cpus=0, max_concurrency=4)
class PackChannel:
    """Mailbox between the controller and running packs (JSON strings in and out, no shared objects)."""

    def __init__(self) -> None:
        self._events: list[str] = []
        self._offers: dict[str, list[str]] = {}
        self._cancelled: dict[str, set[str]] = {}
        self._yields: dict[str, set[str]] = {}

    def post(self, events_json: str) -> None:
        self._events.append(events_json)

    def drain(self) -> list[str]:
        events, self._events = self._events, []
        return events

    def offer(self, pack_id: str, tasks_json: list[str]) -> None:
        self._offers.setdefault(pack_id, []).extend(tasks_json)

    def take(self, pack_id: str, free: int) -> list[str]:
        offered = self._offers.get(pack_id, [])
        taken, self._offers[pack_id] = offered[:free], offered[free:]
        return taken

    def withdraw(self, pack_id: str) -> list[str]:
        """Offers a finished pack never took: the controller queues them again."""
        self._cancelled.pop(pack_id, None)
        self._yields.pop(pack_id, None)
        return self._offers.pop(pack_id, [])

    def cancel(self, pack_id: str, names: list[str]) -> list[str]:
        """Ask the pack to drop `names`; offers it has not taken yet are withdrawn at once (returned)."""
        self._cancelled.setdefault(pack_id, set()).update(names)
        offered = self._offers.get(pack_id, [])
        keep = [t for t in offered if AdapterTask.model_validate_json(t).name not in names]
        withdrawn = [AdapterTask.model_validate_json(t).name for t in offered if t not in keep]
        self._offers[pack_id] = keep
        return withdrawn

    def cancelled(self, pack_id: str) -> list[str]:
        return sorted(self._cancelled.get(pack_id, ()))

    def ask_yield(self, pack_id: str, names: list[str]) -> None:
        """Ask the pack to let `names` yield (leave at a checkpoint and go back to the queue)."""
        self._yields.setdefault(pack_id, set()).update(names)

    def take_yields(self, pack_id: str) -> list[str]:
        """Yield requests, each handed out once: the engine remembers it on the adapter, and an adapter
        that later comes back to this pack must not find a stale request waiting for it."""
        return sorted(self._yields.pop(pack_id, ()))


class EventLog:
    """Every event a pack's engine emits, written before the controller hears of it: a controller that
    starts after another died replays what the dead one never recorded (`Controller._replay`).

    Under a filesystem storage it is one JSON Lines file, each batch appended and fsynced; a line torn by
    a crash mid-write ends the log. An object store has no append, so there each batch is one object,
    named by time so that listing order is writing order; an object is whole or absent."""

    def __init__(self, storage_root: str, pack_id: str) -> None:
        self.remote = storage.is_remote(storage_root)
        self.location = storage.join(storage_root, "events", pack_id if self.remote else f"{pack_id}.jsonl")
        self._batches = 0

    def append(self, batch_json: str) -> None:
        if self.remote:
            self._batches += 1
            key = f"{time.time_ns():020d}-{os.getpid()}-{self._batches:06d}.json"
            storage.write_bytes(storage.join(self.location, key), batch_json.encode())
            return
        path = Path(self.location)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(batch_json + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[Event]:
        if self.remote:
            batches = [
                storage.read_bytes(storage.join(self.location, key)).decode()
                for key in storage.files(self.location)
            ]
        else:
            try:
                batches = Path(self.location).read_text(encoding="utf-8").splitlines()
            except OSError:
                return []
        events: list[Event] = []
        for batch in batches:
            try:
                events += EVENTS.validate_json(batch)
            except ValueError:
                break
        return events


class _Reporter:
    """Batches events to the channel, so a pack of K adapters costs one remote call per half second.
    Each batch is first written to the pack's event log under storage."""

    def __init__(self, channel: Any, pack_id: str, log: EventLog | None = None) -> None:
        self.channel, self.pack_id, self.log = channel, pack_id, log
        self.buffer: list[Event] = []
        self.last_flush = time.monotonic()
        self.last_poll = 0.0
        self.cancelled_names: list[str] = []
        self.last_yield_poll = 0.0

    def emit(self, event: Event) -> None:
        if isinstance(event, StartEvent) and event.node is None:  # where it runs, for people and tests
            event = event.model_copy(update={"node": ray.get_runtime_context().get_node_id()})
        self.buffer.append(event)
        urgent = event.kind in ("done", "checkpoint")
        if urgent or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            batch = EVENTS.dump_json(self.buffer).decode()
            if self.log is not None:
                self.log.append(batch)
            ray.get(self.channel.post.remote(batch))
            self.buffer = []
        self.last_flush = time.monotonic()

    def refill(self, free: int) -> list[AdapterTask]:
        self.flush()  # the controller must see what finished before it hands out more
        taken = ray.get(self.channel.take.remote(self.pack_id, free))
        return [AdapterTask.model_validate_json(t) for t in taken]

    def cancelled(self) -> list[str]:
        if time.monotonic() - self.last_poll >= POLL_SECONDS:
            self.cancelled_names = ray.get(self.channel.cancelled.remote(self.pack_id))
            self.last_poll = time.monotonic()
        return self.cancelled_names

    def yielding(self) -> list[str]:
        if time.monotonic() - self.last_yield_poll < POLL_SECONDS:
            return []
        self.last_yield_poll = time.monotonic()
        return ray.get(self.channel.take_yields.remote(self.pack_id))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry: run the pack; only rank 0 reports (the engine emits on rank 0)."""
    import torch

    from workers.training.pack import run_pack

    if config.get("num_threads"):
        torch.set_num_threads(int(config["num_threads"]))
    plan = PackPlan.model_validate_json(config["plan"])
    log = EventLog(config["storage_path"], plan.pack_id) if config.get("storage_path") else None
    reporter = _Reporter(config["channel"], plan.pack_id, log)
    try:
        run_pack(
            plan,
            emit=reporter.emit,
            refill=reporter.refill,
            cancelled=reporter.cancelled,
            yielding=reporter.yielding,
        )
    finally:
        reporter.flush()


def fit_pack(plan_json: str, channel: Any, options: FitOptions) -> str | None:
    """Run one pack with Ray Train and return the error text, or None on success (blocking)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = PackPlan.model_validate_json(plan_json)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "plan": plan_json,
            "channel": channel,
            "num_threads": options.num_threads,
            "storage_path": options.storage_path,
        },
        scaling_config=ScalingConfig(
            num_workers=options.workers,
            use_gpu=options.gpus_per_worker > 0,
            resources_per_worker=options.resources_per_worker,
        ),
        run_config=RunConfig(
            name=f"pack-{plan.pack_id}",
            storage_path=storage.join(options.storage_path, "ray"),
            failure_config=FailureConfig(max_failures=options.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: the pack failed after its retries
        return f"{type(exc).__name__}: {exc}"  # whole: its cause is at the end (the controller leads with it)
    return None if result.error is None else f"{type(result.error).__name__}: {result.error}"


@ray.remote(num_cpus=0)
def fit_pack_task(plan_json: str, channel: Any, options: FitOptions) -> str | None:
    """`TorchTrainer.fit` blocks, so each pack's fit runs in its own Ray task: packs run concurrently."""
    return fit_pack(plan_json, channel, options)


class RayPacks:
    """`runtime.PackRuntime` on Ray: each pack a Ray Train run in its own task, messages through one
    `PackChannel` actor."""

    def __init__(self, connect: Callable[[], None], fixed: bool) -> None:
        self._connect = connect  # joins the configured cluster or starts a local Ray
        self._fixed = fixed  # a local Ray never grows
        self._channel: Any = None

    def connect(self) -> None:
        self._connect()
        if self._channel is None:
            self._channel = PackChannel.remote()

    def cluster(self) -> ClusterView:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
        gpus = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
        total = ray.cluster_resources()
        return ClusterView(
            capacity=Capacity(cpus, gpus, len(nodes), fixed=self._fixed),
            total_cpus=int(total.get("CPU", 1)),
            total_gpus=int(total.get("GPU", 0)),
            memory_bytes=psutil.virtual_memory().total,
        )

    def launch(self, plan: PackPlan, options: FitOptions) -> Any:
        return fit_pack_task.remote(plan.model_dump_json(), self._channel, options)

    def ended(self, handles: Sequence[Any]) -> list[Any]:
        if not handles:
            return []
        done, _ = ray.wait(list(handles), num_returns=len(handles), timeout=0)
        return done

    def outcome(self, handle: Any) -> str | None:
        try:
            return ray.get(handle)
        except Exception as exc:  # the Ray task itself died (not the training inside it)
            return f"{type(exc).__name__}: {exc}"

    def kill(self, handle: Any) -> None:
        ray.cancel(handle, force=True, recursive=True)

    def drain(self) -> list[str]:
        return ray.get(self._channel.drain.remote())

    def offer(self, pack_id: str, tasks_json: list[str]) -> None:
        ray.get(self._channel.offer.remote(pack_id, tasks_json))

    def cancel(self, pack_id: str, names: list[str]) -> list[str]:
        return ray.get(self._channel.cancel.remote(pack_id, names))

    def ask_yield(self, pack_id: str, names: list[str]) -> None:
        ray.get(self._channel.ask_yield.remote(pack_id, names))

    def withdraw(self, pack_id: str) -> list[str]:
        return ray.get(self._channel.withdraw.remote(pack_id))
