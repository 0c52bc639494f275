"""Train four adapters on four synthetic skills in one pack over a tiny local base, straight on the engine.

    python -m workers.training.demo [--out DIR] [--steps N]

No servers, no downloads: the base model and tokenizer are built from a config under `--out`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.bases.tiny import build_tiny_base
from workers.contract.plan import (
    AdapterTask,
    DataConfig,
    EvalEvent,
    Event,
    LoraConfig,
    PackPlan,
    StepEvent,
    TrainConfig,
)
from workers.training.pack import run_pack
from workers.training.synthetic import SKILLS, write_skill_data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("lorafleet-demo"))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)

    base = build_tiny_base(args.out / "base")
    tasks = [
        AdapterTask(
            name=skill,
            data=DataConfig(
                path=write_skill_data(args.out / "data" / f"{skill}.jsonl", skill, 400), eval_fraction=0.1
            ),
            lora=LoraConfig(r=8, alpha=16, target_modules="all-linear"),
            train=TrainConfig(
                steps=args.steps,
                batch_size=8,
                learning_rate=1e-2,
                max_seq_len=64,
                eval_every=max(1, args.steps // 3),
                checkpoint_every=0,
            ),
            output_dir=args.out / "adapters" / skill,
        )
        for skill in SKILLS
    ]

    def show(event: Event) -> None:
        if isinstance(event, StepEvent) and event.step % 10 == 0:
            rate = f"{event.tokens_per_s:,.0f} tok/s"
            print(f"{event.adapter:>10} step {event.step:4d}  loss {event.loss:.3f}  {rate}")
        elif isinstance(event, EvalEvent):
            ppl = f"ppl {event.perplexity:.2f}"
            print(f"{event.adapter:>10} eval @ {event.step:4d}  loss {event.eval_loss:.3f}  {ppl}")

    result = run_pack(PackPlan(base_model=str(base), adapters=tasks), emit=show)
    for name, done in result.adapters.items():
        print(f"{name:>10}: {done.status}, eval loss {done.eval_loss:.3f} -> {done.final_dir}")


if __name__ == "__main__":
    main()
