"""Where a pack step's time goes: torch.profiler over a few steps of `run_pack`, at a real shape.

    python benchmarks/profile_pack.py --config qwen2.5-0.5b --dtype bfloat16 --k 1
    python benchmarks/profile_pack.py --config smollm2-135m --dtype float32 --k 8

Same bases and data as `bench_multilora.py` (random-init bases from `configs/`, log-normal lengths).
Writes `results/profile-<config>-<dtype>-k<K>.md`: the operators by self CPU time over the profiled steps,
grouped into matmuls, attention, the head/loss, elementwise and the rest, with each group's share, and the
achieved FLOP/s of the matmuls against the measured matmul peak of the dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
from multilora_bench import harness  # noqa: E402
from multilora_bench.workload import adapter_names, build_model, write_dataset  # noqa: E402

GROUPS = {
    "matmul (linears, LoRA)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "flash_attention"),
    "elementwise / norms / activations": (
        "aten::mul",
        "aten::add",
        "aten::silu",
        "aten::pow",
        "aten::rsqrt",
        "aten::mean",
        "aten::neg",
        "aten::cat",
        "aten::sub",
        "aten::div",
        "aten::exp",
        "aten::sigmoid",
    ),
    "copies / casts / layout": (
        "aten::copy_",
        "aten::to",
        "aten::_to_copy",
        "aten::contiguous",
        "aten::clone",
        "aten::index",
        "aten::index_select",
        "aten::index_add",
        "aten::fill_",
        "aten::zero_",
        "aten::embedding",
    ),
    "optimizer": ("aten::_foreach", "Optimizer.step"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorafleet-bench")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

    from workers.bases.tiny import TOKENIZER_DIR
    from workers.contract.plan import AdapterTask, DataConfig, LoraConfig, PackPlan, TrainConfig
    from workers.training.pack import run_pack

    harness.quiet_libraries()
    base = build_model(args.config, args.workdir)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    peak = harness.measure_matmul_peak("cpu", args.dtype, 2048)
    names = adapter_names(args.k)
    train = TrainConfig(
        steps=args.steps + 1,
        batch_size=args.batch_size,
        max_seq_len=args.seq,
        eval_every=0,
        checkpoint_every=0,
    )
    out_dir = Path(tempfile.mkdtemp(prefix="profile-", dir=args.workdir))
    tasks = [
        AdapterTask(
            name=name,
            lora=LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            train=train,
            data=DataConfig(
                path=write_dataset(
                    args.workdir / "data" / f"{args.config}-s{args.seq}-{i}.jsonl", vocab, args.seq, i
                )
            ),
            output_dir=out_dir / name,
        )
        for i, name in enumerate(names)
    ]
    tokenizer = base / TOKENIZER_DIR
    plan = PackPlan(
        base_model=str(base), tokenizer=str(tokenizer), device="cpu", dtype=args.dtype, adapters=tasks
    )
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True)
    seen: dict[str, int] = {}
    prior: dict[str, int] = {}
    window: list[float] = []
    tokens = [0]

    def emit(event) -> None:
        if event.kind != "step":
            return
        seen[event.adapter] = event.step
        if event.step == 1 and len([s for s in seen.values() if s >= 1]) == args.k:
            window.append(time.monotonic())
            profiler.start()
        if event.step > 1:
            tokens[0] += event.tokens - prior.get(event.adapter, 0)
        prior[event.adapter] = event.tokens

    run_pack(plan, emit)
    profiler.stop()
    seconds = time.monotonic() - window[0]
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_group: dict[str, float] = {}
    for e in events:
        by_group[group_of(e.key)] = by_group.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    matmul_flops = sum(e.flops for e in events if group_of(e.key).startswith("matmul"))
    matmul_s = by_group.get("matmul (linears, LoRA)", 0.0) / 1e6
    lines = [
        f"# Profile: {args.config}, {args.dtype}, pack of {args.k}, seq {args.seq}, batch {args.batch_size}",
        "",
        f"{args.steps} steps profiled (after one warm-up step) on {harness.cpu_model()} "
        f"({harness.usable_cores()} cores), torch {torch.__version__}: {seconds:.1f} s, "
        f"{tokens[0] / seconds:.0f} non-pad tokens/s (profiler overhead included).",
        f"Matmuls: {matmul_flops / 1e9:.0f} GFLOP in {matmul_s:.1f} s of self time = "
        f"{matmul_flops / max(matmul_s, 1e-9) / 1e9:.0f} GFLOP/s, against a measured {args.dtype} "
        f"matmul peak of {peak / 1e9:.0f} GFLOP/s (2048² mm).",
        "",
        "| group | self CPU s | share |",
        "|---|---:|---:|",
        *(
            f"| {g} | {t / 1e6:.2f} | {t / total:.1%} |"
            for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])
        ),
        "",
        "Top operators by self CPU time:",
        "",
        "```",
        events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48),
        "```",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{args.config}-{args.dtype}-k{args.k}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines[: 12 + len(by_group)]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
