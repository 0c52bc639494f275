"""Adapters on the real model learn what the example says they learn, judged the way a user would judge them.

One training run of `examples/job.yaml` as is (SmolLM2-135M-Instruct, four skills in one pack and a child),
plus one adapter of the same job stopped after 2 steps, through the local service driven by the CLI. On
records no adapter trained on, each trained adapter's exact match rises far above the base's (which is 0:
the base answers in sentences), the child beats its parent on the facts only it learnt, the promotion
gate (`eval_exact_match >= 0.8`) promotes a trained adapter and rejects the undertrained one, and
`lorafleet generate` answers a held-out prompt correctly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli.quickstart import CHILD, PARENT, SKILLS, held_out_example
from orchestrator.spec.job import load_source
from tests.conftest import RealBase
from tests.orchestrator.test_local_service import _stopped, cli, submit, until

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
UNDERTRAINED = "route-undertrained"


@pytest.fixture(scope="module")
def trained(real_base: RealBase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """The example job, trained once, with an undertrained twin of `route`; the home's base is the cached
    conversion (as if `lorafleet models pull` had run in it)."""
    home = tmp_path_factory.mktemp("learning-home")
    (home / "bases").symlink_to(real_base.home / "bases")
    spec = load_source(EXAMPLES / "job.yaml")  # data paths made absolute
    route = next(a for a in spec["adapters"] if a["name"] == "route")
    spec["adapters"].append({"name": UNDERTRAINED, "data": route["data"], "train": {"steps": 2}})
    path = home / "job.json"
    path.write_text(json.dumps(spec))
    try:
        job = submit(home, path)
        view = until(home, job["id"], lambda v: v["state"] not in ("pending", "running"), timeout=1800)
        yield home, view
    finally:
        _stopped(home)


def test_each_adapter_answers_held_out_records_far_better_than_the_base(trained: tuple[Path, dict]) -> None:
    _, view = trained
    assert view["state"] == "succeeded", view
    adapters = {a["name"]: a for a in view["adapters"]}
    assert {name: a["state"] for name, a in adapters.items()} == dict.fromkeys(
        (*SKILLS, CHILD, UNDERTRAINED), "evaluated"
    )
    for name in (*SKILLS, CHILD):
        metrics = adapters[name]["metrics"]
        assert metrics["base_eval_exact_match"] <= 0.1, (name, metrics)
        assert metrics["eval_exact_match"] >= 0.75, (name, metrics)
    child = adapters[CHILD]["metrics"]
    assert child["eval_exact_match"] - child["parent_eval_exact_match"] >= 0.5  # facts only the child learnt
    assert adapters[UNDERTRAINED]["metrics"]["eval_exact_match"] < 0.5


def test_the_gate_promotes_a_trained_adapter_and_rejects_an_undertrained_one(
    trained: tuple[Path, dict],
) -> None:
    home, _ = trained
    promoted = cli(home, "promote", "dates", "--project", "examples")
    assert promoted.returncode == 0, promoted.stderr
    assert "promoted examples.dates version 1 as @champion" in " ".join(promoted.stdout.split())
    rejected = cli(home, "promote", UNDERTRAINED, "--project", "examples")
    assert rejected.returncode == 1, rejected.stdout
    assert "eval_exact_match" in rejected.stderr


@pytest.mark.parametrize("skill", ["dates", "names", PARENT])
def test_generate_answers_a_held_out_prompt_correctly(trained: tuple[Path, dict], skill: str) -> None:
    home, _ = trained
    prompt, answer = held_out_example(skill)
    done = cli(home, "generate", f"examples/{skill}", prompt, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"].strip() == answer
