"""Benchmark: a pack of K adapters on the real SmolLM2-135M-Instruct base, fp32 / bf16 / 8-bit / 4-bit.

Run from the repository root with the project's venv active, after `lorafleet models pull
smollm2-135m-instruct` (same LORAFLEET_HOME):

    python benchmarks/bench_real_base.py                     # K=4, 30 steps (2 warm-up)
    python benchmarks/bench_real_base.py --ks 1,4 --steps 8

Each configuration runs in a fresh child process, so its peak RSS (VmHWM) is its own. The pack trains the
example job's recipe (LoRA r=8 on q/v, lr 5e-3, batch 4) on the real skills of `workers/evaluation/skills.py`
(route, names, dates, orbit: one per adapter) and is judged as users judge it: the mean held-out exact match
the adapters reach at their final eval (greedy generation), next to the base's on the same records, so a
precision that trains fast but learns worse shows it. Throughput is target tokens per second over the
steps after the warm-up. Writes `benchmarks/results/real-base-<device>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from multilora_bench.harness import machine_info, peak_rss_mb  # noqa: E402

CONFIGS = [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "8bit"), ("bfloat16", "4bit")]
SKILLS = ("route", "names", "dates", "orbit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct", help="a catalogued name, .gguf or directory")
    p.add_argument("--ks", default="4", help="numbers of adapters")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--note", default="", help="a line for the report, e.g. that the machine was shared")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON of one configuration: run it, print a row
    return p.parse_args(argv)


def run_one(config: dict[str, Any]) -> dict[str, Any]:
    """One pack in this process: load the base, train K adapters, time the steady steps."""
    from workers.contract.plan import (
        AdapterTask,
        DataConfig,
        EvalConfig,
        EvalEvent,
        LoraConfig,
        PackPlan,
        StepEvent,
        TrainConfig,
    )
    from workers.engine.model import load_base
    from workers.evaluation.skills import write_skill
    from workers.training.pack import run_pack

    if config.get("load_only"):
        started = time.perf_counter()
        loaded = load_base(
            config["base"],
            quantization=config["quantization"],
            dtype=config["dtype"],
            device=config["device"],
        )
        tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
        return {
            "load_s": round(time.perf_counter() - started, 2),
            "base_weights_mb": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20),
            "base_peak_rss_mb": round(peak_rss_mb()),
        }
    work = Path(tempfile.mkdtemp(prefix="real-base-bench-"))
    tasks = []
    for i in range(config["k"]):
        train, held_out = write_skill(work / "data", SKILLS[i % len(SKILLS)], train=400, eval=16)
        tasks.append(
            AdapterTask(
                name=f"a{i}",
                lora=LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
                train=TrainConfig(
                    steps=config["steps"],
                    batch_size=config["batch_size"],
                    max_seq_len=config["seq"],
                    learning_rate=5e-3,
                    eval_every=0,
                    checkpoint_every=0,
                ),
                data=DataConfig(path=train, eval_path=held_out),
                eval=EvalConfig(scorers=["exact_match"], max_new_tokens=16, max_examples=16, samples=0),
                output_dir=work / "out" / f"a{i}",
            )
        )
    finals: dict[str, dict[str, float]] = {}
    steps: dict[int, tuple[float, int]] = {}  # step -> (time of its last event, tokens so far, all adapters)
    seen: dict[str, int] = {}

    def on_event(event: Any) -> None:
        if isinstance(event, StepEvent):
            seen[event.adapter] = event.tokens
            steps[event.step] = (time.perf_counter(), sum(seen.values()))
        elif isinstance(event, EvalEvent) and event.final:
            finals[event.adapter] = event.metrics

    plan = PackPlan(
        base_model=config["base"],
        quantization=config["quantization"],
        dtype=config["dtype"],
        device=config["device"],
        adapters=tasks,
    )
    run_pack(plan, emit=on_event)
    (t0, n0), (t1, n1) = steps[config["warmup"]], steps[max(steps)]
    return {
        **{k: config[k] for k in ("dtype", "quantization", "k", "seq", "batch_size", "steps", "warmup")},
        "peak_rss_mb": round(peak_rss_mb()),
        "steady_tokens": n1 - n0,
        "tokens_per_s": round((n1 - n0) / (t1 - t0), 1),
        "eval_exact_match": _mean(finals, "eval_exact_match"),
        "base_eval_exact_match": _mean(finals, "base_eval_exact_match"),
    }


def _mean(finals: dict[str, dict[str, float]], metric: str) -> float | None:
    values = [m[metric] for m in finals.values() if metric in m]
    return round(sum(values) / len(values), 3) if values else None


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# A pack on the real base `{doc['base']}` ({m['device']})",
        "",
        f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gb']} GB; torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']}, bitsandbytes {doc['bitsandbytes']}; {m['date']}.",
        "",
        "LoRA r=8 on q/v, fp32 LoRA weights and AdamW, lr 5e-3, batch 4 per adapter, padding-free packing; "
        "one adapter per real skill of `workers/evaluation/skills.py` (route, names, dates, orbit). "
        "Target tokens per "
        "second over the steps after the warm-up; peak RSS is the child process's high-water mark (VmHWM) "
        "while training; load s, base weights (parameter and buffer bytes as stored, k-bit packed) and base "
        "peak RSS come from a separate child that only loads the base. Exact match: the mean over the "
        "adapters of held-out exact match (16 records each, greedy) at the final step, and the base's on "
        "the same records.",
        "",
    ]
    if doc.get("note"):
        lines += [f"**{doc['note']}**", ""]
    lines += [
        "| base dtype | quantization | K | seq | load s | base weights MB | base peak RSS MB "
        "| pack peak RSS MB | tokens/s | steps | exact match (base) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['quantization']} | {r['k']} | | | | | error: {r['error']} |")
            continue
        cells = (
            "dtype",
            "quantization",
            "k",
            "seq",
            "load_s",
            "base_weights_mb",
            "base_peak_rss_mb",
            "peak_rss_mb",
            "tokens_per_s",
            "steps",
        )
        reached = f"{r.get('eval_exact_match')} ({r.get('base_eval_exact_match')})"
        lines.append("| " + " | ".join(str(r[c]) for c in cells) + f" | {reached} |")
    return "\n".join(lines) + "\n"


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh process: its peak RSS is its own."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return {**config, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return
    import bitsandbytes

    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        for dtype, quantization in CONFIGS:
            config = {
                "base": args.base,
                "dtype": dtype,
                "quantization": quantization,
                "k": k,
                "seq": args.seq,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "device": args.device,
            }
            row = {**child({**config, "load_only": True}), **child(config)}
            print(row, flush=True)
            rows.append(row)
    doc = {
        "base": args.base,
        "bitsandbytes": bitsandbytes.__version__,
        "machine": machine_info(args.device),
        "note": args.note,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"real-base-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(doc))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
