"""Simulated packs: a `runtime.PackRuntime` that trains nothing and says what a pack would say.

Each drain advances every running pack by `steps_per_drain` optimizer steps of each of its adapters and
hands back what the engine would emit meanwhile: `start` when an adapter begins (or resumes from its last
checkpoint), a `step` per step, an `eval` every `eval_every` steps, a `checkpoint` every
`checkpoint_every`, and at its last step a final eval, a final checkpoint and `done`. Packs take offers as
slots free, drop cancelled adapters, let asked adapters yield at a checkpoint, and end once they hold
nothing and are offered nothing, as `workers.training.pack.run_pack` does. Values are a deterministic
function of the adapter's seed and step.

What it is for: driving the real controller, store, event log and MLflow mirror at fleet size (hundreds
of packs, thousands of adapters) in tests and `benchmarks/bench_fleet.py`, where Ray Train and a model
would measure the training instead of the control plane. It writes nothing to storage: a checkpoint
is only an event (the controller finds none on disk when a pack ends, as after a lost volume).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.control.decisions import Capacity
from orchestrator.control.packrun import EVENTS
from orchestrator.control.runtime import ClusterView, FitOptions
from workers import storage
from workers.contract.plan import (
    AdapterDone,
    AdapterTask,
    CheckpointEvent,
    EvalEvent,
    Event,
    Outcome,
    PackPlan,
    StartEvent,
    StepEvent,
)


@dataclass
class _Member:
    task: AdapterTask
    step: int
    started: bool = False


@dataclass
class _Pack:
    plan: PackPlan
    offers: list[AdapterTask]
    members: dict[str, _Member] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    yields: set[str] = field(default_factory=set)
    ended: bool = False


class SimulatedPacks:
    """A cluster of `nodes` nodes of `cpus_per_node` CPUs (and GPUs) running simulated packs."""

    def __init__(
        self,
        *,
        nodes: int = 1,
        cpus_per_node: float = 8,
        gpus_per_node: float = 0,
        memory_bytes: int = 64 * 2**30,
        steps_per_drain: int = 1,
        fixed: bool = True,
        advance_on_drain: bool = True,
    ) -> None:
        self.nodes, self.cpus_per_node, self.gpus_per_node = nodes, cpus_per_node, gpus_per_node
        self.memory_bytes = memory_bytes
        self.steps_per_drain = steps_per_drain
        self.fixed = fixed
        # False: the caller advances the packs (`advance`) apart from the drain, e.g. outside a timing
        self.advance_on_drain = advance_on_drain
        self._posted: list[str] = []  # event batches advanced but not drained yet
        self.launched = 0  # packs started so far
        self._packs: dict[str, _Pack] = {}
        self._stored: dict[str, int] = {}  # output dir -> step of its newest checkpoint ("storage")
        self._lock = threading.Lock()  # the controller's thread and a request thread (cancel) both call in

    # ---- the controller's side ----

    def connect(self) -> None:
        pass

    def cluster(self) -> ClusterView:
        return ClusterView(
            capacity=Capacity(self.cpus_per_node, self.gpus_per_node, self.nodes, fixed=self.fixed),
            total_cpus=int(self.cpus_per_node * self.nodes),
            total_gpus=int(self.gpus_per_node * self.nodes),
            memory_bytes=self.memory_bytes,
        )

    def launch(self, plan: PackPlan, options: FitOptions) -> Any:
        with self._lock:
            self._packs[plan.pack_id] = _Pack(plan, list(plan.adapters))
            self.launched += 1
        return plan.pack_id

    def ended(self, handles: Sequence[Any]) -> list[Any]:
        with self._lock:
            return [h for h in handles if h not in self._packs or self._packs[h].ended]

    def outcome(self, handle: Any) -> str | None:
        return None

    def kill(self, handle: Any) -> None:
        with self._lock:
            self._packs.pop(handle, None)

    def drain(self) -> list[str]:
        if self.advance_on_drain:
            self.advance()
        with self._lock:
            batches, self._posted = self._posted, []
            return batches

    def advance(self) -> None:
        """Every running pack trains `steps_per_drain` steps of each adapter; their events are posted
        (one batch per pack) for the next drain."""
        with self._lock:
            for pack in self._packs.values():
                if not pack.ended:
                    events = self._advance(pack)
                    if events:
                        self._posted.append(EVENTS.dump_json(events).decode())

    def offer(self, pack_id: str, tasks_json: list[str]) -> None:
        with self._lock:
            pack = self._packs.get(pack_id)
            if pack is not None and not pack.ended:
                pack.offers += [AdapterTask.model_validate_json(t) for t in tasks_json]

    def cancel(self, pack_id: str, names: list[str]) -> list[str]:
        with self._lock:
            pack = self._packs.get(pack_id)
            if pack is None:
                return []
            pack.cancelled.update(names)
            withdrawn = [t.name for t in pack.offers if t.name in names]
            pack.offers = [t for t in pack.offers if t.name not in names]
            return withdrawn

    def ask_yield(self, pack_id: str, names: list[str]) -> None:
        with self._lock:
            if pack_id in self._packs:
                self._packs[pack_id].yields.update(names)

    def withdraw(self, pack_id: str) -> list[str]:
        with self._lock:
            pack = self._packs.pop(pack_id, None)
            return [t.model_dump_json() for t in pack.offers] if pack is not None else []

    # ---- the packs' side ----

    def _advance(self, pack: _Pack) -> list[Event]:
        """What a pack emits over `steps_per_drain` steps (the caller holds the lock)."""
        events: list[Event] = []
        pid = pack.plan.pack_id
        while pack.offers and len(pack.members) < pack.plan.max_adapters:
            task = pack.offers.pop(0)
            pack.members[task.name] = _Member(task, self._stored.get(str(task.output_dir), 0))
        for name, member in list(pack.members.items()):
            task = member.task
            if name in pack.cancelled:
                events.append(
                    AdapterDone(pack_id=pid, adapter=name, step=member.step, status=Outcome.CANCELLED)
                )
                del pack.members[name]
                continue
            if not member.started:
                member.started = True
                events.append(
                    StartEvent(
                        pack_id=pid,
                        adapter=name,
                        step=member.step,
                        data_fingerprint=f"simulated-{task.train.seed}",
                        train_examples=1000,
                        eval_examples=100,
                        resumed=member.step > 0,
                    )
                )
            if name in pack.yields:
                events += self._checkpoint(pack, member)
                events.append(
                    AdapterDone(pack_id=pid, adapter=name, step=member.step, status=Outcome.YIELDED)
                )
                del pack.members[name]
                continue
            for _ in range(self.steps_per_drain):
                member.step += 1
                events += self._step(pack, member)
                if member.step >= task.train.steps:
                    events += self._finish(pack, member)
                    del pack.members[name]
                    break
        pack.yields.clear()
        if not pack.members and not pack.offers:
            pack.ended = True
        return events

    def _step(self, pack: _Pack, member: _Member) -> list[Event]:
        task, step, pid = member.task, member.step, pack.plan.pack_id
        loss = _loss(task.train.seed, step)
        tokens = step * task.train.batch_size * task.train.max_seq_len
        events: list[Event] = [
            StepEvent(
                pack_id=pid,
                adapter=task.name,
                step=step,
                loss=loss,
                lr=task.train.learning_rate,
                grad_norm=1.0 / math.sqrt(step),
                tokens=tokens,
                tokens_per_s=1000.0,
            )
        ]
        every = task.train.eval_every
        if every and step % every == 0 and step < task.train.steps:
            events.append(_eval(pid, task, step, final=False))
        every = task.train.checkpoint_every
        if every and step % every == 0 and step < task.train.steps:
            events += self._checkpoint(pack, member)
        return events

    def _checkpoint(self, pack: _Pack, member: _Member) -> list[Event]:
        output_dir = str(member.task.output_dir)
        self._stored[output_dir] = member.step
        path = storage.join(output_dir, f"checkpoint-{member.step}")
        return [
            CheckpointEvent(pack_id=pack.plan.pack_id, adapter=member.task.name, step=member.step, path=path)
        ]

    def _finish(self, pack: _Pack, member: _Member) -> list[Event]:
        task, step, pid = member.task, member.step, pack.plan.pack_id
        final_dir = storage.join(str(task.output_dir), "final")
        evaluation = _eval(pid, task, step, final=True)
        return [
            evaluation,
            CheckpointEvent(pack_id=pid, adapter=task.name, step=step, path=final_dir, final=True),
            AdapterDone(
                pack_id=pid,
                adapter=task.name,
                step=step,
                status=Outcome.TRAINED,
                final_dir=final_dir,
                eval_loss=evaluation.eval_loss,
            ),
        ]


def _loss(seed: int, step: int) -> float:
    """A falling training loss, different per seed, the same for the same seed and step."""
    return 2.0 + 1.5 / math.sqrt(step) + 0.01 * (seed % 7)


def _eval(pack_id: str, task: AdapterTask, step: int, final: bool) -> EvalEvent:
    loss = _loss(task.train.seed, step) + 0.1
    return EvalEvent(
        pack_id=pack_id,
        adapter=task.name,
        step=step,
        eval_loss=loss,
        perplexity=math.exp(loss),
        eval_tokens=100 * task.train.max_seq_len,
        final=final,
    )
