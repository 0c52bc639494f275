"""Clock cycles: which queued session operations a worker runs next, together (a pure decision, no torch).

Each session has a queue of operations in the order its client issued them. A cycle takes, from every
session, the longest prefix of its queue whose phases do not go backwards, with at most one optim_step:

    phase 0  forward_backward / forward (and compute_logprobs): run in packed multi-adapter passes
    phase 1  optim_step: each session's own optimizer, after all passes
    phase 2  sample: batched generation over the shared base, with the weights after the step
    phase 3  state: save_state, load_state, close

so a forward_backward queued after an optim_step waits for the next cycle, and everything a session asked
runs in the order it asked it. Gradient passes (forward_backward) and no-gradient passes (forward) are
planned apart; each holds at most `budget` tokens. A call is never split between passes unless it alone
is bigger than the budget: then it runs in passes of its own, of whole datums (a single datum over the
budget is refused when it is submitted). Calls fill the passes first-fit, in the given session order.

`max_passes` bounds a cycle (and so how long any caller waits for it): a session whose next call would
need one pass too many stops there, and what it queued after that call (its optim_step included) waits
for the next cycle. The host orders the sessions least recently served first, so a session held back is
first in line next time: no session starves, however much its neighbours queue. A cycle with nothing yet
always takes its first call, whatever it costs, so every cycle makes progress.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

OpKind = Literal["forward_backward", "forward", "optim_step", "sample", "state"]
PHASE: dict[str, int] = {"forward_backward": 0, "forward": 0, "optim_step": 1, "sample": 2, "state": 3}


@dataclass(frozen=True)
class PendingOp:
    """One queued operation: its id (unique on the host), its kind and, for a pass, each datum's cost in
    tokens."""

    id: int
    kind: OpKind
    datum_tokens: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(self.datum_tokens)


@dataclass(frozen=True)
class Slice:
    """Datums [start, end) of operation `op` in one pass."""

    op: int
    start: int
    end: int


@dataclass
class Cycle:
    grad_passes: list[list[Slice]] = field(default_factory=list)
    eval_passes: list[list[Slice]] = field(default_factory=list)
    optim_steps: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    states: list[int] = field(default_factory=list)
    taken: dict[str, list[int]] = field(default_factory=dict)  # session -> its op ids, in queue order

    @property
    def empty(self) -> bool:
        return not any(self.taken.values())

    @property
    def passes(self) -> int:
        return len(self.grad_passes) + len(self.eval_passes)


def eligible_prefix(queue: Sequence[PendingOp]) -> list[PendingOp]:
    """The longest prefix of `queue` whose phases never decrease, with at most one optim_step."""
    prefix: list[PendingOp] = []
    phase = 0
    for op in queue:
        p = PHASE[op.kind]
        if p < phase or (op.kind == "optim_step" and phase >= 1):
            break
        prefix.append(op)
        phase = p
    return prefix


def _chunks(op: PendingOp, budget: int) -> list[Slice]:
    """An oversized call's datums in consecutive runs of at most `budget` tokens."""
    slices: list[Slice] = []
    start, used = 0, 0
    for i, n in enumerate(op.datum_tokens):
        if n > budget:
            raise ValueError(f"datum {i} of operation {op.id} has {n} tokens, over the pass budget {budget}")
        if used + n > budget:
            slices.append(Slice(op.id, start, i))
            start, used = i, 0
        used += n
    slices.append(Slice(op.id, start, len(op.datum_tokens)))
    return slices


def plan_cycle(
    queues: Sequence[tuple[str, Sequence[PendingOp]]], budget: int, max_passes: int | None = None
) -> Cycle:
    """The next cycle for these (session, queue) pairs, in the order given (see the module docstring)."""
    if budget <= 0:
        raise ValueError(f"the pass token budget must be positive, got {budget}")
    cycle = Cycle()
    room: dict[tuple[bool, int], int] = {}  # (gradient pass?, index) -> tokens still free
    anything = False
    for session, queue in queues:
        taken: list[int] = []
        for op in eligible_prefix(queue):
            if PHASE[op.kind] == 0 and not _place(cycle, room, op, budget, max_passes, first=not anything):
                break
            if op.kind == "optim_step":
                cycle.optim_steps.append(op.id)
            elif op.kind == "sample":
                cycle.samples.append(op.id)
            elif op.kind == "state":
                cycle.states.append(op.id)
            taken.append(op.id)
            anything = True
        if taken:
            cycle.taken[session] = taken
    return cycle


def _place(
    cycle: Cycle,
    room: dict[tuple[bool, int], int],
    op: PendingOp,
    budget: int,
    max_passes: int | None,
    first: bool,
) -> bool:
    """Put a pass operation into the cycle's passes, or say it does not fit within `max_passes`."""
    grad = op.kind == "forward_backward"
    passes = cycle.grad_passes if grad else cycle.eval_passes
    if not op.datum_tokens:
        raise ValueError(f"operation {op.id} ({op.kind}) has no datums")
    whole = Slice(op.id, 0, len(op.datum_tokens))
    if op.tokens <= budget:
        for index, members in enumerate(passes):
            if room[(grad, index)] >= op.tokens:
                members.append(whole)
                room[(grad, index)] -= op.tokens
                return True
        new, free = [[whole]], [budget - op.tokens]
    else:  # alone, in passes of whole datums that take nothing else
        new = [[s] for s in _chunks(op, budget)]
        free = [0] * len(new)
    if max_passes is not None and cycle.passes + len(new) > max_passes and not first:
        return False
    for members, left in zip(new, free, strict=True):
        room[(grad, len(passes))] = left
        passes.append(members)
    return True
