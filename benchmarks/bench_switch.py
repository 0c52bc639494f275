"""How much does switching between cached adapters cost, next to generating with one?

    python benchmarks/bench_switch.py [--size tiny|20m|100m] [--adapters 8] [--tokens 16] [--repeats 20]

One `AdapterServer` (one base in memory) caches N adapters. We time (a) a 16-token greedy generation that
reuses the adapter of the previous request, (b) the same when every request names a different cached
adapter (a switch), and (c) the first, cold load of an adapter from disk. Target: (b) - (a) < 5% of (a).
Writes benchmarks/results/switch-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from workers.bases.tiny import build_tiny_base
from workers.contract.plan import LoraConfig
from workers.engine.multilora import MultiLoraModel, linear_module_names
from workers.serving import AdapterServer
from workers.training.checkpoint import write_checkpoint

RESULTS = Path(__file__).parent / "results"


def make_adapters(base: Path, out: Path, count: int) -> list[Path]:
    """Adapters with non-zero B, written in PEFT format (their values do not matter for timing)."""
    from transformers import AutoModelForCausalLM

    model = MultiLoraModel(AutoModelForCausalLM.from_pretrained(base))
    paths = []
    for i in range(count):
        adapter = model.add_adapter(f"a{i}", LoraConfig(r=8, alpha=16, target_modules="all-linear"), seed=i)
        with torch.no_grad():
            for weights in adapter.modules.values():
                weights.lora_B.normal_(0, 0.02)
        paths.append(
            write_checkpoint(
                out / f"a{i}", adapter, base_model=str(base), all_linear_paths=linear_module_names(model.base)
            )
        )
    return paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="20m")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-switch-"))
    base = build_tiny_base(work / "base", size=args.size)
    adapters = make_adapters(base, work / "adapters", args.adapters)
    server = AdapterServer(str(base), capacity=args.adapters)
    prompt = "The quick brown fox"

    cold = [timed(lambda p=p: server.load(p)) for p in adapters]  # first load: read + attach
    server.generate([(adapters[0], prompt)], max_new_tokens=args.tokens)  # warm-up

    def generate(adapter: Path) -> float:
        return timed(lambda: server.generate([(adapter, prompt)], max_new_tokens=args.tokens))

    same = [generate(adapters[0]) for _ in range(args.repeats)]
    switching = [generate(adapters[(i + 1) % len(adapters)]) for i in range(args.repeats)]
    lookup = [timed(lambda p=p: server.load(p)) for p in adapters * 10]

    same_s, switch_s = statistics.median(same), statistics.median(switching)
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "size": args.size,
        "adapters": args.adapters,
        "new_tokens": args.tokens,
        "repeats": args.repeats,
        "generate_same_adapter_s": same_s,
        "generate_switching_adapter_s": switch_s,
        "switch_overhead_s": switch_s - same_s,
        "switch_overhead_fraction": (switch_s - same_s) / same_s,
        "cached_lookup_s": statistics.median(lookup),
        "cold_load_s": statistics.median(cold),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"switch-{result['device']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = [
        "| measure | value |",
        "|---|---|",
        f"| {args.tokens}-token generation, same adapter (median) | {same_s * 1e3:.1f} ms |",
        f"| {args.tokens}-token generation, a new adapter every request | {switch_s * 1e3:.1f} ms |",
        f"| switch overhead | {(switch_s - same_s) * 1e3:+.2f} ms ({(switch_s - same_s) / same_s:+.1%}) |",
        f"| cached adapter lookup | {result['cached_lookup_s'] * 1e6:.1f} µs |",
        f"| cold load of an adapter from disk | {result['cold_load_s'] * 1e3:.1f} ms |",
    ]
    header = (
        f"# Adapter switching ({args.size} base, {args.adapters} cached adapters, {result['device']})\n\n"
    )
    stem.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    print(header + "\n".join(table))


if __name__ == "__main__":
    main()
