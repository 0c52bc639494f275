"""Benchmark: a pack of K adapters on the real SmolLM2-135M-Instruct base, fp32 / bf16 / 8-bit / 4-bit.

Run from the repository root with the project's venv active, after `lorafleet models pull
smollm2-135m-instruct` (same LORAFLEET_HOME):

    python benchmarks/bench_real_base.py                     # K=4, 6 steps (2 warm-up), seq 256
    python benchmarks/bench_real_base.py --ks 1,4 --steps 8

Each configuration runs in a fresh child process, so its peak RSS (VmHWM) is its own. Throughput is target
tokens per second over the steps after the warm-up. Data: the synthetic skills (`workers/synthetic.py`),
tokenised by the real tokenizer. Writes `benchmarks/results/real-base-<device>.{json,md}`.
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
SKILLS = ("counting", "colors", "animals", "greetings")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct", help="a catalogued name, .gguf or directory")
    p.add_argument("--ks", default="4", help="numbers of adapters")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--note", default="", help="a line for the report, e.g. that the machine was shared")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON of one configuration: run it, print a row
    return p.parse_args(argv)


def run_one(config: dict[str, Any]) -> dict[str, Any]:
    """One pack in this process: load the base, train K adapters, time the steady steps."""
    from workers.model import load_base
    from workers.pack import run_pack
    from workers.plan import AdapterTask, DataConfig, LoraConfig, PackPlan, StepEvent, TrainConfig
    from workers.synthetic import write_skill_data

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
    tasks = [
        AdapterTask(
            name=f"a{i}",
            lora=LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            train=TrainConfig(
                steps=config["steps"],
                batch_size=config["batch_size"],
                max_seq_len=config["seq"],
                learning_rate=1e-3,
                eval_every=0,
                checkpoint_every=0,
            ),
            data=DataConfig(path=write_skill_data(work / f"{i}.jsonl", SKILLS[i % len(SKILLS)], 200)),
            output_dir=work / "out" / f"a{i}",
        )
        for i in range(config["k"])
    ]
    steps: dict[int, tuple[float, int]] = {}  # step -> (time of its last event, tokens so far, all adapters)
    seen: dict[str, int] = {}

    def on_event(event: Any) -> None:
        if isinstance(event, StepEvent):
            seen[event.adapter] = event.tokens
            steps[event.step] = (time.perf_counter(), sum(seen.values()))

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
    }


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# A pack on the real base `{doc['base']}` ({m['device']})",
        "",
        f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gb']} GB; torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']}, bitsandbytes {doc['bitsandbytes']}; {m['date']}.",
        "",
        "LoRA r=16 on q/k/v/o, fp32 LoRA weights and AdamW; synthetic skills, padding-free packing. Target "
        "tokens per second over the steps after the warm-up; peak RSS is the child process's high-water mark "
        "(VmHWM) while training; load s, base weights (parameter and buffer bytes as stored, k-bit "
        "packed) and base peak RSS come from a separate child that only loads the base.",
        "",
    ]
    if doc.get("note"):
        lines += [f"**{doc['note']}**", ""]
    lines += [
        "| base dtype | quantization | K | seq | load s | base weights MB | base peak RSS MB "
        "| pack peak RSS MB | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
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
        )
        lines.append("| " + " | ".join(str(r[c]) for c in cells) + " |")
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
