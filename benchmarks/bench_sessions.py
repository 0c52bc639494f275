"""Benchmark: N interactive training sessions on the real base, sharing one worker's clock cycles or not.

Run from the repository root with the project's venv active, after `lorafleet models pull
smollm2-135m-instruct` (same LORAFLEET_HOME, or `--home`):

    python benchmarks/bench_sessions.py --ns 1,2 --rounds 1 --tag smoke    # harness check, minutes
    python benchmarks/bench_sessions.py --ns 1,4,16 --rounds 4              # -> results/sessions-cpu.*
    python benchmarks/bench_sessions.py --render benchmarks/results/sessions-cpu.json   # redraw .md/.png

N clients each run the same supervised loop (per round: `forward_backward` of `--batch` datums with
cross-entropy weights 1/(target tokens), then `optim_step`, then wait for both) in lock-step rounds, three
ways, on the same sessions (names, seeds, LoRA, data):

- **shared**: one `SessionHost` in one process, N client threads that queue their round's calls at once
  (a barrier starts each round), so the host packs every session's forward_backward into the same cycle.
- **sequential**: the same N sessions on one host, served one at a time: a round runs session 0's step to
  completion, then session 1's, ... (the host never sees two sessions' calls in one cycle).
- **procs**: N processes, each its own host (its own copy of the base) with one session and `cores // N`
  torch threads; the parent starts each round in all of them and waits for all.

The host is driven in process (`workers.sessions.host.SessionHost`, as `orchestrator.service.sessions`
drives it, with its cycle thread started), not over HTTP: the numbers are the engine's, without the API.
Each mode runs in fresh processes, so peak RSS (VmHWM) is its own. Reported per (N, mode): trained target
tokens per wall second over the rounds after the warm-up, per-round latency (all N finished one step),
the host's cycle latency (timed by wrapping `SessionHost.run_cycle` in the child), cycles, passes and
sessions per pass (`SessionHost.counters`), peak RSS per process and in total, and the largest
difference between the shared (and procs) adapters and the sequential ones after the last round (the host
promises a session's weights do not depend on who shared its cycles). A "what a GPU changes" section is
computed from `workers.contract.memory`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from multilora_bench.harness import (  # noqa: E402
    load_average,
    machine_info,
    peak_rss_mb,
    usable_cores,
    wait_for_idle,
)

MODES = ("shared", "sequential", "procs")
RAM_FRACTION = 0.7  # procs is skipped when N x (one process's peak RSS) would pass this share of RAM
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}  # the example job's recipe
ADAM = {"learning_rate": 5e-3, "grad_clip_norm": 1.0}
GPUS_GB = {"H100 80 GB": 80, "H200 141 GB": 141}
GPU_SHARE = 0.9  # of a GPU's memory a host plans passes for (workers.sessions.host.GPU_MEMORY_SHARE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct", help="a catalogued name or directory")
    p.add_argument("--home", type=Path, default=None, help="LORAFLEET_HOME holding the converted base")
    p.add_argument("--ns", default="1,4,16", help="numbers of sessions (clients)")
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {','.join(MODES)}")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (one step of every session each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    p.add_argument("--batch", type=int, default=4, help="datums per forward_backward")
    p.add_argument(
        "--seq", type=int, default=96, help="longest datum (tokens); lengths uniform in seq/2..seq"
    )
    p.add_argument("--dtype", default="float32", help="base dtype (bf16 is ~30x slower on AVX2-only CPUs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (default: all cores; procs: cores // N)",
    )
    p.add_argument("--wait-idle", type=float, default=60, help="seconds to wait for a quiet machine")
    p.add_argument("--tag", default=None, help="results/sessions-<tag>.* (default: the device)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--note", default="", help="a line for the report, e.g. that the machine was shared")
    p.add_argument(
        "--reading", default="", help="a paragraph reading the results (or edit the JSON, --render)"
    )
    p.add_argument("--render", type=Path, help="redraw .md/.png from this JSON (nothing re-measured)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON of one host-mode run: run it, print a row
    p.add_argument("--proc", help=argparse.SUPPRESS)  # JSON of one procs-mode session: serve rounds on stdin
    return p.parse_args(argv)


# ---- pure helpers (tests/test_bench_sessions.py) ----


def round_tokens(session: int, round_: int, *, batch: int, seq: int, vocab: int) -> list[list[int]]:
    """The token sequences session `session` trains on in round `round_`: `batch` sequences of seq/2..seq
    tokens (a datum is a sequence less its last token), ids drawn from the vocabulary past the first 16
    (special tokens). The same (session, round) gives the same sequences in every mode and process."""
    import random

    rng = random.Random(f"{session}:{round_}")
    return [
        [rng.randrange(16, vocab) for _ in range(rng.randint(max(2, seq // 2), seq) + 1)]
        for _ in range(batch)
    ]


def target_count(sequences: list[list[int]]) -> int:
    """Trained target tokens of a batch: every token but each sequence's first."""
    return sum(len(s) - 1 for s in sequences)


def summarize(latencies: list[float], tokens: list[int], warmup: int) -> dict[str, float]:
    """Throughput and round latency over the rounds after the warm-up (`latencies[r]`: wall seconds from
    round r's start until all N finished it; `tokens[r]`: target tokens all N trained in it)."""
    timed, done = latencies[warmup:], tokens[warmup:]
    if not timed:
        raise ValueError(f"{len(latencies)} rounds with {warmup} of warm-up leave none to time")
    return {
        "tokens_per_s": sum(done) / sum(timed),
        "round_s_median": statistics.median(timed),
        "round_s_max": max(timed),
        "timed_tokens": sum(done),
    }


def gains(rows: list[dict[str, Any]]) -> None:
    """Add to every shared row its throughput over the sequential and procs rows of the same N."""
    by = {(r["n"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    for (n, mode), row in by.items():
        if mode != "shared":
            continue
        for other in ("sequential", "procs"):
            if (n, other) in by:
                row[f"x_{other}"] = round(row["tokens_per_s"] / by[(n, other)]["tokens_per_s"], 2)


def procs_skip_reason(n: int, one_rss_mb: float | None, ram_mb: float) -> str | None:
    """N processes each hold a base: skip when N x one's peak RSS passes RAM_FRACTION of the RAM."""
    if one_rss_mb is None or n * one_rss_mb <= RAM_FRACTION * ram_mb:
        return None
    ram = f"{RAM_FRACTION:.0%} of {ram_mb / 1024:.1f} GB RAM"
    return f"{n} x {one_rss_mb:.0f} MB (one process's peak RSS) > {ram}"


def gpu_capacity(config: dict[str, Any], session_tokens: float) -> list[dict[str, Any]]:
    """From the memory model: the most tokens one training pass holds on each GPU of `GPUS_GB` for this
    base (bf16 and fp32, varlen attention, LoRA on any linear, 90% of the card, base and runtime resident),
    and how many sessions' steps of `session_tokens` tokens that is; and the CPU's pass for comparison."""
    from workers.contract import memory

    info = memory.model_info_from_config(config)
    rows = []
    for dtype in ("bfloat16", "float32"):
        static = memory.base_weight_bytes(info, "none", dtype) + memory.RUNTIME_OVERHEAD_BYTES
        for gpu, gb in GPUS_GB.items():
            tokens = memory.pass_token_budget(
                info,
                dtype,
                budget_bytes=int(gb * 1e9 * GPU_SHARE),
                static_bytes=static,
                lora=memory.LoraInputs(True, True),
                varlen=True,
            )
            rows.append(
                {
                    "device": gpu,
                    "dtype": dtype,
                    "pass_tokens": tokens,
                    "sessions": int(tokens // session_tokens),
                }
            )
    rows.append(
        {
            "device": "CPU (memory.CPU_PASS_TOKENS)",
            "dtype": "float32",
            "pass_tokens": memory.CPU_PASS_TOKENS,
            "sessions": int(memory.CPU_PASS_TOKENS // session_tokens),
        }
    )
    return rows


# ---- children ----


def _load(config: dict[str, Any]) -> tuple[Any, float, float]:
    """The base and a host over it; the load time and the RSS high-water mark once loaded."""
    import torch

    from workers.engine.model import load_base
    from workers.sessions.host import SessionHost

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    started = time.perf_counter()
    home = Path(config["home"]) if config.get("home") else None
    loaded = load_base(config["base"], dtype=config["dtype"], device=config["device"], home=home)
    host = SessionHost(loaded, config["base"])
    return host, time.perf_counter() - started, peak_rss_mb()


def _timed_cycles(host: Any) -> list[tuple[float, float, int]]:
    """Wrap the host's `run_cycle` (its cycle thread calls it): (start, seconds, sessions served) of each
    cycle that ran. Nothing in the host changes; the benchmark reads its own clock around it."""
    cycles: list[tuple[float, float, int]] = []
    take, run = host._take_cycle, host.run_cycle
    served = [0]

    def take_cycle() -> Any:
        cycle, ops = take()
        served[0] = len(cycle.taken) if cycle is not None else 0
        return cycle, ops

    def run_cycle() -> bool:
        started = time.perf_counter()
        ran = run()
        if ran:
            cycles.append((started, time.perf_counter() - started, served[0]))
        return ran

    host._take_cycle, host.run_cycle = take_cycle, run_cycle
    return cycles


def _step(host: Any, session: str, sequences: list[list[int]]) -> None:
    """One supervised step: forward_backward of the mean cross-entropy, then optim_step; both queued
    before waiting, as a Tinker client does."""
    from workers.contract.sessions import AdamParams, Datum

    n = target_count(sequences)
    data = [Datum.from_sequence(s, weights=[1.0 / n] * (len(s) - 1)) for s in sequences]
    fb = host.forward_backward(session, data)
    opt = host.optim_step(session, AdamParams(**ADAM))
    fb.result()
    opt.result()


def _create(host: Any, i: int) -> str:
    from workers.contract.plan import LoraConfig

    return host.create_session(f"s{i}", LoraConfig(**LORA), seed=i)


def _weights(host: Any, session: str) -> dict[str, Any]:
    adapter = host.sessions[session].adapter
    return {
        f"{session}.{p}.{m}": getattr(w, m).detach().clone()
        for p, w in adapter.modules.items()
        for m in ("lora_A", "lora_B")
    }


def run_host(config: dict[str, Any]) -> dict[str, Any]:
    """The shared or sequential mode in this process: N sessions on one host, lock-step rounds."""
    import torch

    host, load_s, base_rss = _load(config)
    n, rounds, vocab = config["n"], config["warmup"] + config["rounds"], host.vocab_size
    sessions = [_create(host, i) for i in range(n)]
    data = [
        [round_tokens(i, r, batch=config["batch"], seq=config["seq"], vocab=vocab) for r in range(rounds)]
        for i in range(n)
    ]
    cycles = _timed_cycles(host)
    host.start()
    starts: list[float] = []
    ends: list[list[float]] = [[0.0] * n for _ in range(rounds)]
    if config["mode"] == "shared":
        barrier = threading.Barrier(n, action=lambda: starts.append(time.perf_counter()))
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                for r in range(rounds):
                    barrier.wait()
                    _step(host, sessions[i], data[i][r])
                    ends[r][i] = time.perf_counter()
            except BaseException as exc:  # surfaced below: a failed client must fail the run
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    else:
        for r in range(rounds):
            starts.append(time.perf_counter())
            for i in range(n):
                _step(host, sessions[i], data[i][r])
                ends[r][i] = time.perf_counter()
    host.shutdown()
    latencies = [max(ends[r]) - starts[r] for r in range(rounds)]
    tokens = [sum(target_count(data[i][r]) for i in range(n)) for r in range(rounds)]
    timed_from = starts[config["warmup"]]
    cycle_s = [s for start, s, _ in cycles if start >= timed_from]
    weights: dict[str, Any] = {}
    for s in sessions:
        weights.update(_weights(host, s))
    torch.save(weights, config["weights"])
    return {
        **summarize(latencies, tokens, config["warmup"]),
        "round_s": [round(x, 3) for x in latencies],
        "cycle_s_median": statistics.median(cycle_s) if cycle_s else None,
        "cycles_per_round": len(cycle_s) / config["rounds"],
        "sessions_per_cycle": statistics.mean([k for start, _, k in cycles if start >= timed_from] or [0]),
        **{k: v for k, v in host.counters.items()},
        "pass_tokens": host.pass_tokens,
        "threads_per_process": torch.get_num_threads(),
        "load_s": load_s,
        "base_rss_mb": base_rss,
        "peak_rss_mb": peak_rss_mb(),
        "processes": 1,
        "total_rss_mb": peak_rss_mb(),
        "config_json": host.model.base.config.to_dict(),
    }


def serve_proc(config: dict[str, Any]) -> None:
    """One procs-mode session: load, say ready, then run one step per `go` line, answering each with its
    trained tokens; at `end`, save the weights and answer with the process's numbers."""
    import torch

    host, load_s, base_rss = _load(config)
    session = _create(host, config["index"])
    cycles = _timed_cycles(host)
    host.start()
    _say({"ready": True})
    for line in sys.stdin:
        if line.strip() == "end":
            break
        r = int(line)
        sequences = round_tokens(
            config["index"], r, batch=config["batch"], seq=config["seq"], vocab=host.vocab_size
        )
        before = len(cycles)
        _step(host, session, sequences)
        deadline = time.monotonic() + 5  # the cycle is recorded just after it resolved the step's futures
        while len(cycles) == before and time.monotonic() < deadline:
            time.sleep(0.001)
        ran = [s for _, s, _ in cycles[before:]]
        _say({"round": r, "tokens": target_count(sequences), "cycle_s": sum(ran) if ran else None})
    host.shutdown()
    torch.save(_weights(host, session), config["weights"])
    _say({"load_s": load_s, "base_rss_mb": base_rss, "peak_rss_mb": peak_rss_mb(), **host.counters})


def _say(message: dict[str, Any]) -> None:
    print("@@" + json.dumps(message), flush=True)


def _hear(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The child's next protocol line (library chatter on stdout is skipped)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"a procs child ended early (exit {proc.wait()}); see its stderr above")


def run_procs(config: dict[str, Any], work: Path) -> dict[str, Any]:
    """N processes, one session each; the parent starts every round in all of them and waits for all."""
    n, rounds = config["n"], config["warmup"] + config["rounds"]
    threads = max(1, usable_cores() // n)
    if config.get("threads"):
        threads = min(threads, config["threads"])
    procs = []
    for i in range(n):
        child = {**config, "index": i, "threads": threads, "weights": str(work / f"procs-{n}-{i}.pt")}
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--proc", json.dumps(child)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for p in procs:
            _hear(p)  # every base loaded before the clock starts
        latencies, tokens, cycle_s = [], [], []
        for r in range(rounds):
            started = time.perf_counter()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(f"{r}\n")
                p.stdin.flush()
            answers = [_hear(p) for p in procs]
            latencies.append(time.perf_counter() - started)
            tokens.append(sum(a["tokens"] for a in answers))
            if r >= config["warmup"]:
                cycle_s += [a["cycle_s"] for a in answers if a["cycle_s"] is not None]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("end\n")
            p.stdin.flush()
        finals = [_hear(p) for p in procs]
    finally:
        for p in procs:
            p.wait(timeout=120)
    return {
        **summarize(latencies, tokens, config["warmup"]),
        "round_s": [round(x, 3) for x in latencies],
        "cycle_s_median": statistics.median(cycle_s) if cycle_s else None,
        "cycles_per_round": 1.0,
        "sessions_per_cycle": 1.0,
        "cycles": sum(f["cycles"] for f in finals),
        "passes": sum(f["passes"] for f in finals),
        "max_sessions_per_pass": max(f["max_sessions_per_pass"] for f in finals),
        "threads_per_process": threads,
        "load_s": max(f["load_s"] for f in finals),
        "base_rss_mb": max(f["base_rss_mb"] for f in finals),
        "peak_rss_mb": max(f["peak_rss_mb"] for f in finals),
        "processes": n,
        "total_rss_mb": sum(f["peak_rss_mb"] for f in finals),
    }


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    """A host mode in a fresh process: its peak RSS is its own."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)], stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{config['mode']} N={config['n']} failed (exit {done.returncode}); see stderr above"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_diff(a_path: Path | list[Path], b_path: Path) -> float:
    """The largest absolute difference between two runs' final adapters (same sessions, same keys)."""
    import torch

    b = torch.load(b_path)
    a: dict[str, Any] = {}
    for path in a_path if isinstance(a_path, list) else [a_path]:
        a.update(torch.load(path))
    if a.keys() != b.keys():
        raise ValueError(f"the runs trained different adapters: {sorted(a.keys() ^ b.keys())[:4]}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---- the report ----


def markdown(doc: dict[str, Any]) -> str:
    m, a = doc["machine"], doc["args"]
    lines = [
        f"# Training sessions on the real base `{a['base']}` ({m['device']}, {a['dtype']})",
        "",
        f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gb']} GB; torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']}; {m['date']}. Load average {doc['load_start']:.2f} at the "
        f"start, {doc['load_end']:.2f} at the end.",
        "",
        "N clients, each a supervised loop: per round `forward_backward` of "
        f"{a['batch']} random-token datums of {a['seq'] // 2}-{a['seq']} tokens (cross-entropy, "
        "weights 1/targets) then `optim_step` (AdamW "
        f"lr {ADAM['learning_rate']}, clip {ADAM['grad_clip_norm']}), LoRA r={LORA['r']} on "
        f"{'/'.join(LORA['target_modules'])}; {a['warmup']} warm-up round(s), then {a['rounds']} timed. "
        "**shared**: one `SessionHost`, N client threads queueing each round at once; **sequential**: the "
        "same sessions on one host, one step at a time; **procs**: N processes with a host (and a base) "
        "each, `cores // N` threads. The host is driven in process (no HTTP). tokens/s = target tokens of "
        "the timed rounds / their wall time; round = until all N finished one step; cycle = the host's "
        "`run_cycle` (median over timed rounds); RSS = VmHWM, per process and summed. Torch threads per "
        f"process: {a.get('threads') or 'all cores'} (procs: at most cores // N).",
        "",
    ]
    if doc.get("note"):
        lines += [f"**{doc['note']}**", ""]
    lines += [
        "| N | mode | tokens/s | × seq. | × procs | round s (median) | cycle s | cycles/round "
        "| sessions/pass (max) | passes (all rounds) | RSS MB/process | total RSS MB | Δ weights vs seq. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['n']} | {r['mode']} | {r.get('status')} | | | | | | | | | | |")
            continue
        cycle = f"{r['cycle_s_median']:.2f}" if r.get("cycle_s_median") is not None else ""
        diff = f"{r['max_diff_vs_sequential']:.1e}" if r.get("max_diff_vs_sequential") is not None else ""
        lines.append(
            f"| {r['n']} | {r['mode']} | {r['tokens_per_s']:.0f} | {r.get('x_sequential', '')} "
            f"| {r.get('x_procs', '')} | {r['round_s_median']:.2f} | {cycle} | {r['cycles_per_round']:.1f} "
            f"| {r['max_sessions_per_pass']} | {r['passes']} | {r['peak_rss_mb']:.0f} "
            f"| {r['total_rss_mb']:.0f} | {diff} |"
        )
    if doc.get("reading"):
        lines += ["", doc["reading"]]
    lines += ["", "## What a GPU changes", "", *gpu_section(doc)]
    return "\n".join(lines) + "\n"


def gpu_section(doc: dict[str, Any]) -> list[str]:
    gpu, per_session = doc["gpu"], doc["session_tokens"]
    table = [
        "| device | base dtype | tokens in one pass | sessions' steps in one pass |",
        "|---|---|---|---|",
        *(f"| {g['device']} | {g['dtype']} | {g['pass_tokens']:,} | {g['sessions']:,} |" for g in gpu),
    ]
    return [
        f"One session's step here trains {per_session:.0f} tokens. From `workers.contract.memory` "
        f"(`pass_token_budget`: {GPU_SHARE:.0%} of the card, the base and runtime resident, LoRA on any "
        "linear, variable-length attention), one training pass of this base holds:",
        "",
        *table,
        "",
        "(Each session's own LoRA state, a few MB at this rank, is left out: it does not change these "
        "numbers.) On a CPU the shared host is not expected to beat one session at a time by much: a "
        "CPU's matmuls are already compute-bound at a few hundred rows (`CPU_PASS_TOKENS` is 1,024 because "
        "8,192 rows are no faster per token), so a pass of N sessions costs about N times a pass of one, "
        "and what sharing saves is only the per-pass and per-call overhead (Python, kernel dispatch, the "
        "head's chunks). N processes do worse still: they split the same cores and each holds a base. On a "
        f"GPU a pass of one session's {per_session:.0f} tokens leaves the device idle (an H100 needs "
        "thousands of rows per matmul to approach its peak, and a 135M base's pass is dominated by kernel "
        "launches and the layer-by-layer latency at this size), so packing N sessions into one pass costs "
        "little more than one: the shared host's tokens/s should grow close to N-fold until the pass "
        f"reaches a few thousand tokens (4,096 tokens are {4096 // per_session:.0f} sessions of this step), "
        "and the memory model leaves room for far more tokens than that per pass. N processes on one GPU "
        "would each hold a base and a CUDA context, and time-slice the device rather than fill it. Not "
        "measured yet: run with `--device cuda` on a GPU.",
    ]


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode, label in (("shared", "shared host"), ("sequential", "one at a time"), ("procs", "N processes")):
        mine = sorted((r["n"], r) for r in rows if r["mode"] == mode)
        if not mine:
            continue
        ns = [n for n, _ in mine]
        axes[0].plot(ns, [r["tokens_per_s"] for _, r in mine], marker="o", label=label)
        axes[1].plot(ns, [r["round_s_median"] for _, r in mine], marker="o", label=label)
        axes[2].plot(ns, [r["total_rss_mb"] for _, r in mine], marker="o", label=label)
    titles = ("trained tokens/s", "round latency s (all N one step)", "total peak RSS MB")
    ns_all = sorted({r["n"] for r in rows})
    for ax, title in zip(axes, titles, strict=True):
        ax.set(title=title, xlabel="N sessions")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns_all, [str(n) for n in ns_all])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Training sessions on {doc['args']['base']} ({doc['machine']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    plot(doc, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png")


# ---- the sweep ----


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_host(json.loads(args.child))))
        return
    if args.proc:
        serve_proc(json.loads(args.proc))
        return
    if args.render:
        doc = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(doc))
        plot(doc, args.render.with_suffix(".png"))
        print(f"rendered {args.render.with_suffix('.md')}, .png")
        return
    import psutil

    ns = [int(x) for x in args.ns.split(",")]
    modes = [m for m in MODES if m in args.modes.split(",")]
    load_start = wait_for_idle(args.wait_idle)
    work = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    common = {
        "base": args.base,
        "home": str(args.home) if args.home else None,
        "dtype": args.dtype,
        "device": args.device,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "threads": args.threads,
    }
    rows: list[dict[str, Any]] = []
    config_json: dict[str, Any] | None = None
    one_rss: float | None = None
    ram_mb = psutil.virtual_memory().total / 2**20
    for n in ns:
        weights: dict[str, Any] = {}
        for mode in modes:
            config = {**common, "n": n, "mode": mode}
            if mode == "procs":
                skip = procs_skip_reason(n, one_rss, ram_mb)
                if skip:
                    rows.append({"n": n, "mode": mode, "status": f"skipped: {skip}"})
                    continue
                row = run_procs(config, work)
                weights[mode] = [work / f"procs-{n}-{i}.pt" for i in range(n)]
            else:
                weights[mode] = work / f"{mode}-{n}.pt"
                row = run_child({**config, "weights": str(weights[mode])})
                config_json = row.pop("config_json")
            if one_rss is None and mode != "procs":  # a host of the fewest sessions: one process's share
                one_rss = row["peak_rss_mb"]
            row = {"n": n, "mode": mode, "status": "ok", **row}
            print(json.dumps({k: v for k, v in row.items() if k != "round_s"}), flush=True)
            rows.append(row)
        if "sequential" in weights:
            for row in rows:
                if row["n"] == n and row["mode"] in weights and row["mode"] != "sequential":
                    row["max_diff_vs_sequential"] = max_diff(weights[row["mode"]], weights["sequential"])
        gains(rows)
        # after every N, so a long sweep that is stopped still leaves what it measured
        ok = [r for r in rows if r.get("status") == "ok"]
        session_tokens = (
            statistics.mean(r["timed_tokens"] / r["n"] / args.rounds for r in ok) if ok else math.nan
        )
        doc = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine_info(args.device),
            "load_start": load_start,
            "load_end": load_average(),
            "note": args.note,
            "reading": args.reading,
            "session_tokens": session_tokens,
            "gpu": gpu_capacity(config_json, session_tokens) if config_json else [],
            "rows": rows,
        }
        write(doc, args.out / f"sessions-{args.tag or args.device}")


if __name__ == "__main__":
    main()
