"""Where queued adapters train next: a pure function from (demands, workers, model shapes) to placements.

Why pure: placement is the one decision in lorafleet that must be fair, never overfill a GPU and never
strand work, and those properties are only checkable if the decision is data in, data out. So this module
imports no Ray, no SQL, no torch and reads no files; the controller gathers the facts (queued adapters,
worker budgets, each base's `config.json` turned into a `BaseModelInfo`), calls `schedule`, and acts on
the `Placement`s. Same input, same output: every choice is ordered by explicit keys, never by set or
dict-hash order.

The rules, in one place:

- **A pack holds one base.** Adapters share a pack only if their `BaseKey` (model, quantization, dtype)
  is equal. An idle worker (`running_base is None`) may open a new pack for one base; a worker already
  running a pack only takes refills of that same base.
- **Memory.** `used_bytes + (base_memory_bytes if a new pack) + sum(adapter_memory_bytes) <=
  memory_bytes`, and `len(running_adapters) + new adapters <= max_adapters`. An idle worker's
  `used_bytes` is normally 0 and is counted like any other; a running pack's is taken as at least its
  base's estimate (a pack always holds its base), so what `unplaceable` rejects is never placed.
- **GPU/CPU.** A GPU demand goes only on GPU workers. A CPU demand goes first on CPU workers; GPU workers
  are offered to CPU demands only after every GPU demand that fits has been placed (so CPU work never
  takes a GPU from GPU work in the same call, but is not stranded on a cluster where every slot has a
  GPU). For a worker that runs a pack, `has_gpu` should describe that pack's device.
- **Order** (`fair_order`, fair share): the next demand served is the one whose project runs the fewest
  adapters now (those already running, from `FairShare`, plus those placed earlier in this call), then
  whose job runs the fewest, then the highest priority, then the oldest (`seq`). So projects take turns,
  and jobs within a project take turns, whatever their queue lengths: one project with 10,000 queued
  adapters (or a priority of 1,000,000) cannot starve another project's single adapter. Priority orders
  work within a fair share; it never buys a larger one.
- **Caps.** A project that runs `FairShare.cap(project)` adapters (the admin's
  `LORAFLEET_PROJECT_MAX_ADAPTERS`, or its override) gets no more placements until one of them leaves;
  `waiting_reasons` says so on each of its waiting adapters.
- **Yielding** (`yields`): when adapters wait for a worker and none is free, an adapter that has trained
  longer than a time slice in its pack is asked to yield (leave at its next optimizer step with a
  checkpoint, back to the queue, resumed later exactly where it left off) if its project runs more
  adapters than the waiting one's, or, within one project, its job runs more than the waiting one's
  (and its priority is not higher). Equal shares on one worker therefore take turns a slice at a time.
- **Maximal.** Demands are placed greedily in that order: a demand joins a pack of its base that has room
  (a running one: refill; or one opened earlier in this call), else opens the idle worker it fits best,
  else waits. Free capacity only shrinks during the pass, so when it ends no unplaced demand fits
  anywhere; the base an idle worker opens is the base of the highest-ranked demand that needed it.
  "Best fit" = the pack or idle worker with the least free memory that still fits (ties: input order),
  which keeps big workers for big demands.

Memory model: the engine's own model of itself, `workers.contract.memory` (an estimate meant to err
high, which `tests/workers/test_memory.py` checks against a real run's peak RSS), called here with what a
demand says: the base's shape (`model_info_from_config`), its `LoraConfig`, its rows (at most
`batch_size * max_seq_len` tokens; packed rows carry no padding between documents) and its device.
A pack's base is paid once; each adapter adds its LoRA state and its activations (the base GEMM runs
over the pack's concatenated rows, so activations add up per adapter), except that a pack that runs its
steps in passes of at most `pass_tokens` (CPU by default) pays one pass's activations once and each
adapter only what its own step has over a pass. Without activation checkpointing: the engine turns it on
by itself only when a pass would not fit the budget in the plan.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from workers.contract import memory
from workers.contract.memory import BaseModelInfo
from workers.contract.plan import LoraConfig

__all__ = [
    "WAITING_FOR_WORKER",
    "AdapterDemand",
    "BaseKey",
    "FairShare",
    "Placement",
    "RunningAdapter",
    "WorkerState",
    "adapter_memory_bytes",
    "base_memory_bytes",
    "fair_order",
    "pass_memory_bytes",
    "schedule",
    "unplaceable",
    "waiting_reasons",
    "yields",
]

_GIB = 2**30
_QUANTIZATIONS = ("none", *memory.QUANT_BYTES)
_MEMORY_FIX = "give workers more memory (`resources.memory_gb_per_worker`)"


# ---- the data ----


@dataclass(frozen=True)
class BaseKey:
    """Adapters may share a pack only if these are equal."""

    base_model: str
    quantization: str  # "none" | "8bit" | "4bit"
    dtype: str  # "float32" | "bfloat16" | "float16"

    def __post_init__(self) -> None:
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"`quantization` must be one of {_QUANTIZATIONS}; got {self.quantization!r}")
        if self.dtype not in memory.DTYPE_BYTES:
            raise ValueError(f"`dtype` must be one of {tuple(memory.DTYPE_BYTES)}; got {self.dtype!r}")

    def __str__(self) -> str:
        return f"{self.base_model} ({self.quantization}/{self.dtype})"


@dataclass(frozen=True)
class AdapterDemand:
    """One queued adapter, reduced to what placement needs: its `LoraConfig` as the spec gave it."""

    adapter_id: str  # unique
    project: str
    base: BaseKey
    priority: int  # higher first
    seq: int  # submission order: FIFO tie-break, unique
    lora: LoraConfig
    batch_size: int
    max_seq_len: int
    needs_gpu: bool
    pass_tokens: int | None = None  # the pack runs steps in passes of at most this many tokens (None: one)
    job: str = ""  # the job it belongs to: jobs of one project share its workers fairly

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` of {self.adapter_id!r} must be > 0; got {getattr(self, name)}")


@dataclass(frozen=True)
class WorkerState:
    """A worker slot and what runs on it now."""

    worker_id: str
    memory_bytes: int  # budget: GPU memory on a GPU worker, else its share of RAM
    has_gpu: bool
    max_adapters: int
    running_base: BaseKey | None  # base of the pack running there now; None if idle
    running_adapters: tuple[str, ...]  # adapter ids in that pack
    used_bytes: int  # memory estimate of what runs there now (base + adapters)

    def __post_init__(self) -> None:
        if self.running_base is None and self.running_adapters:
            raise ValueError(
                f"worker {self.worker_id!r} has `running_adapters` {list(self.running_adapters)[:3]} "
                "but no `running_base`; give the base of the pack they run in"
            )
        if self.max_adapters < 0 or self.memory_bytes < 0 or self.used_bytes < 0:
            raise ValueError(
                f"worker {self.worker_id!r}: `max_adapters`, `memory_bytes` and `used_bytes` must be >= 0; "
                f"got {self.max_adapters}, {self.memory_bytes}, {self.used_bytes}"
            )


@dataclass(frozen=True)
class FairShare:
    """What already runs, per project and per (project, job), and the caps on a project's running
    adapters: what fair placement needs beyond the demands and the workers. The controller counts every
    running pack (all shapes), so shares are fair across the cluster, not per worker."""

    project_running: Mapping[str, int] = field(default_factory=dict)
    job_running: Mapping[tuple[str, str], int] = field(default_factory=dict)
    default_cap: int | None = None  # most adapters one project may run at once; None: no cap
    caps: Mapping[str, int] = field(default_factory=dict)  # per-project overrides of `default_cap`

    def cap(self, project: str) -> int | None:
        return self.caps.get(project, self.default_cap)


@dataclass(frozen=True)
class RunningAdapter:
    """An adapter training in a pack, reduced to what the yield rule needs."""

    adapter_id: str
    project: str
    job: str
    priority: int
    base: BaseKey
    ran_seconds: float | None  # since it began training in this pack (None: not begun yet)
    alone: bool  # the only adapter of its pack: its leaving frees a whole worker, for any base


@dataclass(frozen=True)
class Placement:
    """Adapters to start on one worker: a new pack (`refill=False`) or additions to its running pack."""

    worker_id: str
    base: BaseKey
    adapter_ids: tuple[str, ...]  # in rank order
    refill: bool
    estimated_bytes: int  # the worker's whole estimate after this placement: used + (base) + adapters


# ---- memory: `workers.contract.memory` with a demand's facts ----


def base_memory_bytes(base: BaseKey, info: BaseModelInfo) -> int:
    """The loaded base on a worker (`memory.base_bytes`)."""
    return memory.base_bytes(info, base.quantization, base.dtype)


def _activation_bytes(
    info: BaseModelInfo, demand: AdapterDemand, checkpointing: bool = False, tokens: int | None = None
) -> int:
    """Activations of `tokens` of the demand's rows (default: all of them, `batch_size * max_seq_len`)."""
    return memory.activation_bytes(
        info,
        demand.base.dtype,
        tokens=demand.batch_size * demand.max_seq_len if tokens is None else tokens,
        width=demand.max_seq_len,
        checkpointing=checkpointing,
        targets=demand.lora.target_modules,
        cpu=not demand.needs_gpu,
    )


def pass_memory_bytes(demand: AdapterDemand, info: BaseModelInfo, checkpointing: bool = False) -> int:
    """Activations of one pass, which a pack that runs its steps in passes pays once, whatever its K
    (passes run one after the other); 0 for a pack that runs each step as one pass."""
    if demand.pass_tokens is None:
        return 0
    return _activation_bytes(info, demand, checkpointing, tokens=demand.pass_tokens)


def adapter_memory_bytes(demand: AdapterDemand, info: BaseModelInfo, checkpointing: bool = False) -> int:
    """What one adapter adds to a pack: LoRA state + activations of its rows (module doc).

    A pack that runs its steps in passes (`pass_tokens`; CPU by default) pays one pass's activations once
    (`pass_memory_bytes`), and an adapter adds only what its own step has over a pass (it then gets a pass
    of its own). `checkpointing`: with activation checkpointing on (the engine's
    `activation_checkpointing: on`, or `auto` under a budget the pack would not fit otherwise), activations
    are much smaller.
    """
    params = memory.lora_param_count(info, demand.lora)
    return _state_bytes(demand, params) + _activation_bytes(
        info, demand, checkpointing, tokens=_own_tokens(demand)
    )


def _state_bytes(demand: AdapterDemand, params: int) -> int:
    return memory.lora_bytes_per_param(demand.base.dtype, cpu=not demand.needs_gpu) * params


def _own_tokens(demand: AdapterDemand) -> int:
    """The tokens of the demand's step that a pass does not already pay for."""
    tokens = demand.batch_size * demand.max_seq_len
    return tokens if demand.pass_tokens is None else max(0, tokens - demand.pass_tokens)


# ---- order ----


class _Shares:
    """Running adapters per project and per job while one pass hands out places (counts only grow)."""

    def __init__(self, share: FairShare) -> None:
        self.share = share
        self.project: Counter[str] = Counter(share.project_running)
        self.job: Counter[tuple[str, str]] = Counter(share.job_running)

    def capped(self, project: str) -> bool:
        cap = self.share.cap(project)
        return cap is not None and self.project[project] >= cap

    def add(self, project: str, job: str, n: int = 1) -> None:
        self.project[project] += n
        self.job[(project, job)] += n


def _fair_pass(
    demands: Sequence[AdapterDemand], shares: _Shares, serve: Callable[[AdapterDemand], bool]
) -> None:
    """Offer each demand to `serve` once, in fair-share order (module doc); a served demand counts for
    its project and job from then on, so the next turn goes to whoever runs the fewest. Demands of a
    project at its cap are not offered.

    One FIFO queue per (project, job), ordered by (-priority, seq); a heap of the queues keyed by their
    head's (project count, job count, -priority, seq, id). Counts only grow, so a key taken from the heap
    that is stale is pushed back with its current value (lazy update): O(n log n) for n demands.
    """
    queues: dict[tuple[str, str], deque[AdapterDemand]] = {}
    for d in sorted(demands, key=lambda d: (-d.priority, d.seq, d.adapter_id)):
        queues.setdefault((d.project, d.job), deque()).append(d)

    def key(queue: tuple[str, str]) -> tuple[int, int, int, int, str]:
        head = queues[queue][0]
        return (shares.project[queue[0]], shares.job[queue], -head.priority, head.seq, head.adapter_id)

    heap = [(key(q), q) for q in queues]
    heapq.heapify(heap)
    while heap:
        taken, queue = heapq.heappop(heap)
        now = key(queue)
        if now != taken:
            heapq.heappush(heap, (now, queue))
            continue
        d = queues[queue].popleft()
        if not shares.capped(d.project) and serve(d):
            shares.add(d.project, d.job)
        if queues[queue]:
            heapq.heappush(heap, (key(queue), queue))


def fair_order(demands: Sequence[AdapterDemand], share: FairShare | None = None) -> list[AdapterDemand]:
    """Demands in the order `schedule` serves them if each one is placed (uncapped): the next is always
    the oldest highest-priority demand of the job that runs the fewest adapters in the project that runs
    the fewest (`share` holds what runs already). So projects take turns, then jobs within a project;
    priority and then `seq` decide within a turn and between equal shares."""
    order: list[AdapterDemand] = []
    uncapped = FairShare((share or FairShare()).project_running, (share or FairShare()).job_running)
    _fair_pass(demands, _Shares(uncapped), lambda d: order.append(d) is None)
    return order


# ---- placement ----


class _Pool:
    """Free capacity of a set of workers (all GPU or all CPU) while one `schedule` call fills them.

    Each worker with a free slot sits in exactly one sorted list of `(free_bytes, input_order)`: `idle`,
    or `open[base]` for a pack (running, or opened in this call). A best-fit lookup is one bisect.
    """

    def __init__(self, workers: Sequence[tuple[int, WorkerState]], used: Sequence[int]) -> None:
        self.free: dict[int, int] = {}
        self.slots: dict[int, int] = {}
        self.idle: list[tuple[int, int]] = []
        self.open: dict[BaseKey, list[tuple[int, int]]] = {}
        for order, w in workers:
            free, slots = w.memory_bytes - used[order], w.max_adapters - len(w.running_adapters)
            self.free[order], self.slots[order] = free, slots
            if slots <= 0:
                continue
            if w.running_base is None:
                self.idle.append((free, order))
            else:
                self.open.setdefault(w.running_base, []).append((free, order))
        self.idle.sort()
        for packs in self.open.values():
            packs.sort()

    def place(self, base: BaseKey, need: int, base_need: int) -> tuple[int, bool] | None:
        """Put one adapter of `base` needing `need` bytes somewhere; (worker order, opened a pack) or None."""
        packs = self.open.get(base)
        if packs:
            i = bisect_left(packs, (need, -1))
            if i < len(packs):
                _, order = packs.pop(i)
                self._take(order, need, packs)
                return order, False
        i = bisect_left(self.idle, (need + base_need, -1))
        if i < len(self.idle):
            _, order = self.idle.pop(i)
            self._take(order, need + base_need, self.open.setdefault(base, []))
            return order, True
        return None

    def _take(self, order: int, need: int, packs: list[tuple[int, int]]) -> None:
        self.free[order] -= need
        self.slots[order] -= 1
        if self.slots[order] > 0:
            insort(packs, (self.free[order], order))


def _adapter_sizer(infos: Mapping[BaseKey, BaseModelInfo]) -> Callable[[AdapterDemand], int]:
    """`adapter_memory_bytes`, with the LoRA parameters per rank of each (base, targets) counted once."""
    per_rank: dict[tuple[BaseKey, tuple[str, ...] | str], int] = {}

    def size(d: AdapterDemand) -> int:
        targets = d.lora.target_modules
        key = (d.base, targets if isinstance(targets, str) else tuple(targets))
        if key not in per_rank:
            per_rank[key] = memory.lora_params_per_rank(infos[d.base], targets)
        act = _activation_bytes(infos[d.base], d, tokens=_own_tokens(d))
        return _state_bytes(d, d.lora.r * per_rank[key]) + act

    return size


def _used_bytes(worker: WorkerState, infos: Mapping[BaseKey, BaseModelInfo]) -> int:
    """`used_bytes`, but never less than the running base's own estimate."""
    base = worker.running_base
    if base is None or base not in infos:  # no info: no demand of that base, so no refill to size
        return worker.used_bytes
    return max(worker.used_bytes, base_memory_bytes(base, infos[base]))


def _check_inputs(
    demands: Sequence[AdapterDemand], workers: Sequence[WorkerState], infos: Mapping[BaseKey, BaseModelInfo]
) -> None:
    for what, ids in (
        ("adapter_id", [d.adapter_id for d in demands]),
        ("worker_id", [w.worker_id for w in workers]),
    ):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise ValueError(f"each `{what}` must be unique; repeated: {repeated[:5]}")
    missing = {d.base for d in demands} - set(infos)
    if missing:
        names = sorted(str(b) for b in missing)
        raise ValueError(f"no `BaseModelInfo` given for {names[:5]}; pass one per base of the demands")


def schedule(
    demands: Sequence[AdapterDemand],
    workers: Sequence[WorkerState],
    infos: Mapping[BaseKey, BaseModelInfo],
    share: FairShare | None = None,
) -> list[Placement]:
    """Place every demand that fits, in fair-share order, by the module's rules; one placement per worker.

    Demands already in some worker's `running_adapters` are skipped, and so are demands of a project at
    its cap (`share`: what runs already and the caps; default: nothing, no caps). Placements come in the
    order their worker was first used, so the highest-ranked work is launched first. `infos` must cover
    the base of every demand (ValueError otherwise); ids must be unique.
    """
    _check_inputs(demands, workers, infos)
    running = {a for w in workers for a in w.running_adapters}
    base_bytes = {b: base_memory_bytes(b, infos[b]) for b in sorted({d.base for d in demands}, key=str)}
    used = [_used_bytes(w, infos) for w in workers]
    indexed = list(enumerate(workers))
    gpu = _Pool([(k, w) for k, w in indexed if w.has_gpu], used)
    cpu = _Pool([(k, w) for k, w in indexed if not w.has_gpu], used)
    placed: dict[int, list[str]] = {}  # worker order -> adapter ids; insertion order = first use
    opened: dict[int, BaseKey] = {}  # idle workers given a new pack -> its base
    added: dict[int, int] = {}
    need_of = _adapter_sizer(infos)

    def put(pool: _Pool, d: AdapterDemand, need: int) -> bool:
        opening = base_bytes[d.base] + pass_memory_bytes(d, infos[d.base])
        where = pool.place(d.base, need, opening)
        if where is None:
            return False
        order, new_pack = where
        placed.setdefault(order, []).append(d.adapter_id)
        added[order] = added.get(order, 0) + need + (opening if new_pack else 0)
        if new_pack:
            opened[order] = d.base
        return True

    spill: list[AdapterDemand] = []

    def first_pass(d: AdapterDemand) -> bool:
        if d.needs_gpu:
            return put(gpu, d, need_of(d))
        if put(cpu, d, need_of(d)):
            return True
        spill.append(d)
        return False

    shares = _Shares(share or FairShare())
    _fair_pass([d for d in demands if d.adapter_id not in running], shares, first_pass)
    # GPU workers take CPU work only once no GPU demand fits them any more
    _fair_pass(spill, shares, lambda d: put(gpu, d, need_of(d)))

    placements = []
    for order, ids in placed.items():
        w = workers[order]
        refill = order not in opened
        base = w.running_base if refill else opened[order]
        assert base is not None
        placements.append(Placement(w.worker_id, base, tuple(ids), refill, used[order] + added[order]))
    return placements


def unplaceable(
    demands: Sequence[AdapterDemand], workers: Sequence[WorkerState], infos: Mapping[BaseKey, BaseModelInfo]
) -> list[tuple[str, str]]:
    """`(adapter_id, reason)` for each demand that would not fit even on an empty worker it may use.

    Judged against every worker as if idle (its `memory_bytes` and `max_adapters`, not what runs there),
    so pass the cluster's workers, busy ones included. Anything listed here `schedule` never places; the
    reason names the numbers and the fix.
    """
    _check_inputs(demands, workers, infos)
    usable = [w for w in workers if w.max_adapters >= 1]
    largest_gpu = max((w.memory_bytes for w in usable if w.has_gpu), default=None)
    largest_any = max((w.memory_bytes for w in usable), default=None)
    base_bytes: dict[BaseKey, int] = {}
    need_of = _adapter_sizer(infos)
    out = []
    for d in demands:
        largest = largest_gpu if d.needs_gpu else largest_any
        kind = "GPU worker" if d.needs_gpu else "worker"
        if largest is None:
            if d.needs_gpu and any(w.has_gpu for w in workers):
                reason = "every GPU worker has `max_adapters` 0; raise `resources.max_adapters_per_worker`"
            elif d.needs_gpu:
                reason = (
                    f"needs a GPU worker, but none of the {len(workers)} workers has a GPU; add GPU nodes to "
                    "the cluster or set `resources.gpus_per_worker: 0`"
                )
            else:
                reason = (
                    f"none of the {len(workers)} workers can take an adapter (`max_adapters` 0 or no "
                    "workers); raise `resources.max_adapters_per_worker` or add workers"
                )
            out.append((d.adapter_id, reason))
            continue
        if d.base not in base_bytes:
            base_bytes[d.base] = base_memory_bytes(d.base, infos[d.base])
        base, adapter = base_bytes[d.base], need_of(d) + pass_memory_bytes(d, infos[d.base])
        if base + adapter <= largest:
            continue
        head = (
            f"needs {_gib(base + adapter)} on one worker (base {d.base}: {_gib(base)} + this adapter: "
            f"{_gib(adapter)}), but the largest {kind} has {_gib(largest)}"
        )
        if base >= largest:
            quantize = "quantize it (`quantization: 8bit` or `4bit`), "
            quantize = "" if d.base.quantization == "4bit" else quantize
            fix = f"the base alone does not fit: {quantize}use a smaller base, or {_MEMORY_FIX}"
        else:
            act = _activation_bytes(infos[d.base], d)
            fix = (
                f"activations are {_gib(act)} of it: lower `train.batch_size` (now {d.batch_size}) or "
                f"`train.max_seq_len` (now {d.max_seq_len}), or `lora.r` (now {d.lora.r}), or {_MEMORY_FIX}"
            )
        out.append((d.adapter_id, f"{head}; {fix}"))
    return out


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f} GiB"


# ---- waiting and yielding ----


WAITING_FOR_WORKER = "waiting for a free worker: every worker that could take it is busy"


def waiting_reasons(
    demands: Sequence[AdapterDemand], placements: Sequence[Placement], share: FairShare | None = None
) -> dict[str, str]:
    """Why each demand that `placements` leave unplaced waits, in words a user can act on: its project
    is at its cap, or every worker that could take it is busy. (Demands that can never fit are
    `unplaceable`'s; a child waiting for its parent is the controller's.)"""
    share = share or FairShare()
    placed = {i for p in placements for i in p.adapter_ids}
    running = Counter(share.project_running)
    by_id = {d.adapter_id: d for d in demands}
    for adapter_id in placed:
        running[by_id[adapter_id].project] += 1
    reasons = {}
    for d in demands:
        if d.adapter_id in placed:
            continue
        cap = share.cap(d.project)
        if cap is not None and running[d.project] >= cap:
            reasons[d.adapter_id] = (
                f"waiting: project {d.project!r} runs {running[d.project]} adapters, its cap "
                f"(LORAFLEET_PROJECT_MAX_ADAPTERS / LORAFLEET_PROJECT_CAPS) is {cap}"
            )
        else:
            reasons[d.adapter_id] = WAITING_FOR_WORKER
    return reasons


def yields(
    waiting: Sequence[AdapterDemand],
    running: Sequence[RunningAdapter],
    leaving: Collection[str],
    slice_seconds: float,
) -> list[tuple[str, str]]:
    """Running adapters to ask to yield so that `waiting` demands (those left waiting for a free worker,
    not those at their project's cap) get their fair share: `(running id, waiting id it makes room for)`,
    in the order chosen. (The controller hands the place over: it offers the waiting adapter to the
    yielding one's pack when it can join it, so no new pack has to start.)

    Waiting demands are served in fair-share order. Each first takes a place that an adapter already
    asked to yield (`leaving`) will free; else it takes the place of a running adapter that (1) began
    training in its pack at least `slice_seconds` ago, (2) frees a place the demand can use (it is alone
    in its pack, or shares the demand's base), and (3) holds more than a fair share: its project runs more
    adapters than the demand's, or, in the same project, its job runs more than the demand's and its
    priority is not higher. Among those, the one of the project (then job) running the most, lowest
    priority, longest running goes first. Counts move with each choice, so no project is asked to give up
    more than brings it level, and two equal shares on one worker take turns a slice at a time.
    """
    by_id = {r.adapter_id: r for r in running}
    staying = [r for r in running if r.adapter_id not in leaving]
    shares = _Shares(FairShare())
    for r in staying:
        shares.add(r.project, r.job)
    freed = sorted((by_id[i] for i in leaving if i in by_id), key=lambda r: r.adapter_id)
    chosen: list[tuple[str, str]] = []
    candidates = [r for r in staying if r.ran_seconds is not None and r.ran_seconds >= slice_seconds]

    def usable(r: RunningAdapter, d: AdapterDemand) -> bool:
        return r.alone or r.base == d.base

    def serve(d: AdapterDemand) -> bool:
        spot = next((r for r in freed if usable(r, d)), None)
        if spot is not None:
            freed.remove(spot)
            return True
        mine = shares.project[d.project]
        fair = [
            r
            for r in candidates
            if usable(r, d)
            and (
                shares.project[r.project] > mine
                or (
                    r.project == d.project
                    and shares.job[(r.project, r.job)] > shares.job[(d.project, d.job)]
                    and r.priority <= d.priority
                )
            )
        ]
        if not fair:
            return False
        victim = min(
            fair,
            key=lambda r: (
                -shares.project[r.project],
                -shares.job[(r.project, r.job)],
                r.priority,
                -(r.ran_seconds or 0.0),
                r.adapter_id,
            ),
        )
        candidates.remove(victim)
        chosen.append((victim.adapter_id, d.adapter_id))
        shares.add(victim.project, victim.job, -1)
        return True

    _fair_pass(waiting, shares, serve)
    return chosen
