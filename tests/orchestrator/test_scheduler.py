"""The pure scheduler: the rules one by one, then properties over random fleets and queues.

The property checker below re-derives every rule from the public memory functions, independently of the
scheduler's internal bookkeeping: no adapter placed twice or while running, budgets and slots respected,
one base per pack, GPU work on GPUs only, and maximality (after the placements, no unplaced demand fits).
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduling.scheduler import (
    AdapterDemand,
    BaseKey,
    FairShare,
    Placement,
    RunningAdapter,
    WorkerState,
    adapter_memory_bytes,
    base_memory_bytes,
    fair_order,
    pass_memory_bytes,
    schedule,
    unplaceable,
    waiting_reasons,
    yields,
)
from workers.contract.memory import (
    CPU_LORA_BYTES_PER_PARAM,
    CPU_LORA_BYTES_PER_PARAM_BELOW_FP32,
    CPU_PASS_TOKENS,
    RUNTIME_OVERHEAD_BYTES,
    BaseModelInfo,
    default_pass_tokens,
    lora_param_count,
    model_info_from_config,
)
from workers.contract.plan import LoraConfig

GIB = 2**30
REPO = Path(__file__).resolve().parents[2]

TINY_CONFIG = {  # what workers/bases/tiny.py writes for "tiny"
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}
MID_CONFIG = {**TINY_CONFIG, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 10}
MID_CONFIG.update(num_attention_heads=6, head_dim=64)

A = BaseKey("models/tiny", "none", "float32")
B = BaseKey("models/tiny", "none", "bfloat16")  # same weights, other dtype: another base
C = BaseKey("models/mid", "none", "float32")
INFOS = {A: model_info_from_config(TINY_CONFIG), B: model_info_from_config(TINY_CONFIG)}
INFOS[C] = model_info_from_config(MID_CONFIG)

_seq = itertools.count()


def lora(r: int, targets: tuple[str, ...] | str) -> LoraConfig:
    return LoraConfig(r=r, target_modules=targets if isinstance(targets, str) else list(targets))


def demand(
    adapter_id: str,
    *,
    project: str = "p",
    base: BaseKey = A,
    priority: int = 0,
    seq: int | None = None,
    r: int = 8,
    targets: tuple[str, ...] | str = ("q_proj", "v_proj"),
    batch_size: int = 4,
    max_seq_len: int = 256,
    gpu: bool = False,
) -> AdapterDemand:
    seq = next(_seq) if seq is None else seq
    return AdapterDemand(
        adapter_id, project, base, priority, seq, lora(r, targets), batch_size, max_seq_len, needs_gpu=gpu
    )


def worker(
    worker_id: str,
    memory: int,
    *,
    gpu: bool = False,
    max_adapters: int = 8,
    base: BaseKey | None = None,
    running: tuple[str, ...] = (),
    used: int = 0,
) -> WorkerState:
    return WorkerState(worker_id, memory, gpu, max_adapters, base, running, used)


def need(d: AdapterDemand) -> int:
    return adapter_memory_bytes(d, INFOS[d.base])


def base_need(base: BaseKey = A) -> int:
    return base_memory_bytes(base, INFOS[base])


def placed_ids(placements: list[Placement]) -> list[str]:
    return [i for p in placements for i in p.adapter_ids]


# ---- model info and memory ----


def test_model_info_counts_a_llama_exactly():
    info = model_info_from_config(TINY_CONFIG)
    # 139,584 is what transformers' LlamaForCausalLM built from this config holds.
    assert info.n_params == 139_584
    assert (info.hidden_size, info.intermediate_size, info.num_layers, info.vocab_size) == (64, 128, 2, 512)
    assert dict((n, (i, o)) for n, i, o in info.linear_shapes) == {
        "self_attn.q_proj": (64, 64),
        "self_attn.k_proj": (64, 32),
        "self_attn.v_proj": (64, 32),
        "self_attn.o_proj": (64, 64),
        "mlp.gate_proj": (64, 128),
        "mlp.up_proj": (64, 128),
        "mlp.down_proj": (128, 64),
    }
    tied = model_info_from_config({**TINY_CONFIG, "tie_word_embeddings": True})
    assert info.n_params - tied.n_params == 512 * 64


def test_model_info_from_a_multimodal_config_uses_its_text_config():
    assert model_info_from_config({"text_config": TINY_CONFIG}) == model_info_from_config(TINY_CONFIG)


def test_model_info_names_missing_keys_and_refuses_mixtures_of_experts():
    with pytest.raises(ValueError, match=r"lacks \['intermediate_size'\].*LLaMA"):
        model_info_from_config({k: v for k, v in TINY_CONFIG.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="8 experts"):
        model_info_from_config({**TINY_CONFIG, "num_local_experts": 8})


def test_lora_params_follow_targets():
    info = INFOS[A]
    per_layer_qv = (64 + 64) + (64 + 32)
    assert lora_param_count(info, lora(8, ("q_proj", "v_proj"))) == 8 * 2 * per_layer_qv
    assert lora_param_count(info, lora(8, ("self_attn.q_proj", "v_proj"))) == 8 * 2 * per_layer_qv
    everything = sum(i + o for _, i, o in info.linear_shapes)
    assert lora_param_count(info, lora(4, "all-linear")) == 4 * 2 * everything
    assert lora_param_count(info, lora(4, ("nonexistent",))) == 0


def test_memory_estimates_move_the_right_way():
    info = INFOS[A]
    head_chunk = 2 * 128 * 2**20  # one chunk of fp32 logits + logsumexp's temporary
    assert base_memory_bytes(A, info) == info.n_params * 4 + RUNTIME_OVERHEAD_BYTES + head_chunk
    big = BaseKey("m", "none", "bfloat16"), BaseKey("m", "8bit", "bfloat16"), BaseKey("m", "4bit", "bfloat16")
    sizes = [base_memory_bytes(b, INFOS[C]) for b in big]
    assert sizes[0] > sizes[1] > sizes[2] > RUNTIME_OVERHEAD_BYTES
    d = demand("x")
    assert need(replace(d, lora=lora(16, ("q_proj", "v_proj")))) > need(d)
    assert need(replace(d, batch_size=8)) > need(d)
    assert need(replace(d, max_seq_len=512)) > need(d)
    assert need(replace(d, lora=lora(8, "all-linear"))) > need(d)
    assert need(replace(d, base=B)) < need(d)  # bf16 activations
    assert need(replace(d, needs_gpu=True)) < need(d)  # no CPU allocator fragmentation
    deep = replace(d, base=C)  # 10 layers: checkpointing keeps 2 layers' sets + every layer's input
    assert adapter_memory_bytes(deep, INFOS[C], checkpointing=True) < adapter_memory_bytes(deep, INFOS[C])
    lora_state = CPU_LORA_BYTES_PER_PARAM * lora_param_count(info, lora(8, ("q_proj", "v_proj")))
    # activations (workers.contract.memory): per layer (4 h + 3 i) x 4 bytes + 2.25 h fp32 = 5184 bytes; kept
    # by 2 layers, + 1 layer of gradients, + half a layer per layer of CPU fragmentation; + 2 h fp32 and a
    # 256-byte mask row outside the layers
    layer = (4 * 64 + 3 * 128) * 4 + 2.25 * 64 * 4
    assert need(d) == lora_state + 4 * 256 * (2 * layer + layer + 0.5 * 2 * layer + 2 * 64 * 4 + 256)


def test_cpu_adapters_on_a_bf16_base_count_the_allocator_growth_measured_below_fp32():
    """On CPU a bf16 pack's resident set grows by more per adapter than an fp32 one's
    (workers.contract.memory)."""
    info = INFOS[A]
    passes = replace(
        demand("x", batch_size=4, max_seq_len=256), pass_tokens=1024
    )  # no activations of its own
    params = lora_param_count(info, lora(8, ("q_proj", "v_proj")))
    assert need(passes) == CPU_LORA_BYTES_PER_PARAM * params
    assert need(replace(passes, base=B)) == CPU_LORA_BYTES_PER_PARAM_BELOW_FP32 * params
    assert adapter_memory_bytes(replace(passes, base=B, needs_gpu=True), info) < need(passes)  # GPU: state


def test_a_pack_that_runs_in_passes_pays_one_pass_of_activations_once():
    """The engine runs a CPU pack's step as passes of whole adapters (`CPU_PASS_TOKENS` by default), so
    its activations are one pass's whatever its K; an adapter adds its LoRA state, and only the part of its
    own step that is over a pass."""
    assert default_pass_tokens(needs_gpu=False, max_tokens_per_pass=None, step_tokens=8192) == CPU_PASS_TOKENS
    assert default_pass_tokens(needs_gpu=True, max_tokens_per_pass=None, step_tokens=8192) is None
    assert default_pass_tokens(needs_gpu=True, max_tokens_per_pass=4096, step_tokens=8192) == 4096
    assert default_pass_tokens(needs_gpu=False, max_tokens_per_pass=10**6, step_tokens=8192) == 8192
    info = INFOS[A]
    one_pass = demand("x", batch_size=4, max_seq_len=256)  # 1,024 tokens a step
    passes = replace(one_pass, pass_tokens=1024)
    lora_state = CPU_LORA_BYTES_PER_PARAM * lora_param_count(info, lora(8, ("q_proj", "v_proj")))
    assert need(passes) == lora_state
    assert (
        pass_memory_bytes(passes, info) == need(one_pass) - lora_state
        and pass_memory_bytes(one_pass, info) == 0
    )
    assert need(replace(passes, batch_size=8)) == lora_state + pass_memory_bytes(passes, info)  # 1,024 over

    eight = [replace(passes, adapter_id=f"a{k}", seq=k) for k in range(8)]
    exact = base_need() + pass_memory_bytes(passes, info) + 8 * lora_state
    assert placed_ids(schedule(eight, [worker("w", exact)], INFOS)) == [f"a{k}" for k in range(8)]
    assert len(placed_ids(schedule(eight, [worker("w", exact - 1)], INFOS))) == 7
    whole = [replace(d, pass_tokens=None) for d in eight]  # one pass a step: every adapter's activations
    assert len(placed_ids(schedule(whole, [worker("w", exact)], INFOS))) < 8
    assert unplaceable(eight[:1], [worker("w", base_need() + lora_state)], INFOS)  # the pass is counted


# ---- the rules ----


def test_a_pack_holds_one_base_and_an_idle_worker_opens_the_top_ranked_base():
    demands = [demand("b1", base=B, priority=1), demand("a1", base=A), demand("b2", base=B)]
    roomy = worker("w", 10 * GIB)
    (p,) = schedule(demands, [roomy], INFOS)
    assert p == Placement("w", B, ("b1", "b2"), False, base_need(B) + need(demands[0]) + need(demands[2]))
    two = schedule(demands, [roomy, worker("v", 10 * GIB)], INFOS)
    assert [(p.worker_id, p.base, p.adapter_ids) for p in two] == [("w", B, ("b1", "b2")), ("v", A, ("a1",))]


def test_a_running_pack_takes_refills_of_its_own_base_only():
    running = worker("w", 10 * GIB, base=A, running=("old",), used=GIB)
    assert schedule([demand("b", base=B)], [running], INFOS) == []
    d = demand("a")
    assert schedule([d, demand("b", base=B)], [running], INFOS) == [
        Placement("w", A, ("a",), True, GIB + need(d))
    ]


def test_the_budget_is_respected_to_the_byte():
    ds = [demand(f"a{k}") for k in range(5)]
    exact = base_need() + 3 * need(ds[0])
    assert placed_ids(schedule(ds, [worker("w", exact)], INFOS)) == ["a0", "a1", "a2"]
    assert placed_ids(schedule(ds, [worker("w", exact - 1)], INFOS)) == ["a0", "a1"]
    refill = worker("w", 5 * GIB, base=A, running=("x",), used=5 * GIB - 2 * need(ds[0]))
    assert placed_ids(schedule(ds, [refill], INFOS)) == ["a0", "a1"]
    assert schedule(ds, [worker("w", base_need() + need(ds[0]) - 1)], INFOS) == []


def test_max_adapters_counts_the_running_ones():
    ds = [demand(f"a{k}") for k in range(5)]
    running = worker("w", 10 * GIB, max_adapters=4, base=A, running=("x", "y", "z"), used=GIB)
    assert placed_ids(schedule(ds, [running], INFOS)) == ["a0"]
    assert placed_ids(schedule(ds, [worker("w", 10 * GIB, max_adapters=2)], INFOS)) == ["a0", "a1"]
    assert schedule(ds, [worker("w", 10 * GIB, max_adapters=0)], INFOS) == []


def test_priority_beats_submission_order():
    ds = [demand("old-low", seq=0), demand("new-high", seq=1, priority=5)]
    assert placed_ids(schedule(ds, [worker("w", 10 * GIB, max_adapters=1)], INFOS)) == ["new-high"]


def test_a_big_project_cannot_starve_a_small_one():
    flood = [demand(f"big-{k}", project="big", seq=k) for k in range(1000)]
    late = [demand("small-0", project="small", seq=1000), demand("tiny-0", project="tiny", seq=1001)]
    placed = placed_ids(schedule(flood + late, [worker("w", 100 * GIB, max_adapters=3)], INFOS))
    assert placed == ["big-0", "small-0", "tiny-0"]


def test_fair_order_gives_the_next_turn_to_the_project_running_the_fewest():
    ds = [
        demand("a0", project="a", seq=0),
        demand("a1", project="a", seq=1),
        demand("a2", project="a", seq=2),
        demand("b3", project="b", seq=3),
        demand("b4", project="b", seq=4),
        demand("c5", project="c", seq=5, priority=1),
        demand("b-1", project="b", seq=-1, priority=1),
    ]
    order = [d.adapter_id for d in fair_order(list(reversed(ds)))]
    # equal shares: priority, then age; then whoever runs the fewest (a after a0 and b after b-1 tie at
    # one each, and a1 is older than b3)
    assert order == ["b-1", "c5", "a0", "a1", "b3", "a2", "b4"]
    # what runs already counts: b runs 2, so a and c go first until they are level with it
    running = FairShare(project_running={"b": 2})
    order = [d.adapter_id for d in fair_order(ds, running)]
    assert order == ["c5", "a0", "a1", "b-1", "a2", "b3", "b4"]


def test_a_huge_priority_does_not_buy_a_bigger_share():
    hog = [demand(f"hog-{k}", project="hog", priority=1_000_000, seq=k) for k in range(5)]
    late = demand("small", project="small", seq=100)
    placed = placed_ids(schedule([*hog, late], [worker("w", 100 * GIB, max_adapters=2)], INFOS))
    assert placed == ["hog-0", "small"]


def test_jobs_of_one_project_take_turns_too():
    first = [replace(demand(f"first-{k}", seq=k), job="first") for k in range(4)]
    second = replace(demand("second-0", seq=10), job="second")
    share = FairShare(project_running={"p": 1}, job_running={("p", "first"): 1})
    placed = placed_ids(schedule([*first, second], [worker("w", 100 * GIB, max_adapters=2)], INFOS, share))
    assert placed == ["second-0", "first-0"]


def test_a_project_at_its_cap_waits_and_says_why():
    ds = [demand(f"a{k}", project="a", seq=k) for k in range(4)] + [demand("b0", project="b", seq=9)]
    workers = [worker("w", 100 * GIB)]
    share = FairShare(project_running={"a": 1}, default_cap=3, caps={"b": 0})
    placements = schedule(ds, workers, INFOS, share)
    assert placed_ids(placements) == ["a0", "a1"]  # a runs 1 already: 2 more reach its cap of 3
    reasons = waiting_reasons(ds, placements, share)
    assert set(reasons) == {"a2", "a3", "b0"}
    assert "project 'a' runs 3 adapters, its cap" in reasons["a2"] and reasons["a2"].endswith("is 3")
    assert reasons["b0"].endswith("is 0")
    uncapped = schedule(ds, workers, INFOS, FairShare(project_running={"a": 1}))
    assert len(placed_ids(uncapped)) == 5
    busy = waiting_reasons(ds, [], FairShare())
    assert busy["a0"].startswith("waiting for a free worker")


def _running(adapter_id: str, project: str, job: str = "j", **kw) -> RunningAdapter:
    fields = {"priority": 0, "base": A, "ran_seconds": 100.0, "alone": True, **kw}
    return RunningAdapter(adapter_id, project, job, **fields)


def test_a_project_holding_every_worker_yields_one_to_a_waiting_project():
    hogs = [_running("big-1", "big", "j1"), _running("big-2", "big", "j2", ran_seconds=200.0)]
    small = replace(demand("small", project="small"), job="s")
    assert yields([small], hogs, leaving=(), slice_seconds=60) == [("big-2", "small")]  # the longest running
    assert yields([small], hogs, leaving=("big-1",), slice_seconds=60) == []  # already leaving for it
    assert yields([small], hogs, leaving=(), slice_seconds=300) == []  # not a slice yet
    not_begun = [replace(h, ran_seconds=None) for h in hogs]
    assert yields([small], not_begun, leaving=(), slice_seconds=0) == []
    # two waiting demands of small take one each only while big still runs more: 2 vs 0, then 1 vs 1
    two = [small, replace(demand("small-2", project="small"), job="s")]
    assert yields(two, hogs, leaving=(), slice_seconds=60) == [("big-2", "small")]


def test_equal_shares_take_turns_and_yield_frees_a_usable_place():
    one = [_running("a-0", "a")]
    waiting_b = [demand("b-0", project="b")]
    assert yields(waiting_b, one, (), 60) == [("a-0", "b-0")]  # 1 vs 0: a yields its worker after a slice
    # a place in a pack of another base is no use to the demand, unless the pack empties
    shared = [_running("a-0", "a", base=B, alone=False)]
    assert yields(waiting_b, shared, (), 60) == []
    # within one project, the job running more yields to a job running none, unless it ranks higher
    same = [_running("p-1", "p", "j1"), _running("p-2", "p", "j1", ran_seconds=50.0)]
    other_job = [replace(demand("p-3", project="p"), job="j2")]
    assert yields(other_job, same, (), 10) == [("p-1", "p-3")]
    assert yields(other_job, [replace(r, priority=5) for r in same], (), 10) == []
    assert yields([replace(demand("p-4", project="p"), job="j1")], same, (), 10) == []  # its own job


def test_a_demand_that_does_not_fit_does_not_block_smaller_ones():
    huge, small = demand("huge", max_seq_len=100_000, seq=0), demand("small", seq=1)
    assert placed_ids(schedule([huge, small], [worker("w", GIB)], INFOS)) == ["small"]


def test_idle_workers_are_chosen_by_best_fit():
    ds = [demand("a")]
    workers = [worker("big", 20 * GIB), worker("small", GIB), worker("mid", 4 * GIB)]
    assert [p.worker_id for p in schedule(ds, workers, INFOS)] == ["small"]


def test_gpu_work_runs_on_gpus_only_and_cpu_work_prefers_cpus():
    g, c = demand("g", gpu=True, seq=1), demand("c", seq=0)
    gpu, cpu = worker("gpu", 10 * GIB, gpu=True), worker("cpu", 10 * GIB)
    assert schedule([g], [cpu], INFOS) == []
    assert {p.worker_id: p.adapter_ids for p in schedule([g, c], [gpu, cpu], INFOS)} == {
        "gpu": ("g",),
        "cpu": ("c",),
    }
    # CPU work may use a GPU worker, but only what GPU work left over, even when it ranks higher.
    one_slot = worker("gpu", 10 * GIB, gpu=True, max_adapters=1)
    assert placed_ids(schedule([c, g], [one_slot], INFOS)) == ["g"]
    assert placed_ids(schedule([c], [one_slot], INFOS)) == ["c"]


def test_running_adapters_are_not_placed_again():
    running = worker("w", 10 * GIB, base=A, running=("a",), used=GIB)
    assert placed_ids(schedule([demand("a"), demand("b")], [running, worker("v", 10 * GIB)], INFOS)) == ["b"]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"adapter_id.*\['a'\]"):
        schedule([demand("a"), demand("a")], [], INFOS)
    with pytest.raises(ValueError, match=r"worker_id.*\['w'\]"):
        schedule([], [worker("w", 1), worker("w", 2)], INFOS)
    with pytest.raises(ValueError, match="no `BaseModelInfo` given for"):
        schedule([demand("a", base=BaseKey("other", "none", "float32"))], [], INFOS)
    with pytest.raises(ValueError, match="`quantization`"):
        BaseKey("m", "3bit", "float32")
    with pytest.raises(ValueError, match="target_modules"):  # the demand carries a validated LoraConfig
        demand("a", targets="q_proj")
    with pytest.raises(ValueError, match="greater than 0"):
        demand("a", r=0)
    with pytest.raises(ValueError, match="`running_base`"):
        worker("w", 1, running=("a",))


def test_unplaceable_names_the_numbers_and_the_fix():
    fits = demand("fits")
    long_rows = demand("long", max_seq_len=200_000)
    big_base = demand("big-base", base=C)
    gpu_only = demand("needs-gpu", gpu=True)
    workers = [worker("w", GIB), worker("busy", GIB // 2, base=A, running=("x",), used=GIB // 2)]
    infos = {A: INFOS[A], C: INFOS[C]}
    small_workers = [worker("w", base_need(C) - 1)]
    reasons = dict(unplaceable([fits, long_rows, gpu_only], workers, infos))
    assert set(reasons) == {"long", "needs-gpu"}
    assert "largest worker has 1.00 GiB" in reasons["long"]
    assert "`train.max_seq_len` (now 200000)" in reasons["long"]
    assert "none of the 2 workers has a GPU" in reasons["needs-gpu"]
    (only,) = unplaceable([big_base], small_workers, infos)
    assert only[0] == "big-base" and "the base alone does not fit: quantize it" in only[1]
    assert "needs " in only[1] and "GiB" in only[1]
    assert schedule([fits, long_rows, gpu_only], workers, infos) == [
        Placement("w", A, ("fits",), False, base_need() + need(fits))
    ]


def _mixed_scenario(seed: int) -> tuple[list[AdapterDemand], list[WorkerState], dict[BaseKey, BaseModelInfo]]:
    rng = random.Random(seed)
    bases = [A, B, C]
    demands = [
        demand(
            f"ad-{k}",
            project=f"proj-{rng.randrange(4)}",
            base=rng.choice(bases),
            priority=rng.randrange(3),
            seq=k,
            r=rng.choice([4, 8, 16]),
            batch_size=rng.randrange(1, 9),
            max_seq_len=rng.choice([128, 512, 1024]),
            gpu=rng.random() < 0.5,
        )
        for k in range(300)
    ]
    workers = [
        worker(
            f"w-{k}",
            rng.randrange(1, 8) * GIB,
            gpu=k % 2 == 0,
            max_adapters=rng.randrange(1, 9),
            base=rng.choice([None, *bases]) if k % 3 else None,
        )
        for k in range(12)
    ]
    return demands, workers, INFOS


def test_same_input_same_output_whatever_the_order_and_hash_seed():
    demands, workers, infos = _mixed_scenario(0)
    expected = schedule(demands, workers, infos)
    assert len(placed_ids(expected)) > 10
    assert schedule(list(reversed(demands)), workers, infos) == expected
    code = (
        "from tests.orchestrator.test_scheduler import _mixed_scenario as m; "
        "from orchestrator.scheduling.scheduler import schedule; print(repr(schedule(*m(0))))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert outputs == {repr(expected) + "\n"}


# ---- properties ----

BASES = [A, B, C]
TARGETS = [("q_proj",), ("q_proj", "v_proj"), ("self_attn.k_proj", "mlp.down_proj"), "all-linear"]


@st.composite
def fleets(draw) -> tuple[list[AdapterDemand], list[WorkerState]]:
    n = draw(st.integers(0, 40))
    seqs = draw(st.permutations(range(n)))
    demands = [
        AdapterDemand(
            adapter_id=f"ad-{k}",
            project=draw(st.sampled_from(["p0", "p1", "p2"])),
            base=draw(st.sampled_from(BASES)),
            priority=draw(st.integers(0, 2)),
            seq=seqs[k],
            lora=lora(draw(st.sampled_from([1, 8, 64])), draw(st.sampled_from(TARGETS))),
            batch_size=draw(st.integers(1, 4)),
            max_seq_len=draw(st.sampled_from([16, 128, 512, 1024])),
            needs_gpu=draw(st.booleans()),
        )
        for k in range(n)
    ]
    ids = [d.adapter_id for d in demands]
    workers = []
    for k in range(draw(st.integers(0, 8))):
        memory = draw(st.integers(0, 3 * GIB) | st.integers(GIB // 4, GIB // 2))
        base = draw(st.one_of(st.none(), st.sampled_from(BASES)))
        running: tuple[str, ...] = ()
        used = 0
        if base is not None:
            mine = [i for i in draw(st.lists(st.sampled_from(ids), max_size=3)) if i in ids] if ids else []
            ids = [i for i in ids if i not in mine]  # an adapter runs in one pack at most
            running = (*dict.fromkeys(mine), *(f"run-{k}-{j}" for j in range(draw(st.integers(0, 2)))))
            used = draw(st.integers(0, memory))
        workers.append(
            WorkerState(f"w{k}", memory, draw(st.booleans()), draw(st.integers(0, 6)), base, running, used)
        )
    return demands, workers


def check_placements(
    demands: list[AdapterDemand], workers: list[WorkerState], placements: list[Placement]
) -> None:
    by_id = {d.adapter_id: d for d in demands}
    by_worker = {w.worker_id: w for w in workers}
    running = {a for w in workers for a in w.running_adapters}
    assert len({p.worker_id for p in placements}) == len(placements)
    ids = placed_ids(placements)
    assert len(ids) == len(set(ids))
    # a running pack holds at least its base
    used = {
        w.worker_id: max(w.used_bytes, base_need(w.running_base) if w.running_base else 0) for w in workers
    }
    # worker id -> (base, free bytes, free slots) once the placements are applied
    state = {
        w.worker_id: (w.running_base, w.memory_bytes - used[w.worker_id], w.max_adapters) for w in workers
    }
    for p in placements:
        w = by_worker[p.worker_id]
        assert p.adapter_ids and p.base in INFOS
        assert p.refill == (w.running_base is not None)
        if p.refill:
            assert p.base == w.running_base
        total = used[w.worker_id] + (0 if p.refill else base_need(p.base))
        for a in p.adapter_ids:
            d = by_id[a]
            assert a not in running and d.base == p.base
            assert w.has_gpu or not d.needs_gpu
            total += need(d)
        assert p.estimated_bytes == total <= w.memory_bytes
        assert len(w.running_adapters) + len(p.adapter_ids) <= w.max_adapters
        state[w.worker_id] = (p.base, w.memory_bytes - total, w.max_adapters - len(p.adapter_ids))

    def fits(d: AdapterDemand, w: WorkerState) -> bool:
        base, free, slots = state[w.worker_id]
        slots -= len(w.running_adapters)
        if slots <= 0 or not (w.has_gpu or not d.needs_gpu):
            return False
        if base is None:
            return base_need(d.base) + need(d) <= free
        return base == d.base and need(d) <= free

    placed = set(placed_ids(placements))
    for d in demands:
        if d.adapter_id not in placed and d.adapter_id not in running:
            assert not [w.worker_id for w in workers if fits(d, w)], f"{d.adapter_id} still fits"
    for p in placements:  # CPU work on a GPU worker: only because no CPU worker has room for it
        if by_worker[p.worker_id].has_gpu:
            for a in p.adapter_ids:
                if not by_id[a].needs_gpu:
                    assert not [w for w in workers if not w.has_gpu and fits(by_id[a], w)]


@settings(max_examples=150, deadline=None)
@given(fleets())
def test_placements_obey_every_rule_and_leave_nothing_that_fits(fleet):
    demands, workers = fleet
    placements = schedule(demands, workers, INFOS)
    check_placements(demands, workers, placements)
    assert schedule(list(reversed(demands)), workers, INFOS) == placements
    never = {i for i, _ in unplaceable(demands, workers, INFOS)}
    assert not never & set(placed_ids(placements))


@settings(max_examples=100, deadline=None)
@given(fleets(), st.dictionaries(st.sampled_from(["p0", "p1", "p2"]), st.integers(0, 4)))
def test_caps_are_never_passed_and_uncapped_projects_still_get_everything_that_fits(fleet, caps):
    demands, workers = fleet
    share = FairShare(project_running={"p1": 1}, caps=caps)
    placements = schedule(demands, workers, INFOS, share)
    by_id = {d.adapter_id: d for d in demands}
    placed = Counter(by_id[i].project for i in placed_ids(placements))
    for project, cap in caps.items():
        assert placed[project] == 0 or placed[project] + share.project_running.get(project, 0) <= cap
    full = {p for p, cap in caps.items() if placed[p] + share.project_running.get(p, 0) >= cap}
    kept = [d for d in demands if d.project not in full or d.adapter_id in set(placed_ids(placements))]
    check_placements(kept, workers, placements)  # maximal for every project below its cap


@settings(max_examples=150, deadline=None)
@given(fleets())
def test_fair_order_serves_the_fewest_running_first(fleet):
    demands, _ = fleet
    demands = [replace(d, job=f"j{d.seq % 2}") for d in demands]
    running = FairShare(project_running={"p0": 2}, job_running={("p0", "j0"): 2})
    order = fair_order(demands, running)
    assert sorted(d.adapter_id for d in order) == sorted(d.adapter_id for d in demands)
    projects: Counter[str] = Counter(running.project_running)
    jobs: Counter[tuple[str, str]] = Counter(running.job_running)
    left = Counter((d.project, d.job) for d in demands)
    for d in order:
        # no project (then no job of its project) with demands left runs fewer than the one served
        assert all(projects[d.project] <= projects[p] for p, _ in +left)
        assert all(jobs[(d.project, d.job)] <= jobs[(p, j)] for p, j in +left if p == d.project)
        left[(d.project, d.job)] -= 1
        projects[d.project] += 1
        jobs[(d.project, d.job)] += 1
    for key in {(d.project, d.job) for d in demands}:  # a job's own queue: priority, then age
        mine = [(-d.priority, d.seq) for d in order if (d.project, d.job) == key]
        assert mine == sorted(mine)
