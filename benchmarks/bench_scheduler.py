"""How long one scheduling decision takes at fleet scale: 10,000 queued adapters on 200 workers.

The controller calls `schedule` every tick with the whole queue, so it must stay well under a second even
on a small control-plane machine. The scene is fixed (seed 0): five bases of real shapes (8B, 7B, 1.5B,
tiny), twelve projects of very different sizes, random priorities, 160 GPU and 40 CPU workers of which a
third already run packs. Reports the best of 5 runs; writes `benchmarks/results/scheduler.json`.

    python benchmarks/bench_scheduler.py
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.scheduling.scheduler import (
    AdapterDemand,
    BaseKey,
    WorkerState,
    adapter_memory_bytes,
    base_memory_bytes,
    schedule,
    unplaceable,
)
from workers.contract.memory import BaseModelInfo, model_info_from_config
from workers.contract.plan import LoraConfig

GIB = 2**30
N_DEMANDS, N_GPU_WORKERS, N_CPU_WORKERS, REPEATS, SEED = 10_000, 160, 40, 5, 0
RESULTS = Path(__file__).resolve().parent / "results" / "scheduler.json"

_LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)
CONFIGS = {
    "llama-8b": {**_LLAMA_8B, "num_key_value_heads": 8, "vocab_size": 128256},
    "mistral-7b": {**_LLAMA_8B, "num_key_value_heads": 8, "vocab_size": 32768},
    "qwen-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512
    ),
}
GPU_BASES = [
    BaseKey("llama-8b", "none", "bfloat16"),
    BaseKey("llama-8b", "4bit", "bfloat16"),
    BaseKey("mistral-7b", "8bit", "bfloat16"),
    BaseKey("qwen-1.5b", "none", "bfloat16"),
]
CPU_BASES = [BaseKey("tiny", "none", "float32"), BaseKey("qwen-1.5b", "none", "float32")]
TARGETS = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), "all-linear"]


def _lora(r: int, targets: tuple[str, ...] | str) -> LoraConfig:
    return LoraConfig(r=r, target_modules=targets if isinstance(targets, str) else list(targets))


def scene(seed: int = SEED) -> tuple[list[AdapterDemand], list[WorkerState], dict[BaseKey, BaseModelInfo]]:
    rng = random.Random(seed)
    infos = {b: model_info_from_config(CONFIGS[b.base_model]) for b in GPU_BASES + CPU_BASES}
    projects = [f"team-{k}" for k in range(12)]
    weights = [50, 20, 10, 5, 5, 3, 2, 2, 1, 1, 0.5, 0.5]  # one project floods the queue
    demands = []
    for k in range(N_DEMANDS):
        gpu = rng.random() < 0.85
        demands.append(
            AdapterDemand(
                adapter_id=f"adapter-{k:05d}",
                project=rng.choices(projects, weights)[0],
                base=rng.choice(GPU_BASES if gpu else CPU_BASES),
                priority=rng.choice([0, 0, 0, 1, 1, 2, 3]),
                seq=k,
                lora=_lora(rng.choice([8, 16, 32, 64]), rng.choice(TARGETS)),
                batch_size=rng.randrange(1, 5),
                max_seq_len=rng.choice([256, 512, 1024, 4096]),
                needs_gpu=gpu,
            )
        )
    workers = []
    for k in range(N_GPU_WORKERS + N_CPU_WORKERS):
        gpu = k < N_GPU_WORKERS
        memory = rng.choice([24, 40, 80, 80]) * GIB if gpu else 64 * GIB
        base, running, used = None, (), 0
        if rng.random() < 1 / 3:  # already runs a pack of a few adapters
            base = rng.choice(GPU_BASES if gpu else CPU_BASES)
            running = tuple(f"running-{k}-{j}" for j in range(rng.randrange(1, 5)))
            used = min(memory, base_memory_bytes(base, infos[base]) + len(running) * 2 * GIB)
        max_adapters = rng.choice([8, 16, 32, 64])
        workers.append(WorkerState(f"worker-{k:03d}", memory, gpu, max_adapters, base, running, used))
    return demands, workers, infos


def best_of(fn, repeats: int = REPEATS) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def main() -> None:
    demands, workers, infos = scene()
    placements = schedule(demands, workers, infos)
    best, runs = best_of(lambda: schedule(demands, workers, infos))
    never = unplaceable(demands, workers, infos)
    best_unplaceable, _ = best_of(lambda: unplaceable(demands, workers, infos))
    placed = sum(len(p.adapter_ids) for p in placements)
    needs = [adapter_memory_bytes(d, infos[d.base]) for d in demands]
    result = {
        "benchmark": "scheduler.schedule",
        "demands": len(demands),
        "workers": len(workers),
        "bases": len(infos),
        "placements": len(placements),
        "new_packs": sum(not p.refill for p in placements),
        "refills": sum(p.refill for p in placements),
        "adapters_placed": placed,
        "unplaceable": len(never),
        "adapter_gib_median": round(sorted(needs)[len(needs) // 2] / GIB, 3),
        "best_s": round(best, 4),
        "runs_s": [round(t, 4) for t in runs],
        "unplaceable_best_s": round(best_unplaceable, 4),
        "target_s": 1.0,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"schedule: {len(demands)} demands on {len(workers)} workers -> {len(placements)} placements "
        f"({result['new_packs']} new packs, {result['refills']} refills), {placed} adapters placed, "
        f"{len(never)} unplaceable"
    )
    print(
        f"best of {REPEATS}: {best * 1000:.1f} ms (target < 1000 ms); "
        f"unplaceable: {best_unplaceable * 1000:.1f} ms"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
