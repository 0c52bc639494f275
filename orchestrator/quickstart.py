"""`lorafleet quickstart`: the whole product on a laptop in a few minutes, with nothing to download.

Builds a tiny LLaMA-style base and its tokenizer under LORAFLEET_HOME, writes data for four skills, submits
one job with four adapters (one pack) and a child branched from one of them, and waits with progress.
Running it again finds the same job (same idempotency key) instead of training twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from orchestrator.client import Client, Job
from orchestrator.settings import Settings
from orchestrator.views import JobView
from workers.synthetic import SKILLS, write_skill_data
from workers.tiny import build_tiny_base

PROJECT = "quickstart"


def run_quickstart(steps: int = 60, progress: Callable[[Job], JobView] | None = None) -> list[JobView]:
    settings = Settings()
    root = settings.home / "quickstart"
    base = build_tiny_base(root / "base")
    data = {skill: write_skill_data(root / "data" / f"{skill}.jsonl", skill, 400) for skill in SKILLS}
    child_data = write_skill_data(root / "data" / "colors-more.jsonl", "colors", 200, seed=1)
    spec = {
        "name": "quickstart",
        "project": PROJECT,
        "base_model": str(base),
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "train": {
            "steps": steps,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "max_seq_len": 64,
            "eval_every": max(1, steps // 3),
            "checkpoint_every": max(1, steps // 2),
        },
        "adapters": [
            *(
                {"name": skill, "data": {"path": str(path), "eval_fraction": 0.1}}
                for skill, path in data.items()
            ),
            {
                "name": "colors-more",
                "parent": "colors",
                "data": {"path": str(child_data), "eval_fraction": 0.1},
                "train": {"steps": max(1, steps // 3)},
            },
        ],
        "resources": {"workers": 1, "max_adapters_per_worker": 8},
    }
    with Client(project=PROJECT) as client:
        job = client.submit(spec, idempotency_key=f"quickstart-{steps}")
        view = progress(job) if progress is not None else job.wait()
    hints = [
        f"job {view.id} {view.state}; everything is under {settings.home}",
        "  lorafleet jobs                                  # all jobs",
        f"  lorafleet lineage colors --project {PROJECT}   # the adapter tree",
        f"  lorafleet ui {view.id}                       # MLflow runs and metrics of this job",
        "the base is a random toy: low losses are memorisation (the README shows a real base)",
    ]
    print("\n" + "\n".join(hints), file=sys.stderr)  # stdout stays free for --json
    return [view]
