"""Benchmark: K LoRA adapters in one lorafleet pack vs sequential PEFT (padded, packed) vs K processes.

Run from the repository root with the project's venv active (`pip install -e ".[bench]"`):

    python benchmarks/bench_multilora.py --smoke      # harness check: SmolLM2-135M, seq 512, K=1,2, 2 steps
    python benchmarks/bench_multilora.py              # the full sweep (hours on a CPU: benchmarks/README.md)
    python benchmarks/bench_multilora.py --configs smollm2-135m --seqs 512 --ks 1,8 --dtypes bfloat16

Bases are random-init models of real shapes (`benchmarks/configs/*.json`), data has log-normal document
lengths; the modules under `multilora_bench/` do the work: `workload` (bases, data, FLOPs), `methods`
(the ways of training K adapters), `harness` (measuring, child processes, the sweep), `report` (JSON,
markdown, PNG into `benchmarks/results/multilora-<device>[-smoke].*`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

# This checkout's engine and benchmark modules, whatever lorafleet is installed (children inherit it).
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import psutil  # noqa: E402
import torch  # noqa: E402
from multilora_bench import harness, report  # noqa: E402
from multilora_bench.workload import MEDIAN_TOKENS, config_names  # noqa: E402

RESULTS_DIR = HERE / "results"
METHODS = ("pack", "peft-padded", "peft-packed", "procs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(config_names()), help="names in benchmarks/configs/")
    p.add_argument("--seqs", default="512,2048", help="max_seq_len values")
    p.add_argument("--dtypes", default="float32,bfloat16", help="base dtypes (LoRA is always fp32)")
    p.add_argument("--ks", default="1,4,8,16", help="numbers of adapters")
    p.add_argument("--methods", default=",".join(METHODS), help=f"any of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per adapter")
    p.add_argument("--warmup", type=int, default=2, help="steps per adapter left out of the timing")
    p.add_argument("--batch-size", type=int, default=4, help="documents per adapter and step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--all-linear", action="store_true", help="LoRA on every linear but the head")
    p.add_argument("--no-kernel-rows", action="store_true", help="skip the loop/grouped/unpacked rows")
    p.add_argument("--wait-idle", type=float, default=60.0, help="seconds to wait for load avg < 0.5")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--peak-n", type=int, default=0, help="matmul size for the peak (0: 2048 cpu, 8192 cuda)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorafleet-bench")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="the packs' activation checkpointing (auto: only when the memory model says it must)",
    )
    p.add_argument(
        "--max-tokens-per-pass",
        type=int,
        default=0,
        help="the packs' pass size (0: the engine's default, 1024 on CPU; a huge value: one pass a step)",
    )
    p.add_argument(
        "--run-beyond-estimate",
        action="store_true",
        help="run pack rows the memory model's worst case (every document max_seq_len long) says would "
        "not fit; the engine still checkpoints any pass that would not fit the budget",
    )
    p.add_argument("--tag", default="", help="results file suffix: multilora-<device>[-<tag>]")
    p.add_argument("--render", type=Path, help="only re-write the .md and .png of this results .json")
    p.add_argument(
        "--re-estimate",
        action="store_true",
        help="with --render: recompute the est. MB column with the current memory model first",
    )
    p.add_argument("--smoke", action="store_true", help="harness check: 1 config, seq 512, K=1,2, 2 steps")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.smoke:
        args.configs, args.seqs, args.dtypes, args.ks = "smollm2-135m", "512", "float32", "1,2"
        args.steps, args.warmup, args.batch_size, args.no_kernel_rows = 2, 1, 2, True
    if args.warmup < 1 or args.steps <= args.warmup:
        p.error("need 1 <= --warmup < --steps")
    return args


def ints(text: str) -> tuple[int, ...]:
    return tuple(sorted({int(x) for x in text.split(",")}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render is not None:
        if args.re_estimate:
            harness.re_estimate(args.render)
        return report.render(args.render)
    harness.quiet_libraries()
    load_at_start = harness.wait_for_idle(args.wait_idle)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    dtypes = tuple(args.dtypes.split(","))
    peak_n = args.peak_n or (8192 if device == "cuda" else 2048)
    peaks = {d: harness.measure_matmul_peak(device, d, peak_n) for d in dtypes}
    info = harness.machine_info(device)
    shown = ", ".join(f"{d} {p / 1e9:.1f}" for d, p in peaks.items())
    print(f"{info['cpu_model']} · {info['cores']} cores · {device} · peak GFLOP/s: {shown}", flush=True)
    memory = (
        torch.cuda.get_device_properties(0).total_memory
        if device == "cuda"
        else psutil.virtual_memory().total
    )
    targets: tuple[str, ...] | str = "all-linear" if args.all_linear else tuple(args.targets.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    plan = harness.Sweep(
        configs=tuple(args.configs.split(",")),
        seqs=ints(args.seqs),
        dtypes=dtypes,
        ks=ints(args.ks),
        methods=tuple(args.methods.split(",")),
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        r=args.r,
        alpha=args.alpha,
        learning_rate=args.lr,
        targets=targets,
        kernel_rows=not args.no_kernel_rows,
        device=device,
        workdir=args.workdir,
        memory_bytes=memory,
        checkpointing=args.checkpointing,
        max_tokens_per_pass=args.max_tokens_per_pass or None,
        run_beyond_estimate=args.run_beyond_estimate,
    )
    rows = harness.sweep(plan, peaks)
    harness.add_ratios(rows)
    info["load_average_at_start"], info["load_average_at_end"] = load_at_start, harness.load_average()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(
        peak_n=peak_n,
        peak_repeats=5,
        median_tokens=MEDIAN_TOKENS,
        targets="all-linear" if args.all_linear else args.targets,
    )
    out = {"machine": info, "config": config, "peak_flops": peaks, "rows": rows, "notes": report.notes()}
    tag = "-".join(t for t in (device, "smoke" if args.smoke else "", args.tag) if t)
    report.write_outputs(out, args.out, tag)
    return out


if __name__ == "__main__":
    main()
