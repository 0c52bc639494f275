"""Measuring: the machine, matmul peaks, memory, child processes, and the sweep over configurations.

Every configuration runs in a fresh spawned process, so peak RSS (VmHWM, the exact high-water mark) and
CUDA peak allocation are per configuration; for `procs` they are summed over the K children (an upper
bound on their concurrent peak). Throughput is non-pad tokens per second in the steady state: the first
`warmup` optimizer steps of every adapter and model loading are excluded.
"""

from __future__ import annotations

import datetime as dt
import math
import multiprocessing as mp
import os
import platform
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from multilora_bench.methods import METHODS, RunSpec
from multilora_bench.workload import adapter_names, build_model, flop_model, load_config, write_dataset

RAM_FRACTION = 0.70
CUDA_CONTEXT_MB = 600.0  # a CUDA context per process, on top of what torch allocates
CHILD_TIMEOUT_S = 4 * 3600.0
IDLE_LOAD = 0.5


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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_matmul_peak(device: str, dtype: str, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of `repeats` n x n matmuls in `dtype` (after one warm-up)."""
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    best = math.inf
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


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


# ---- child processes ----


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


# ---- one configuration ----


def finish_row(spec: RunSpec, out: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "config": spec.config,
        "seq": spec.max_seq_len,
        "dtype": spec.dtype,
        "k": spec.k,
        "method": spec.method,
        "kernel": spec.kernel if spec.method in ("pack", "procs") else None,
        "max_tokens_per_pass": spec.max_tokens_per_pass if spec.method == "pack" else None,
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
    row["fraction_of_peak"] = row["flops_per_s"] / peaks[spec.dtype]
    if out.get("steady_padded_tokens"):
        row["pad_fraction"] = 1 - out["steady_tokens"] / out["steady_padded_tokens"]
    if out.get("forward_passes") is not None:
        row["passes_per_step"] = out["forward_passes"] / (spec.steps - spec.warmup)
    row["mean_final_loss"] = sum(out["final_losses"].values()) / len(out["final_losses"])
    return row


def run_single(spec: RunSpec, peaks: dict[str, float]) -> dict[str, Any]:
    """One pack or sequential-PEFT configuration in a fresh process."""
    try:
        (out,) = spawn([spec], with_barrier=False)
    finally:
        shutil.rmtree(spec.out_dir, ignore_errors=True)
    return finish_row(spec, out, peaks)


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
    """Why K separate processes would not fit (or None): K x the measured pack-of-1 peak vs 70%."""
    if pack1 is None:
        return "no successful pack of 1 at this configuration to size a process by"
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


def run_procs(spec: RunSpec, peaks: dict[str, float], skip: str | None) -> dict[str, Any]:
    """K concurrent single-adapter packs, cores // K threads each."""
    if skip is not None:
        return {**finish_row(spec, {"error": skip}, peaks), "status": "skipped", "note": skip}
    threads = max(1, usable_cores() // spec.k)
    specs = [
        replace(spec, names=(name,), data_paths=(path,), threads=threads)
        for name, path in zip(spec.names, spec.data_paths, strict=True)
    ]
    try:
        children = spawn(specs, with_barrier=True)
    finally:
        shutil.rmtree(spec.out_dir, ignore_errors=True)
    return finish_row(spec, merge_procs(children), peaks)


def memory_estimate_mb(spec: RunSpec, checkpointing: bool = False) -> float:
    """The scheduler's estimate for this pack (base + K adapters), to set beside the measured peak."""
    import json

    return estimate_mb(
        json.loads((Path(spec.base_dir) / "config.json").read_text()),
        dtype=spec.dtype,
        targets=spec.targets,
        r=spec.r,
        k=spec.k,
        batch_size=spec.batch_size,
        max_seq_len=spec.max_seq_len,
        gpu=spec.device == "cuda",
        max_tokens_per_pass=spec.max_tokens_per_pass if spec.method == "pack" else None,
        in_passes=spec.method == "pack",
        checkpointing=checkpointing,
    )


def estimate_mb(
    model_config: dict[str, Any],
    *,
    dtype: str,
    targets: tuple[str, ...] | str,
    r: int,
    k: int,
    batch_size: int,
    max_seq_len: int,
    gpu: bool,
    max_tokens_per_pass: int | None,
    in_passes: bool,
    checkpointing: bool,
) -> float:
    """`orchestrator.scheduling.scheduler`'s numbers for a pack of `k` like adapters on a base of
    `model_config`."""
    from orchestrator.scheduling.scheduler import (
        AdapterDemand,
        BaseKey,
        adapter_memory_bytes,
        base_memory_bytes,
        pass_memory_bytes,
    )
    from workers.contract.memory import default_pass_tokens, model_info_from_config
    from workers.contract.plan import LoraConfig

    key = BaseKey("bench", "none", dtype)
    info = model_info_from_config(model_config)
    step = k * batch_size * max_seq_len
    passes = default_pass_tokens(gpu, max_tokens_per_pass, step) if in_passes else None
    lora = LoraConfig(r=r, target_modules=targets if isinstance(targets, str) else list(targets))
    demand = AdapterDemand("a", "p", key, 0, 0, lora, batch_size, max_seq_len, gpu, pass_tokens=passes)
    adapters = k * adapter_memory_bytes(demand, info, checkpointing)
    pack = base_memory_bytes(key, info) + pass_memory_bytes(demand, info, checkpointing)
    return (pack + adapters) / 2**20


def re_estimate(json_path: Path) -> None:
    """Recompute `estimate_mb` of every pack row of a results JSON with today's memory model (after a
    recalibration), in place, from the shipped configs (nothing is built or run)."""
    import json

    report = json.loads(json_path.read_text())
    cfg = report["config"]
    targets = "all-linear" if cfg.get("all_linear") else tuple(cfg["targets"].split(","))
    for row in report["rows"]:
        if row["method"] != "pack" or row.get("status") != "ok":
            continue
        row["estimate_mb"] = estimate_mb(
            load_config(row["config"]),
            dtype=row["dtype"],
            targets=targets,
            r=cfg["r"],
            k=row["k"],
            batch_size=row["batch_size"],
            max_seq_len=row["seq"],
            gpu=report["machine"].get("device") == "cuda",
            max_tokens_per_pass=row.get("max_tokens_per_pass"),
            in_passes=True,
            checkpointing=row.get("checkpointed") is True,
        )
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def peft_estimate_mb(spec: RunSpec) -> float:
    """Sequential PEFT holds one adapter's activations at a time, plus full-vocabulary logits (in the
    model's dtype, their fp32 copy and its gradient) for all of its tokens."""
    import json

    from workers.contract import memory

    one = replace(spec, names=spec.names[:1], data_paths=spec.data_paths[:1])
    config = json.loads((Path(spec.base_dir) / "config.json").read_text())
    tokens = spec.batch_size * spec.max_seq_len
    logits = tokens * int(config["vocab_size"]) * (memory.DTYPE_BYTES[spec.dtype] + 8)
    return memory_estimate_mb(one) + logits / 2**20


def skip_reason(spec: RunSpec, budget_bytes: int) -> str | None:
    """Why this row would not fit the machine (or None), from the memory model: lorafleet may turn
    activation checkpointing on (its plan carries the budget), PEFT runs as it is."""
    if spec.method in ("pack", "procs"):
        need = memory_estimate_mb(spec, checkpointing=True)
        what = "even with activation checkpointing"
    else:
        need, what = peft_estimate_mb(spec), "(full-vocabulary logits)"
    if need * 2**20 > budget_bytes:
        budget = f"{RAM_FRACTION:.0%} of memory ({budget_bytes / 2**20:.0f} MB)"
        return f"estimated {need:.0f} MB {what} > {budget}"
    return None


# ---- the sweep ----


@dataclass(frozen=True)
class Sweep:
    configs: tuple[str, ...]
    seqs: tuple[int, ...]
    dtypes: tuple[str, ...]
    ks: tuple[int, ...]
    methods: tuple[str, ...]
    steps: int
    warmup: int
    batch_size: int
    r: int
    alpha: float
    learning_rate: float
    targets: tuple[str, ...] | str
    kernel_rows: bool
    device: str
    workdir: Path
    memory_bytes: int  # RAM, or the GPU's memory
    checkpointing: str = "auto"  # the packs' activation checkpointing (memory rows force it on)
    max_tokens_per_pass: int | None = None  # the packs' pass size; None: the engine's default
    run_beyond_estimate: bool = False  # run pack rows whose worst-case estimate exceeds the budget

    @property
    def budget_bytes(self) -> int:
        return int(RAM_FRACTION * self.memory_bytes)


def sweep(plan: Sweep, peaks: dict[str, float]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for config in plan.configs:
        base_dir = str(build_model(config, plan.workdir))
        vocab = int(load_config(config)["vocab_size"])
        flops = flop_model(base_dir, plan.targets, plan.r)
        for seq in plan.seqs:
            paths = [
                str(write_dataset(plan.workdir / "data" / f"{config}-s{seq}-{i}.jsonl", vocab, seq, i))
                for i in range(max(plan.ks))
            ]
            for dtype in plan.dtypes:
                rows += sweep_one(plan, config, base_dir, seq, dtype, paths, flops, peaks)
    return rows


def sweep_one(
    plan: Sweep,
    config: str,
    base_dir: str,
    seq: int,
    dtype: str,
    paths: list[str],
    flops: Any,
    peaks: dict[str, float],
) -> list[dict[str, Any]]:
    names = adapter_names(max(plan.ks))
    template = RunSpec(
        method="pack",
        config=config,
        base_dir=base_dir,
        data_paths=(),
        names=(),
        steps=plan.steps,
        warmup=plan.warmup,
        batch_size=plan.batch_size,
        max_seq_len=seq,
        targets=plan.targets,
        r=plan.r,
        alpha=plan.alpha,
        learning_rate=plan.learning_rate,
        seed=0,
        device=plan.device,
        dtype=dtype,
        threads=usable_cores(),
        out_dir="",
        flops=flops,
        memory_budget_bytes=plan.budget_bytes,
        checkpointing=plan.checkpointing,
        max_tokens_per_pass=plan.max_tokens_per_pass,
    )

    def run(one: RunSpec) -> dict[str, Any]:
        # --run-beyond-estimate: the engine's `auto` checkpointing under the budget is the guard left
        beyond = one.method == "pack" and plan.run_beyond_estimate
        skip = None if beyond else skip_reason(one, plan.budget_bytes)
        if skip is not None:
            shutil.rmtree(one.out_dir, ignore_errors=True)
            return log_row({**finish_row(one, {"error": skip}, peaks), "status": "skipped", "note": skip})
        row = run_single(one, peaks)
        if one.method == "pack":
            row["estimate_mb"] = memory_estimate_mb(one, checkpointing=row.get("checkpointed") is True)
        return log_row(row)

    def spec(method: str, k: int, **kw: Any) -> RunSpec:
        out_dir = tempfile.mkdtemp(prefix=f"{config}-{method}-k{k}-", dir=plan.workdir)
        chosen = {"names": tuple(names[:k]), "data_paths": tuple(paths[:k])}
        return replace(template, method=method, out_dir=out_dir, **chosen, **kw)

    rows: list[dict[str, Any]] = []
    for method in ("pack", "peft-padded", "peft-packed"):
        if method in plan.methods:
            rows += [run(spec(method, k)) for k in plan.ks]
    if "pack" in plan.methods and plan.kernel_rows:
        k = max(plan.ks)
        for kernel, packing in (("loop", True), ("grouped", True), ("auto", False)):
            row = run(spec("pack", k, kernel=kernel, packing=packing))
            rows.append({**row, "packing": packing})
    packs = [r for r in rows if r["method"] == "pack" and r["status"] == "ok" and r["k"] == 1]
    if "procs" in plan.methods:
        for k in plan.ks:
            if k > 1:
                skip = procs_skip_reason(k, packs[0] if packs else None, plan.device)
                rows.append(log_row(run_procs(spec("procs", k), peaks, skip)))
    for row in rows:
        row.setdefault("packing", True if row["method"] in ("pack", "procs") else None)
    return rows


def log_row(row: dict[str, Any]) -> dict[str, Any]:
    label = (
        f"[{row['config']} s{row['seq']} {row['dtype']} K={row['k']:>2} {row['method']:<11} "
        f"{row.get('kernel') or '':<7}]"
    )
    if row["status"] == "ok":
        print(
            f"{label} {row['tokens_per_s']:9.0f} tok/s  steady {row['steady_s']:7.2f}s  "
            f"peak RSS {row['peak_rss_mb']:7.0f} MB  {row['fraction_of_peak']:6.1%} of peak  "
            f"pad {row.get('pad_fraction', 0):5.1%}  loss {row['mean_final_loss']:.4f}",
            flush=True,
        )
    else:
        print(f"{label} {row['status']}: {row.get('note') or row.get('error')}", flush=True)
    return row


BASELINES = ("peft-padded", "peft-packed")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """tokens/s of every lorafleet row over each sequential-PEFT baseline at the same configuration."""
    key = ("config", "seq", "dtype", "k")
    refs = {
        (r["method"], *(r[f] for f in key)): r
        for r in rows
        if r["method"] in BASELINES and r["status"] == "ok"
    }
    for row in rows:
        if row["status"] != "ok" or row["method"] in BASELINES:
            continue
        for base in BASELINES:
            ref = refs.get((base, *(row[f] for f in key)))
            if ref is None:
                continue
            row[f"vs_{base}"] = row["tokens_per_s"] / ref["tokens_per_s"]
            losses = row["final_losses"]
            diffs = [abs(losses[n] - ref["final_losses"][n]) for n in losses if n in ref["final_losses"]]
            row[f"dloss_vs_{base}"] = max(diffs) if diffs else None
