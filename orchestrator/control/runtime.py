"""What the controller needs from whatever runs packs: the seam between deciding and doing.

`packrun.RayPacks` runs each pack as a Ray Train run and talks to it through the `PackChannel` actor;
`simulated.SimulatedPacks` runs none and emits the events a pack would, so the control plane (controller,
store, event log, MLflow mirror) can be driven and measured at fleet size without training anything
(`benchmarks/bench_fleet.py`). Both are real implementations of the same protocol; the controller knows
only this one.

What the cluster offers is read once per tick (`ClusterView`): asking Ray and psutil per worker and per
job made a tick's cost grow with the fleet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.control.decisions import Capacity
from workers.contract.plan import PackPlan


@dataclass(frozen=True)
class ClusterView:
    """One tick's view of the cluster: what a node offers, and the totals packs are counted against."""

    capacity: Capacity  # the most one node offers, for `decisions.infeasible`
    total_cpus: int  # over the cluster: packs that may start at once on a CPU cluster
    total_gpus: int  # over the cluster: packs that may start at once on a GPU cluster
    memory_bytes: int  # one machine's RAM: a CPU worker's budget is a share of it


@dataclass(frozen=True)
class FitOptions:
    """How a pack runs on the cluster, beside its plan: its workers, what each asks of a node, how often
    Ray Train restarts it, where its run keeps its state. Crosses to the pack's Ray task as one typed
    value (pickled by Ray), not as keyword arguments spread from a dict."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    storage_path: str
    num_threads: int | None = None  # torch's threads in each worker (None: torch's default)

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """What each worker asks of a Ray node (no GPU key on a CPU pack)."""
        return {
            "CPU": self.cpus_per_worker,
            **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {}),
        }


class PackRuntime(Protocol):
    """Launches packs, carries messages to and from them, and says when they end."""

    def connect(self) -> None:
        """Be ready to launch (idempotent): e.g. join or start Ray, create the channel."""

    def cluster(self) -> ClusterView:
        """What the cluster offers now (read once per tick)."""

    def launch(self, plan: PackPlan, options: FitOptions) -> Any:
        """Start a pack; returns its handle (opaque to the controller)."""

    def ended(self, handles: Sequence[Any]) -> list[Any]:
        """The handles whose pack has ended (without waiting)."""

    def outcome(self, handle: Any) -> str | None:
        """An ended pack's error text, None if it succeeded; never raises."""

    def kill(self, handle: Any) -> None:
        """End a pack now, recording nothing (as a crash would)."""

    def drain(self) -> list[str]:
        """Event batches (JSON lists of events) posted since the last drain, oldest first."""

    def offer(self, pack_id: str, tasks_json: list[str]) -> None:
        """Offer adapters to a running pack; it takes them as slots free."""

    def cancel(self, pack_id: str, names: list[str]) -> list[str]:
        """Ask a pack to drop `names`; returns those only offered (never taken), withdrawn at once."""

    def ask_yield(self, pack_id: str, names: list[str]) -> None:
        """Ask a pack to let `names` leave at a checkpoint and go back to the queue."""

    def withdraw(self, pack_id: str) -> list[str]:
        """The offers an ended pack never took (task JSON); forgets the pack's mailbox."""
