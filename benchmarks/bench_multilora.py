"""Benchmark: K LoRA adapters in one lorafleet pack vs sequential PEFT vs K separate processes.

Run from the repository root with the project's venv active:

    python benchmarks/bench_multilora.py --quick                      # smoke run (< 1 min on 2 CPU cores)
    python benchmarks/bench_multilora.py                               # default sweep: tiny, 20m, 100m
    python benchmarks/bench_multilora.py --sizes tiny,20m --ks 1,4,8,16 --steps 12 --all-linear

For the same K adapters (same LoRA config, same initial weights, same token batches, same AdamW, clipping
and LR schedule) it compares three ways of training them:

  pack   lorafleet: `workers.pack.run_pack` with all K adapters in one batched forward/backward.
  peft   sequential PEFT: one base loaded once; for each adapter in turn `peft.get_peft_model(base, cfg)`,
         a plain training loop (torch AdamW, mean CE over target tokens), then `unload()` back to the bare
         base. Each adapter thus trains exactly as a standalone single-adapter PEFT run would; the K-1
         extra `from_pretrained` calls such runs would make are skipped (model load is not timed anyway).
  procs  K concurrent processes (multiprocessing spawn), each a single-adapter `run_pack` with
         `torch.set_num_threads(max(1, cores // K))`; skipped when K x (peak RSS of a pack of 1) would exceed
         70% of RAM (or of GPU memory on CUDA).

Every config runs in a fresh spawned process, so peak RSS (the process's VmHWM from /proc, the exact
high-water mark) is per config; for `procs` it is the sum of the children's peaks (an upper bound on their
concurrent peak). Throughput is non-pad input tokens per second in the steady state: the first `--warmup`
optimizer steps of every adapter are excluded, and so is model loading. For `pack` and `procs` the clock
is read inside the engine's StepEvent callback (the engine has already synchronised on the loss there);
`procs` children also wait on a shared barrier after their warm-up steps, so all K time the same window.

Achieved FLOP/s counts useful work only (non-pad tokens) with, per sequence of n tokens:
    FLOPs = n * (4 * N_lin + 6 * sum_lora r * (d_in + d_out)) + 12 * L * d_attn * n^2
where N_lin is the base's linear weights (lm_head included; the base is frozen, so forward 2*N_lin plus
activation gradients 2*N_lin, no weight gradients), each LoRA linear costs 2r(d_in+d_out) forward and twice
that backward (activation and weight gradients), and attention scores QK^T, AV cost 4*d_attn*n per token
and layer forward, twice that backward. It is reported as a fraction of the machine's fp32 matmul peak,
measured at start as the best of a few square matmuls.

Outputs `benchmarks/results/multilora-<device>.{json,md,png}` (`multilora-<device>-quick.*` for --quick).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RAM_FRACTION = 0.70
CUDA_CONTEXT_MB = 600.0  # a CUDA context per process, on top of what torch allocates
CHILD_TIMEOUT_S = 3600.0
IDLE_LOAD = 0.5
SKILL_EXAMPLES = 256


# ---- configuration ----


@dataclass(frozen=True)
class FlopModel:
    """Per-token and per-sequence FLOP coefficients of one base + LoRA target set (see module docstring)."""

    n_linear: int
    lora_rank_dims: int  # sum over targeted linears of r * (d_in + d_out)
    n_layers: int
    d_attn: int

    def sequence_flops(self, n_tokens: int) -> float:
        per_token = 4 * self.n_linear + 6 * self.lora_rank_dims
        return n_tokens * per_token + 12 * self.n_layers * self.d_attn * n_tokens**2


@dataclass(frozen=True)
class RunSpec:
    """Everything one benchmark child needs; plain data so it crosses a spawn boundary."""

    method: str  # pack | peft | procs
    size: str
    base_dir: str
    data_paths: tuple[str, ...]
    names: tuple[str, ...]
    steps: int
    warmup: int
    batch_size: int
    max_seq_len: int
    targets: tuple[str, ...] | str
    r: int
    alpha: float
    learning_rate: float
    seed: int
    device: str
    threads: int
    out_dir: str
    flops: FlopModel
    kernel: str = "auto"

    @property
    def k(self) -> int:
        return len(self.names)


@dataclass
class StepTrace:
    """Per-adapter timestamps and cumulative token counts at each optimizer step."""

    times: dict[tuple[str, int], float] = field(default_factory=dict)
    tokens: dict[tuple[str, int], int] = field(default_factory=dict)
    losses: dict[tuple[str, int], float] = field(default_factory=dict)

    def record(self, adapter: str, step: int, tokens: int, loss: float) -> None:
        key = (adapter, step)
        self.times[key], self.tokens[key], self.losses[key] = time.monotonic(), tokens, loss


# ---- machine ----


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info(device: str) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 2))
    return info


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def wait_for_idle(max_wait_s: float) -> float:
    """Wait (up to `max_wait_s`) for the 1-minute load average to drop below IDLE_LOAD; return it.

    Two CPU-bound torch processes on the same cores slow each other down by 10-100x, so a benchmark
    started beside another job measures the contention, not the code.
    """
    deadline = time.monotonic() + max_wait_s
    while load_average() >= IDLE_LOAD and time.monotonic() < deadline:
        time.sleep(5)
    load = load_average()
    if load >= IDLE_LOAD:
        print(f"WARNING: load average {load:.2f} >= {IDLE_LOAD}: other jobs are running, timings will suffer")
    return load


def measure_matmul_peak(device: str, n: int, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of `repeats` n x n matmuls (after one warm-up)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = math.inf
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM); ru_maxrss would include the pre-exec parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- assets ----


def adapter_names(k: int) -> tuple[list[str], list[tuple[str, int]]]:
    """Names and (skill, seed) of K adapters: the 4 synthetic skills cycled, a new seed each round."""
    from workers.synthetic import SKILLS

    skills = sorted(SKILLS)
    sources = [(skills[i % len(skills)], i) for i in range(k)]
    return [f"a{i:02d}-{skill}" for i, (skill, _) in enumerate(sources)], sources


def write_datasets(data_dir: Path, k: int) -> list[str]:
    from workers.synthetic import write_skill_data

    _, sources = adapter_names(k)
    return [
        str(write_skill_data(data_dir / f"{skill}-{seed}.jsonl", skill, SKILL_EXAMPLES, seed=seed))
        for skill, seed in sources
    ]


def flop_model(base_dir: str, targets: tuple[str, ...] | str, r: int) -> FlopModel:
    """Count linear weights and LoRA shapes on a meta-device copy of the base (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.multilora import resolve_target_modules

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lora = resolve_target_modules(model, list(targets) if isinstance(targets, tuple) else targets)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopModel(
        n_linear=sum(m.weight.numel() for m in linears.values()),
        lora_rank_dims=sum(r * (linears[p].in_features + linears[p].out_features) for p in lora),
        n_layers=config.num_hidden_layers,
        d_attn=config.num_attention_heads * head_dim,
    )


# ---- the token plan shared by all methods ----


def draw_batches(spec: RunSpec, tokenizer: Any) -> dict[str, list[list[Any]]]:
    """Each adapter's micro-batch per step, drawn exactly as the engine draws them (same SampleStream)."""
    from workers.data import SampleStream, load_adapter_data
    from workers.plan import DataConfig

    batches: dict[str, list[list[Any]]] = {}
    for name, path in zip(spec.names, spec.data_paths, strict=True):
        data = load_adapter_data(DataConfig(path=Path(path)), tokenizer, spec.max_seq_len, spec.seed, name)
        stream = SampleStream(len(data.train), spec.seed, name)
        batches[name] = [
            [data.train[i] for i in stream.next_indices(spec.batch_size)] for _ in range(spec.steps)
        ]
    return batches


def steady_work(spec: RunSpec, batches: dict[str, list[list[Any]]], packed: bool) -> dict[str, float]:
    """Non-pad tokens, padded tokens and FLOPs of the steps after warm-up.

    `packed`: all adapters' rows of a step are padded to one width (one pass per pack step; the pack's
    own count from `EngineProbe` replaces this when available), else each adapter's batch to its own.
    """
    tokens = padded = flops = 0.0
    for step in range(spec.warmup, spec.steps):
        groups = [batches[name][step] for name in spec.names]
        if packed:
            groups = [[ex for group in groups for ex in group]]
        for group in groups:
            lengths = [len(ex.input_ids) for ex in group]
            tokens += sum(lengths)
            padded += len(lengths) * max(lengths)
            flops += sum(spec.flops.sequence_flops(n) for n in lengths)
    return {"steady_tokens": tokens, "steady_padded_tokens": padded, "steady_flops": flops}


# ---- method (a) and (c): lorafleet run_pack ----


def pack_plan(spec: RunSpec) -> Any:
    from workers.plan import AdapterTask, DataConfig, LoraConfig, PackPlan, TrainConfig

    targets = list(spec.targets) if isinstance(spec.targets, tuple) else spec.targets
    train = TrainConfig(
        steps=spec.steps,
        batch_size=spec.batch_size,
        max_seq_len=spec.max_seq_len,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        eval_every=0,
        checkpoint_every=0,
    )
    adapters = [
        AdapterTask(
            name=name,
            lora=LoraConfig(r=spec.r, alpha=spec.alpha, target_modules=targets),
            train=train,
            data=DataConfig(path=Path(path)),
            output_dir=Path(spec.out_dir) / name,
        )
        for name, path in zip(spec.names, spec.data_paths, strict=True)
    ]
    return PackPlan(
        pack_id=f"bench-{spec.size}-k{spec.k}",
        base_model=spec.base_dir,
        device=spec.device,
        adapters=adapters,
    )


def train_pack(spec: RunSpec, on_warm: Callable[[], None] | None = None) -> tuple[StepTrace, dict, float]:
    """run_pack with a StepEvent recorder; `on_warm` is called once all adapters finished warm-up."""
    from workers.pack import run_pack
    from workers.plan import StepEvent

    trace = StepTrace()
    warm_marks: dict[str, float] = {}
    warm_at: list[float] = []

    def emit(event: Any) -> None:
        if isinstance(event, StepEvent):
            trace.record(event.adapter, event.step, event.tokens, event.loss)
            if event.step == spec.warmup and on_warm is not None:
                warm_marks[event.adapter] = time.monotonic()
                if len(warm_marks) == spec.k:
                    on_warm()
                    warm_at.append(time.monotonic())

    started = time.monotonic()
    result = run_pack(pack_plan(spec), emit, kernel=spec.kernel)
    failed = {n: d.error for n, d in result.adapters.items() if d.status != "trained"}
    if failed:
        raise RuntimeError(f"adapters failed: {failed}")
    return trace, {"warm_at": warm_at[0] if warm_at else None}, time.monotonic() - started


def steady_window(trace: StepTrace, spec: RunSpec, start: float | None = None) -> tuple[float, float, int]:
    """(start, end, non-pad tokens) of the steps after warm-up, from the recorded StepEvents."""
    if start is None:
        start = max(trace.times[(n, spec.warmup)] for n in spec.names)
    end = max(trace.times[(n, spec.steps)] for n in spec.names)
    tokens = sum(trace.tokens[(n, spec.steps)] - trace.tokens[(n, spec.warmup)] for n in spec.names)
    return start, end, tokens


@dataclass
class EngineProbe:
    """What the engine actually computed, counted inside a benchmark child (engine files untouched).

    Wraps, in this process only, `workers.trainer.collate` (the padded shape of every batch the engine
    forwards; it may split a pack step into several passes) and `MultiLoraLinear._can_bmm` (which LoRA
    kernel path each wrapped linear took). The wrappers cost one Python call each.
    """

    batches: list[tuple[float, int, int]] = field(default_factory=list)  # (time, padded, non-pad)
    rss_at_first_forward_mb: float | None = None  # base, data and adapters loaded; no activations yet
    kernel_calls: dict[str, int] = field(default_factory=lambda: {"bmm": 0, "loop": 0})

    def install(self) -> EngineProbe:
        import workers.trainer as trainer
        from workers.multilora import MultiLoraLinear

        collate, can_bmm = getattr(trainer, "collate", None), getattr(MultiLoraLinear, "_can_bmm", None)
        if collate is not None:

            def counting_collate(rows: list[Any], pad_id: int) -> Any:
                if self.rss_at_first_forward_mb is None:
                    self.rss_at_first_forward_mb = current_rss_mb()
                out = collate(rows, pad_id)
                self.batches.append((time.monotonic(), out[2].numel(), int(out[2].sum())))
                return out

            trainer.collate = counting_collate
        if can_bmm is not None:

            def counting_can_bmm(layer: Any, segments: Any) -> bool:
                ok = can_bmm(layer, segments)
                self.kernel_calls["bmm" if ok else "loop"] += 1
                return ok

            MultiLoraLinear._can_bmm = counting_can_bmm
        return self

    def steady(self, start: float) -> dict[str, Any]:
        """Padded and non-pad positions forwarded after `start`, passes per run, share of bmm calls."""
        after = [(padded, real) for t, padded, real in self.batches if t > start]
        calls = sum(self.kernel_calls.values())
        return {
            "probe_padded_tokens": sum(p for p, _ in after) if after else None,
            "probe_tokens": sum(r for _, r in after) if after else None,
            "forward_passes": len(after) if after else None,
            "bmm_share": self.kernel_calls["bmm"] / calls if calls else None,
            "rss_at_first_forward_mb": self.rss_at_first_forward_mb,
        }


def run_pack_method(spec: RunSpec, barrier: Any = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    probe = EngineProbe().install()
    on_warm = (lambda: barrier.wait(timeout=CHILD_TIMEOUT_S)) if barrier is not None else None
    trace, marks, wall = train_pack(spec, on_warm)
    start, end, event_tokens = steady_window(trace, spec, marks["warm_at"])
    work = steady_work(spec, draw_batches(spec, AutoTokenizer.from_pretrained(spec.base_dir)), packed=True)
    measured = probe.steady(start)
    if measured["probe_padded_tokens"] is not None:
        work["steady_padded_tokens"] = measured["probe_padded_tokens"]
    return {
        **work,
        **measured,
        "t_start": start,
        "t_end": end,
        "steady_s": end - start,
        "event_tokens": event_tokens,
        "tokens_match_plan": event_tokens == work["steady_tokens"]
        and measured["probe_tokens"] in (None, work["steady_tokens"]),
        "final_losses": {n: trace.losses[(n, spec.steps)] for n in spec.names},
        "wall_s": wall,
    }


# ---- method (b): sequential PEFT ----


def init_like_lorafleet(peft_model: Any, name: str, seed: int) -> None:
    """Give PEFT's lora_A the initial values lorafleet draws for (seed, adapter, module); B stays zero."""
    from workers.multilora import seeded_generator

    with torch.no_grad():
        for path, module in peft_model.base_model.model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            weight = module.lora_A["default"].weight
            fresh = torch.empty(weight.shape, device=weight.device, dtype=torch.float32)
            generator = seeded_generator(weight.device, seed, name, path)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            weight.copy_(fresh)


def peft_train_one(
    base: Any, spec: RunSpec, name: str, batches: list[list[Any]], pad_id: int
) -> tuple[Any, float, float]:
    """Train one adapter with a plain PEFT loop; returns (bare base, steady seconds, final loss)."""
    from peft import LoraConfig, get_peft_model
    from torch.nn import functional as F
    from torch.optim.lr_scheduler import LambdaLR

    from workers.data import IGNORE_INDEX, collate
    from workers.plan import TrainConfig
    from workers.trainer import lr_factor

    targets = list(spec.targets) if isinstance(spec.targets, tuple) else spec.targets
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(base, config)
    init_like_lorafleet(model, name, spec.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0, foreach=True)
    schedule = TrainConfig(steps=spec.steps, learning_rate=spec.learning_rate)
    scheduler = LambdaLR(optimizer, lambda s: lr_factor(s, schedule))
    start = loss_value = math.nan
    for step, rows in enumerate(batches, start=1):
        input_ids, labels, mask = (t.to(spec.device) for t in collate(rows, pad_id))
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)  # synchronises, as the engine does when it reports a step
        if step == spec.warmup:
            start = time.monotonic()
    steady = time.monotonic() - start
    return model.unload(), steady, loss_value


def run_peft_method(spec: RunSpec, barrier: Any = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.base_dir)
    batches = draw_batches(spec, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(spec.base_dir, dtype=torch.float32).to(spec.device)
    steady = 0.0
    losses: dict[str, float] = {}
    wall_start = time.monotonic()
    for name in spec.names:
        base, seconds, losses[name] = peft_train_one(
            base, spec, name, batches[name][: spec.steps], tokenizer.pad_token_id
        )
        steady += seconds
    return {
        **steady_work(spec, batches, packed=False),
        "steady_s": steady,
        "final_losses": losses,
        "wall_s": time.monotonic() - wall_start,
    }


# ---- child processes ----

METHODS: dict[str, Callable[..., dict[str, Any]]] = {
    "pack": run_pack_method,
    "peft": run_peft_method,
    "procs": run_pack_method,
}


def quiet_libraries() -> None:
    """No progress bars or deprecation chatter from transformers/PEFT in the benchmark's output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def child_main(spec: RunSpec, results: Any, barrier: Any = None) -> None:
    """Entry point of every spawned child: quiet libraries, run the method, report numbers or the error."""
    quiet_libraries()
    torch.set_num_threads(spec.threads)
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        out = METHODS[spec.method](spec, barrier)
    except BaseException:
        out = {"error": traceback.format_exc(limit=6)}
        if barrier is not None:
            barrier.abort()
    out["peak_rss_mb"] = peak_rss_mb()
    out["cuda_max_allocated_mb"] = (
        torch.cuda.max_memory_allocated() / 2**20 if spec.device == "cuda" else None
    )
    out["threads"] = torch.get_num_threads()
    results.put(out)


def collect(results: Any, procs: list[Any], n: int, timeout: float) -> list[dict[str, Any]]:
    """n results from `results`, noticing children that died without reporting (e.g. killed for memory)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead and len(out) + len(dead) >= n:
                codes = [p.exitcode for p in dead]
                out.extend({"error": f"child exited with code {c}"} for c in codes[: n - len(out)])
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if len(out) < n:
        out.extend({"error": "timed out"} for _ in range(n - len(out)))
    return out


def spawn(specs: list[RunSpec], with_barrier: bool) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(len(specs)) if with_barrier else None
    procs = [ctx.Process(target=child_main, args=(s, results, barrier)) for s in specs]
    for p in procs:
        p.start()
    return collect(results, procs, len(specs), CHILD_TIMEOUT_S)


# ---- running one config ----


def finish_row(spec: RunSpec, out: dict[str, Any], peak_flops: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "size": spec.size,
        "k": spec.k,
        "method": spec.method,
        "kernel": spec.kernel if spec.method != "peft" else None,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        **out,
    }
    if "error" in out:
        row["status"] = "error"
        return row
    row["status"] = "ok"
    seconds = out["steady_s"]
    row["tokens_per_s"] = out["steady_tokens"] / seconds
    row["flops_per_s"] = out["steady_flops"] / seconds
    row["fraction_of_peak"] = row["flops_per_s"] / peak_flops
    row["pad_fraction"] = 1 - out["steady_tokens"] / out["steady_padded_tokens"]
    if out.get("forward_passes") is not None:
        row["passes_per_step"] = out["forward_passes"] / (spec.steps - spec.warmup)
    row["mean_final_loss"] = sum(out["final_losses"].values()) / len(out["final_losses"])
    return row


def run_single(spec: RunSpec, peak_flops: float) -> dict[str, Any]:
    """One pack or sequential-PEFT config in a fresh process."""
    out_dir = Path(spec.out_dir)
    try:
        (out,) = spawn([spec], with_barrier=False)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return finish_row(spec, out, peak_flops)


def merge_procs(children: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the K single-adapter children over their common (barrier-aligned) steady window."""
    errors = [c["error"] for c in children if "error" in c]
    if errors:
        return {"error": errors[0]}
    start = min(c["t_start"] for c in children)
    end = max(c["t_end"] for c in children)
    summed = ("steady_tokens", "steady_padded_tokens", "steady_flops", "peak_rss_mb", "forward_passes")
    out: dict[str, Any] = {
        key: sum(c[key] for c in children) if all(c.get(key) is not None for c in children) else None
        for key in summed
    }
    cuda = [c["cuda_max_allocated_mb"] for c in children]
    out.update(
        steady_s=end - start,
        final_losses={name: loss for c in children for name, loss in c["final_losses"].items()},
        threads_per_process=children[0]["threads"],
        cuda_max_allocated_mb=sum(cuda) if all(x is not None for x in cuda) else None,
        tokens_match_plan=all(c["tokens_match_plan"] for c in children),
        wall_s=max(c["wall_s"] for c in children),
    )
    return out


def procs_skip_reason(k: int, pack1: dict[str, Any] | None, device: str) -> str | None:
    """Why K separate processes would not fit (or None): K x measured pack peak vs 70% of memory.

    `pack1` is the smallest pack measured at this size (a pack of 1 unless --ks has no 1, in which case
    the estimate is an upper bound).
    """
    if pack1 is None:
        return "no successful pack run at this size to estimate per-process memory"
    ram_mb = psutil.virtual_memory().total / 2**20
    need = k * pack1["peak_rss_mb"]
    if need > RAM_FRACTION * ram_mb:
        return f"{k} x {pack1['peak_rss_mb']:.0f} MB RSS > {RAM_FRACTION:.0%} of {ram_mb:.0f} MB RAM"
    if device == "cuda":
        gpu_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        need_gpu = k * (pack1["cuda_max_allocated_mb"] + CUDA_CONTEXT_MB)
        if need_gpu > RAM_FRACTION * gpu_mb:
            return f"{k} x ({pack1['cuda_max_allocated_mb']:.0f} + {CUDA_CONTEXT_MB:.0f}) MB > 70% of GPU"
    return None


def run_procs(spec: RunSpec, peak_flops: float, skip: str | None) -> dict[str, Any]:
    """(c): K concurrent single-adapter packs, cores // K threads each."""
    if skip is not None:
        return {"size": spec.size, "k": spec.k, "method": "procs", "status": "skipped", "note": skip}
    threads = max(1, usable_cores() // spec.k)
    specs = [
        replace(spec, names=(name,), data_paths=(path,), threads=threads)
        for name, path in zip(spec.names, spec.data_paths, strict=True)
    ]
    try:
        children = spawn(specs, with_barrier=True)
    finally:
        shutil.rmtree(spec.out_dir, ignore_errors=True)
    return finish_row(spec, merge_procs(children), peak_flops)


# ---- the sweep ----


@dataclass(frozen=True)
class SizePlan:
    size: str
    ks: tuple[int, ...]
    steps: int


def sweep_size(
    plan: SizePlan, args: argparse.Namespace, workdir: Path, device: str, peak: float
) -> list[dict]:
    from workers.tiny import build_tiny_base

    extra_k = args.extra_k
    k_max = max((*plan.ks, extra_k))
    base_dir = str(build_tiny_base(workdir / "models" / plan.size, size=plan.size))
    paths = write_datasets(workdir / "data", k_max)
    names, _ = adapter_names(k_max)
    targets: tuple[str, ...] | str = "all-linear" if args.all_linear else tuple(args.targets.split(","))
    template = RunSpec(
        method="pack",
        size=plan.size,
        base_dir=base_dir,
        data_paths=(),
        names=(),
        steps=plan.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        targets=targets,
        r=args.r,
        alpha=args.alpha,
        learning_rate=args.lr,
        seed=0,
        device=device,
        threads=usable_cores(),
        out_dir="",
        flops=flop_model(base_dir, targets, args.r),
    )

    def spec(method: str, k: int, kernel: str = "auto") -> RunSpec:
        out_dir = tempfile.mkdtemp(prefix=f"{plan.size}-{method}-k{k}-", dir=workdir)
        return replace(
            template,
            method=method,
            names=tuple(names[:k]),
            data_paths=tuple(paths[:k]),
            out_dir=out_dir,
            kernel=kernel,
        )

    methods = args.methods.split(",")
    rows: list[dict] = []
    for method in ("pack", "peft"):
        if method in methods:
            rows += [log_row(run_single(spec(method, k), peak)) for k in plan.ks]
    if "pack" in methods and kernel_rows_wanted(plan, args):
        rows += [log_row(run_single(spec("pack", extra_k, kernel), peak)) for kernel in ("loop", "bmm")]
    pack_rows = [
        r for r in rows if r["method"] == "pack" and r.get("kernel") == "auto" and r["status"] == "ok"
    ]
    pack1 = min(pack_rows, key=lambda r: r["k"], default=None)
    if "procs" in methods:
        for k in plan.ks:
            rows.append(log_row(run_procs(spec("procs", k), peak, procs_skip_reason(k, pack1, device))))
    return rows


def kernel_rows_wanted(plan: SizePlan, args: argparse.Namespace) -> bool:
    """Loop-vs-bmm rows: every size but --big-size (costly there) unless asked for."""
    if args.no_kernel_rows:
        return False
    return plan.size != args.big_size or args.big_kernel_rows


def log_row(row: dict[str, Any]) -> dict[str, Any]:
    label = f"[{row['size']:>4} K={row['k']:>2} {row['method']:<5} {row.get('kernel') or '':<4}]"
    if row["status"] == "ok":
        print(
            f"{label} {row['tokens_per_s']:9.0f} tok/s  steady {row['steady_s']:6.2f}s  "
            f"peak RSS {row['peak_rss_mb']:7.0f} MB  {row['fraction_of_peak']:6.1%} of peak  "
            f"loss {row['mean_final_loss']:.4f}",
            flush=True,
        )
    else:
        print(f"{label} {row['status']}: {row.get('note') or row.get('error')}", flush=True)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """tokens/s of every pack/procs row over sequential PEFT's at the same size and K."""
    peft = {(r["size"], r["k"]): r for r in rows if r["method"] == "peft" and r["status"] == "ok"}
    for row in rows:
        ref = peft.get((row["size"], row["k"]))
        if row["status"] == "ok" and ref is not None and row is not ref:
            row["speedup_vs_peft"] = row["tokens_per_s"] / ref["tokens_per_s"]
            losses = row["final_losses"]
            row["max_final_loss_diff_vs_peft"] = max(
                abs(losses[n] - ref["final_losses"][n]) for n in losses if n in ref["final_losses"]
            )


def memory_checks(rows: list[dict[str, Any]], k_big: int) -> list[dict[str, Any]]:
    """Pack of `k_big` vs pack of 1 peak RSS (and CUDA allocation) per size, from the auto-kernel rows."""
    checks = []
    packs = {
        (r["size"], r["k"]): r
        for r in rows
        if r["method"] == "pack" and r.get("kernel") == "auto" and r["status"] == "ok"
    }
    for size in dict.fromkeys(r["size"] for r in rows):
        one, big = packs.get((size, 1)), packs.get((size, k_big))
        if one is None or big is None:
            continue
        check = {
            "size": size,
            "k": k_big,
            "rss_pack1_mb": one["peak_rss_mb"],
            "rss_packk_mb": big["peak_rss_mb"],
            "rss_ratio": big["peak_rss_mb"] / one["peak_rss_mb"],
            "rss_per_extra_adapter_mb": (big["peak_rss_mb"] - one["peak_rss_mb"]) / (k_big - 1),
        }
        static_one, static_big = one.get("rss_at_first_forward_mb"), big.get("rss_at_first_forward_mb")
        if static_one and static_big:
            check.update(
                static_pack1_mb=static_one,
                static_packk_mb=static_big,
                static_ratio=static_big / static_one,
                training_extra_pack1_mb=one["peak_rss_mb"] - static_one,
                training_extra_packk_mb=big["peak_rss_mb"] - static_big,
            )
        if one.get("cuda_max_allocated_mb"):
            check["cuda_ratio"] = big["cuda_max_allocated_mb"] / one["cuda_max_allocated_mb"]
        checks.append(check)
    return checks


# ---- reports ----


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    info, cfg = report["machine"], report["config"]
    busy = info["load_average_at_start"] >= IDLE_LOAD
    lines = [
        f"# Multi-LoRA benchmark ({info['device']})",
        "",
        f"{info['date']} · {info.get('gpu') or info['cpu_model']} · {info['cores']} cores"
        f" · {info['ram_gb']} GB RAM · torch {info['torch']} · transformers {info['transformers']}"
        f" · peft {info['peft']}",
        "",
        f"fp32 matmul peak (best of {cfg['peak_repeats']} {cfg['peak_n']}² matmuls): "
        f"{report['peak_flops'] / 1e9:.1f} GFLOP/s. Batch {cfg['batch_size']} per adapter, max_seq_len "
        f"{cfg['max_seq_len']}, LoRA r={cfg['r']} alpha={cfg['alpha']} on {cfg['targets']}; first "
        f"{cfg['warmup']} steps per adapter excluded.{' SMOKE RUN (--quick).' if cfg['quick'] else ''}",
        "",
        f"1-minute load average: {info['load_average_at_start']:.2f} at start, "
        f"{info['load_average_at_end']:.2f} at end (includes this benchmark's own processes)"
        + (" — **the machine was busy: timings are not trustworthy**." if busy else "."),
        "",
        "| size | K | method | kernel | steps | tokens/s | vs peft | steady s | peak RSS MB | CUDA MB "
        "| GFLOP/s | % peak | pad % | passes/step | bmm % | final loss | Δloss vs peft |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            why = r.get("note") or (r.get("error") or "?").strip().splitlines()[-1]
            lines.append(
                f"| {r['size']} | {r['k']} | {r['method']} | {r.get('kernel') or ''} | "
                f"| {r['status']}: {why} | | | | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['size']} | {r['k']} | {r['method']} | {r.get('kernel') or ''} | {r['steps']} "
            f"| {r['tokens_per_s']:.0f} | {fmt(r.get('speedup_vs_peft'), '.2f')} | {r['steady_s']:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {fmt(r.get('cuda_max_allocated_mb'), '.0f')} "
            f"| {r['flops_per_s'] / 1e9:.2f} | {r['fraction_of_peak']:.1%} | {r['pad_fraction']:.1%} "
            f"| {fmt(r.get('passes_per_step'), '.2f')} | {fmt(r.get('bmm_share'), '.0%')} "
            f"| {r['mean_final_loss']:.4f} | {fmt(r.get('max_final_loss_diff_vs_peft'), '.1e')} |"
        )
    lines += [
        "",
        "## Memory: pack of K vs pack of 1",
        "",
        "Peak RSS, and its split into *static* (RSS at the first forward: runtime, base, data, adapters)"
        " and *training* (peak minus static: activations, gradients, AdamW state, allocator slack).",
        "",
        "| size | K | peak pack-1 MB | peak pack-K MB | peak ratio | MB per extra adapter "
        "| static pack-1 MB | static pack-K MB | static ratio | training pack-1 MB | training pack-K MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["memory_checks"]:
        lines.append(
            f"| {c['size']} | {c['k']} | {c['rss_pack1_mb']:.0f} | {c['rss_packk_mb']:.0f} "
            f"| {c['rss_ratio']:.2f} | {fmt(c.get('rss_per_extra_adapter_mb'), '.0f')} "
            f"| {fmt(c.get('static_pack1_mb'), '.0f')} | {fmt(c.get('static_packk_mb'), '.0f')} "
            f"| {fmt(c.get('static_ratio'), '.2f')} | {fmt(c.get('training_extra_pack1_mb'), '.0f')} "
            f"| {fmt(c.get('training_extra_packk_mb'), '.0f')} |"
        )
    lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]], ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in report["rows"]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for method, label in (
            ("pack", "lorafleet pack"),
            ("peft", "sequential PEFT"),
            ("procs", "K processes"),
        ):
            points = sorted(
                (r["k"], r["tokens_per_s"])
                for r in report["rows"]
                if r["size"] == size
                and r["method"] == method
                and r["status"] == "ok"
                and r.get("kernel") in ("auto", None)
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(title=size, xlabel="K adapters", ylabel="tokens/s (steady state)")
        ax.set_xscale("log", base=2)
        ks = sorted({r["k"] for r in report["rows"] if r["size"] == size})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"Multi-LoRA training throughput ({report['machine']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def notes(args: argparse.Namespace) -> list[str]:
    return [
        "tokens/s = non-pad input tokens of the steps after warm-up / their wall time; model load excluded.",
        "FLOPs per sequence of n non-pad tokens = n·(4·N_lin + 6·Σ_lora r·(d_in+d_out)) + 12·L·d_attn·n²;"
        " % peak = achieved FLOP/s / measured fp32 matmul peak.",
        "peft = one base loaded once; per adapter get_peft_model → plain loop (AdamW, clip 1.0, same cosine"
        " LR) → unload(). Same batches (same SampleStream) and same initial A as lorafleet, so final losses"
        " should agree (Δloss column).",
        "procs = K spawned processes, each a 1-adapter run_pack with cores//K threads; children wait on a"
        " barrier after warm-up; RSS is the sum of the children's peaks. Skipped when K × pack-of-1 RSS"
        f" > {RAM_FRACTION:.0%} of RAM.",
        f"kernel rows: pack at K={args.extra_k} with the loop and bmm kernels forced ('bmm' falls back to"
        " the loop when segments differ in length or rank). bmm % = share of LoRA layer calls that took the"
        " batched-matmul path, passes/step = forward passes the engine made per pack step (it may split a"
        " step's rows by length); both counted by wrapping engine functions inside the benchmark process.",
        "pad % = share of padded positions forwarded (pack: as the engine collated them; peft: each"
        " adapter's batch padded to its own longest row).",
    ]


# ---- entry point ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,20m,100m", help="comma list of workers.tiny sizes")
    p.add_argument("--ks", default="1,4,8,16", help="numbers of adapters")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per adapter")
    p.add_argument("--big-size", default="100m", help="size that uses --big-ks/--big-steps")
    p.add_argument("--big-ks", default="1,4,8", help="Ks for --big-size")
    p.add_argument("--big-steps", type=int, default=8, help="steps for --big-size")
    p.add_argument("--warmup", type=int, default=2, help="steps per adapter left out of the timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--all-linear", action="store_true", help="LoRA on every linear but the head")
    p.add_argument("--extra-k", type=int, default=8, help="K of the loop-vs-bmm rows and memory check")
    p.add_argument("--no-kernel-rows", action="store_true", help="skip the loop/bmm kernel rows")
    p.add_argument("--big-kernel-rows", action="store_true", help="loop/bmm rows for --big-size too")
    p.add_argument("--wait-idle", type=float, default=60.0, help="seconds to wait for load avg < 0.5")
    p.add_argument("--methods", default="pack,peft,procs", help="any of pack,peft,procs (procs needs pack)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--peak-n", type=int, default=0, help="matmul size for the peak (0: 2048 cpu, 8192 cuda)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorafleet-bench")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--render", type=Path, help="only re-write the .md and .png of this results .json")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, K=1,4, 6 steps, kernels at K=4")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - {"pack", "peft", "procs"}
    if unknown:
        p.error(f"unknown --methods {sorted(unknown)}; choose from pack, peft, procs")
    if args.quick:
        args.sizes, args.ks, args.steps, args.extra_k = "tiny", "1,4", 6, 4
    if args.warmup < 1 or args.steps <= args.warmup or args.big_steps <= args.warmup:
        p.error("need 1 <= --warmup < --steps, --big-steps")
    return args


def size_plans(args: argparse.Namespace) -> list[SizePlan]:
    return [
        SizePlan(s, parse_ints(args.big_ks), args.big_steps)
        if s == args.big_size
        else SizePlan(s, parse_ints(args.ks), args.steps)
        for s in args.sizes.split(",")
    ]


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(sorted({int(x) for x in text.split(",")}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render)
    quiet_libraries()
    load_at_start = wait_for_idle(args.wait_idle)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    peak_n = args.peak_n or (8192 if device == "cuda" else 2048)
    peak = measure_matmul_peak(device, peak_n)
    info = machine_info(device)
    print(
        f"{info['cpu_model']} · {info['cores']} cores · device {device} · fp32 peak {peak / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [row for plan in size_plans(args) for row in sweep_size(plan, args, args.workdir, device, peak)]
    add_ratios(rows)
    info["load_average_at_start"], info["load_average_at_end"] = load_at_start, load_average()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(
        peak_n=peak_n,
        peak_repeats=5,
        size_plans=[asdict(p) for p in size_plans(args)],
        targets="all-linear" if args.all_linear else args.targets,
    )
    report = {
        "machine": info,
        "config": config,
        "peak_flops": peak,
        "rows": rows,
        "memory_checks": memory_checks(rows, args.extra_k),
        "notes": notes(args),
    }
    write_outputs(report, args.out, f"{device}-quick" if args.quick else device)
    return report


def render(json_path: Path) -> dict[str, Any]:
    """Re-write the markdown table and the plot of an earlier run from its JSON (nothing re-measured)."""
    report = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(markdown(report))
    plot(report, json_path.with_suffix(".png"))
    print(f"rendered {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return report


def write_outputs(report: dict[str, Any], out_dir: Path, tag: str) -> None:
    """multilora-<tag>.{json,md,png}; a --quick run is tagged apart so it never overwrites a sweep."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"multilora-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    for c in report["memory_checks"]:
        static = f", static (at first forward) {c['static_ratio']:.2f}" if "static_ratio" in c else ""
        print(f"memory: {c['size']} pack of {c['k']} / pack of 1: peak RSS {c['rss_ratio']:.2f}{static}")
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
