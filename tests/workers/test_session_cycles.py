"""The clock-cycle planner: budget kept, per-session order kept, whole calls, no session starves."""

from __future__ import annotations

import random

import pytest

from workers.sessions.cycles import PendingOp, Slice, eligible_prefix, plan_cycle


def _fb(op: int, *tokens: int) -> PendingOp:
    return PendingOp(op, "forward_backward", tokens)


def test_a_cycle_takes_each_session_up_to_its_next_optim_step() -> None:
    a = [_fb(1, 10), _fb(2, 10), PendingOp(3, "optim_step"), _fb(4, 10), PendingOp(5, "optim_step")]
    b = [PendingOp(6, "sample"), _fb(7, 5)]
    c = [PendingOp(8, "optim_step"), PendingOp(9, "optim_step")]
    cycle = plan_cycle([("a", a), ("b", b), ("c", c)], budget=100)
    assert cycle.taken == {"a": [1, 2, 3], "b": [6], "c": [8]}
    assert cycle.grad_passes == [[Slice(1, 0, 1), Slice(2, 0, 1)]]
    assert cycle.optim_steps == [3, 8] and cycle.samples == [6]


def test_phases_never_go_backwards_within_a_session() -> None:
    queue = [
        PendingOp(1, "forward", (3,)),
        _fb(2, 3),
        PendingOp(3, "optim_step"),
        PendingOp(4, "sample"),
        PendingOp(5, "state"),
        PendingOp(6, "sample"),
    ]
    assert [op.id for op in eligible_prefix(queue)] == [1, 2, 3, 4, 5]
    assert [op.id for op in eligible_prefix(queue[3:])] == [4, 5]


def test_calls_pack_first_fit_and_an_oversized_call_runs_alone_in_whole_datums() -> None:
    cycle = plan_cycle(
        [("a", [_fb(1, 30, 30)]), ("b", [_fb(2, 50, 40, 30, 20)]), ("c", [_fb(3, 40)]), ("d", [_fb(4, 20)])],
        budget=100,
    )
    assert cycle.grad_passes == [
        [Slice(1, 0, 2), Slice(3, 0, 1)],
        [Slice(2, 0, 2)],
        [Slice(2, 2, 4)],
        [Slice(4, 0, 1)],
    ]


def test_forward_and_forward_backward_passes_are_planned_apart() -> None:
    cycle = plan_cycle([("a", [PendingOp(1, "forward", (10,)), _fb(2, 10)]), ("b", [_fb(3, 10)])], budget=100)
    assert cycle.grad_passes == [[Slice(2, 0, 1), Slice(3, 0, 1)]]
    assert cycle.eval_passes == [[Slice(1, 0, 1)]]


def test_a_datum_over_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="over the pass budget"):
        plan_cycle([("a", [_fb(1, 10, 200)])], budget=100)


def test_random_queues_keep_the_budget_and_every_sessions_order() -> None:
    rng = random.Random(0)
    kinds = ["forward_backward"] * 5 + ["forward", "optim_step", "sample", "state"]
    ids = iter(range(10_000))
    queues = {
        f"s{i}": [
            PendingOp(next(ids), kind, tuple(rng.randint(1, 60) for _ in range(rng.randint(1, 4))))
            if kind in ("forward_backward", "forward")
            else PendingOp(next(ids), kind)
            for kind in rng.choices(kinds, k=rng.randint(0, 12))
        ]
        for i in range(8)
    }
    done: list[int] = []
    for turn in range(200):
        order = sorted(queues, key=lambda s: (turn + int(s[1:])) % 8)
        cycle = plan_cycle([(s, queues[s]) for s in order], budget=100, max_passes=2)
        if cycle.empty:
            break
        assert cycle.passes <= 2 or len([1 for s in cycle.taken.values() for _ in s]) == 1
        for passes in (cycle.grad_passes, cycle.eval_passes):
            for members in passes:
                size = {op.id: op for q in queues.values() for op in q}
                cost = sum(sum(size[s.op].datum_tokens[s.start : s.end]) for s in members)
                assert cost <= 100
        for session, taken in cycle.taken.items():
            queue = queues[session]
            assert taken == [op.id for op in queue[: len(taken)]]  # a prefix, in order
            queues[session] = queue[len(taken) :]
            done += taken
    assert not any(queues.values())
    assert len(done) == len(set(done))


def test_no_session_starves_beside_a_greedy_neighbour() -> None:
    greedy = [_fb(i, 90) for i in range(100)]
    modest = [_fb(1000, 10), PendingOp(1001, "optim_step")]
    served: dict[str, int] = {"greedy": -1, "modest": -1}
    queues = {"greedy": greedy, "modest": modest}
    for turn in range(4):
        order = sorted(queues, key=lambda s: served[s])  # least recently served first, as the host does
        cycle = plan_cycle([(s, queues[s]) for s in order], budget=100, max_passes=2)
        for session, taken in cycle.taken.items():
            queues[session] = queues[session][len(taken) :]
            served[session] = turn
        if not queues["modest"]:
            break
    assert not queues["modest"] and turn <= 1
    assert len(queues["greedy"]) >= 100 - 2 * (turn + 1)


def test_the_pass_budget_solves_the_memory_model_for_tokens() -> None:
    from workers.contract import memory

    dims = memory.model_info_from_config(  # SmolLM2-135M's shape
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
        }
    )
    kw = {"static_bytes": 2**30, "lora_params": 10**6, "lora": memory.LoraInputs(True, True)}
    for budget in (4 * 2**30, 16 * 2**30):
        for varlen in (False, True):
            tokens = memory.pass_token_budget(dims, "bfloat16", budget_bytes=budget, varlen=varlen, **kw)
            assert tokens > 100

            def need(t: int, varlen: bool = varlen) -> int:  # one row of t tokens: the worst layout
                return kw["static_bytes"] + memory.pass_bytes(
                    dims,
                    "bfloat16",
                    tokens=t,
                    width=0 if varlen else t,
                    checkpointing=False,
                    lora=kw["lora"],
                    lora_params=kw["lora_params"],
                )

            assert need(tokens) <= budget < need(tokens + 2)
    assert memory.pass_token_budget(dims, "float32", budget_bytes=2**30, **kw) == 0
