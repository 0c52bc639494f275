"""Task evaluation, everywhere a user looks: the final eval's scores (the adapter's, the base's, the
parent's) and judged samples, as the engine reports them, recorded in SQL, mirrored to MLflow (metrics and
a samples table, once even when replayed), judged by the promotion gate, shown by the CLI with their lifts
and written into the model card.

One module-scoped home (real SQLite store, real MLflow on SQLite, the real service's submit) holds a job
whose root adapter and its child were fed the events a pack sends; no training runs here (the engine's
own tests cover how the scores are computed).
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import uvicorn
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli.commands import app
from orchestrator.control import decisions
from orchestrator.control.controller import Controller
from orchestrator.registry.export import export_adapter
from orchestrator.registry.promotion import Registry
from orchestrator.server.app import create_app
from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.spec.job import BranchSpec
from orchestrator.spec.views import scores
from orchestrator.store import AdapterChange, AdapterRecord, NewEvent, Store
from orchestrator.tracking.mirror import CURSOR, SAMPLES_ARTIFACT, SUMMARY_ARTIFACT, Tracker
from workers.contract.plan import AdapterDone, EvalConfig, EvalEvent, EvalSample, Event, StartEvent, StepEvent

ADMIN = "admin-secret"
ROOT_SCORES = {
    "eval_token_accuracy": 0.7,
    "eval_exact_match": 0.92,
    "eval_token_f1": 0.95,
    "base_eval_exact_match": 0.05,
    "base_eval_token_f1": 0.30,
    "base_eval_loss": 3.0,
    "base_eval_token_accuracy": 0.2,
}
CHILD_SCORES = {
    "eval_token_accuracy": 0.72,
    "eval_exact_match": 0.85,
    "eval_token_f1": 0.90,
    "base_eval_exact_match": 0.05,
    "base_eval_token_f1": 0.30,
    "parent_eval_exact_match": 0.92,
    "parent_eval_token_f1": 0.95,
    "base_eval_token_accuracy": 0.2,
    "parent_eval_loss": 0.9,
    "parent_eval_token_accuracy": 0.7,
}


@dataclass
class Fleet:
    settings: Settings
    store: Store
    tracker: Tracker
    job_id: str
    root: AdapterRecord
    child: AdapterRecord


def _samples(parent: bool) -> list[EvalSample]:
    return [
        EvalSample(
            prompt=f"what is {i} + {i}?",
            reference=str(2 * i),
            output=str(2 * i),
            base_output="I think it is many",
            parent_output=str(2 * i + 1) if parent else None,
            scores={"eval_exact_match": 1.0, "eval_token_f1": 1.0},
        )
        for i in range(2)
    ]


def _feed(store: Store, adapter: AdapterRecord, events: list[Event]) -> None:
    """What the controller does with a pack's events: the event log, and each event's row change."""
    store.record_events(
        [
            NewEvent(adapter.job_id, e.kind, adapter.id, e.step, e.model_dump(mode="json"), e.id)
            for e in events
        ]
    )
    for event in events:
        change = decisions.on_event(store.get_adapter_by_id(adapter.id), event)
        if change is not None:
            store.update_adapter(change)  # its fields, metric values and checkpoint


def _events(name: str, steps: int, scores: dict[str, float], final_dir: Path, parent: bool) -> list[Event]:
    start = StartEvent(
        pack_id="k", adapter=name, step=0, data_fingerprint="f", train_examples=4, eval_examples=2
    )
    step = StepEvent(
        pack_id="k", adapter=name, step=1, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=8, tokens_per_s=1
    )
    middle = EvalEvent(
        pack_id="k",
        adapter=name,
        step=1,
        eval_loss=1.5,
        perplexity=4.5,
        eval_tokens=9,
        metrics={"eval_token_accuracy": 0.5},
    )
    final = EvalEvent(
        pack_id="k",
        adapter=name,
        step=steps,
        eval_loss=1.0,
        perplexity=2.72,
        eval_tokens=9,
        final=True,
        metrics=scores,
        samples=_samples(parent),
    )
    baseline = scores.get("parent_eval_loss")
    done = AdapterDone(
        pack_id="k",
        adapter=name,
        step=steps,
        status="trained",
        final_dir=final_dir,
        eval_loss=1.0,
        baseline_eval_loss=baseline,
    )
    return [start, step, middle, final, done]


@pytest.fixture(scope="module")
def fleet(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root_dir = tmp_path_factory.mktemp("task-eval")
    data = root_dir / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n" for i in range(8))
    )
    settings = Settings(home=root_dir / "home", api_token=ADMIN)
    settings.home.mkdir()
    store = Store.open(settings.database_url)
    spec = {
        "name": "qa-job",
        "base_model": str(tiny_base),
        "eval": {"scorers": ["exact_match", "token_f1"], "samples": 2},
        "adapters": [
            {"name": "qa", "data": {"path": str(data), "eval_path": str(data)}},
            {"name": "qa-v2", "parent": "qa", "data": {"path": str(data), "eval_path": str(data)}},
        ],
        "promotion": {"metric": "eval_exact_match", "min": 0.8, "better_than_parent": True},
    }
    job = Service(settings, store).submit(spec)
    root, child = (store.get_adapter("default", n) for n in ("qa", "qa-v2"))
    for adapter, steps, reported in ((root, 10, ROOT_SCORES), (child, 4, CHILD_SCORES)):
        final_dir = root_dir / adapter.name / "final"
        final_dir.mkdir(parents=True)
        for name in ("adapter_config.json", "lorafleet.json"):  # the marker makes it a complete checkpoint
            (final_dir / name).write_text("{}")
        _feed(store, adapter, _events(adapter.name, steps, reported, final_dir, adapter is child))
        store.update_adapter(AdapterChange(adapter.id, state="evaluated"))
    store.set_job_state(job.id, "succeeded")
    tracker = Tracker(store, str(settings.mlflow_uri), settings.mlflow_artifact_root)
    tracker.sync()
    root, child = (store.get_adapter("default", n) for n in ("qa", "qa-v2"))
    yield Fleet(settings, store, tracker, job.id, root, child)


def test_every_metric_of_the_final_eval_is_in_sql_at_its_step(fleet: Fleet) -> None:
    recorded = {m.key: (m.last_value, m.step) for m in fleet.store.get_metrics(fleet.child.id)}
    assert {k: recorded[k] for k in CHILD_SCORES} == {k: (v, 4) for k, v in CHILD_SCORES.items()}
    assert recorded["eval_loss"] == (1.0, 4)
    final = fleet.store.final_eval(fleet.child)  # the samples stay in the event log
    assert final is not None and [s["prompt"] for s in final.payload["samples"]] == [
        "what is 0 + 0?",
        "what is 1 + 1?",
    ]


def test_metrics_and_the_samples_table_reach_the_adapters_run_once_even_when_replayed(fleet: Fleet) -> None:
    mlflow = MlflowClient(str(fleet.settings.mlflow_uri))
    run_id = fleet.child.mlflow_run_id
    assert run_id is not None

    def table_of(run: str | None, artifact: str = SAMPLES_ARTIFACT) -> dict:
        """The table as `MlflowClient.load_table` reads it (pandas' `split` orientation)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.download_artifacts(run, artifact, tmp)
            return pd.read_json(path, orient="split", dtype=False).to_dict(orient="split", index=False)

    def seen() -> tuple[dict[str, list[tuple[int, float]]], dict]:
        metrics = {
            k: [(m.step, m.value) for m in mlflow.get_metric_history(run_id, k)]
            for k in (
                "eval_exact_match",
                "parent_eval_exact_match",
                "eval_token_accuracy",
                "parent_eval_loss",
            )
        }
        return metrics, table_of(run_id)

    metrics, table = seen()
    assert metrics == {
        "eval_exact_match": [(4, 0.85)],
        "parent_eval_exact_match": [(4, 0.92)],
        "eval_token_accuracy": [(1, 0.5), (4, 0.72)],
        "parent_eval_loss": [(4, 0.9)],  # from the final eval and from `done`: logged once
    }
    assert table["columns"] == [
        "prompt",
        "reference",
        "base output",
        "adapter output",
        "parent output",
        "eval_exact_match",
        "eval_token_f1",
    ]
    assert table["data"][1] == ["what is 1 + 1?", "2", "I think it is many", "2", "3", 1.0, 1.0]
    tags = mlflow.get_run(run_id).data.tags
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": SAMPLES_ARTIFACT, "type": "table"}]
    assert "parent output" not in table_of(fleet.root.mlflow_run_id)["columns"]  # a root has no parent

    job_run = mlflow.get_run(run_id).data.tags["mlflow.parentRunId"]
    summary = table_of(job_run, SUMMARY_ARTIFACT)  # the job's run compares its adapters
    assert summary["data"][1] == pytest.approx(
        ["qa-v2", "evaluated", 1.0, "eval_exact_match", 0.85, 0.05, 0.80, 0.92, -0.07]
    )
    assert (
        json.loads(mlflow.get_run(job_run).data.tags["mlflow.loggedArtifacts"])[0]["path"] == SUMMARY_ARTIFACT
    )

    fleet.store.set_cursor(CURSOR, 0)  # the whole event log again, as after a crash before the cursor moved
    Tracker(fleet.store, str(fleet.settings.mlflow_uri), fleet.settings.mlflow_artifact_root).sync()
    assert seen() == (metrics, table)


def test_the_gate_promotes_on_a_task_score_and_names_both_values_when_a_child_falls_short(
    fleet: Fleet,
) -> None:
    registry = Registry(fleet.store, fleet.tracker)
    passed = registry.promote(fleet.root.id)
    assert passed.decision == "promoted" and passed.metric == "eval_exact_match" and passed.value == 0.92
    assert passed.reason == "eval_exact_match 0.9200 >= min 0.8"
    rejected = registry.promote(fleet.child.id)
    assert rejected.decision == "rejected" and rejected.alias is None
    assert rejected.reason == (
        "eval_exact_match 0.8500 does not beat the parent's eval_exact_match 0.9200 on the same eval data"
    )


@pytest.fixture
def server(fleet: Fleet) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(fleet.settings, start_controller=False),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_the_cli_shows_the_main_score_with_its_lifts_over_the_base_and_the_parent(
    fleet: Fleet, server: str
) -> None:
    def cli(*args: str) -> str:
        result = CliRunner().invoke(app, [*args, "--url", server, "--token", ADMIN], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        return result.stdout

    shown = cli("status", fleet.job_id)
    assert "exact_match 0.92 (base 0.05, +0.87)" in shown
    assert "exact_match 0.85 (base 0.05, +0.80; parent 0.92, -0.07)" in shown

    (root, child) = json.loads(cli("adapters", "--job", fleet.job_id, "--json"))
    assert root["metrics"]["base_eval_exact_match"] == 0.05 and child["metrics"]["parent_eval_loss"] == 0.9
    assert [s["metric"] for s in child["scores"]] == [
        "eval_exact_match",
        "eval_token_f1",
        "eval_token_accuracy",
    ]
    assert child["scores"][0] == {
        "metric": "eval_exact_match",
        "value": 0.85,
        "base": 0.05,
        "parent": 0.92,
        "base_lift": pytest.approx(0.80),
        "parent_lift": pytest.approx(-0.07),
    }

    tree = cli("lineage", "qa-v2")
    assert "token_f1 0.95 (base 0.30, +0.65)" in tree
    assert "token_f1 0.90 (base 0.30, +0.60; parent 0.95, -0.05)" in tree


def test_the_model_card_shows_the_scores_lifts_and_sample_generations(fleet: Fleet, tmp_path: Path) -> None:
    card = (export_adapter(fleet.store, fleet.child, tmp_path / "out") / "README.md").read_text()
    assert "| eval_exact_match | 0.8500 | 0.0500 | +0.8000 | 0.9200 | -0.0700 |" in card
    assert "## Sample generations" in card and "```text\nwhat is 1 + 1?\n```" in card
    assert "Parent:\n\n```text\n3\n```" in card


def test_the_controller_gives_each_adapter_its_merged_eval_config(fleet: Fleet, tmp_path: Path) -> None:
    """The job's `eval` with the adapter's override on top reaches the engine's task; a branch is judged
    like its parent unless it says otherwise."""
    store, settings = fleet.store, fleet.settings
    controller = Controller(settings, store)  # building a task needs no Ray
    assert controller._task(fleet.root).eval == EvalConfig(scorers=["exact_match", "token_f1"], samples=2)
    path = store.get_job(fleet.job_id).spec["adapters"][0]["data"]["path"]
    branch = Service(settings, store).branch(
        "default", "qa", BranchSpec(name="qa-b", data={"path": path}, eval={"max_new_tokens": 8})
    )
    task = controller._task(store.get_adapter("default", "qa-b"))
    assert task.eval == EvalConfig(scorers=["exact_match", "token_f1"], samples=2, max_new_tokens=8)
    assert branch.adapters[0].parent == "default/qa"


def test_task_scores_lead_with_the_gates_metric_then_the_scorers_and_leave_out_losses() -> None:
    metrics = {
        "eval_loss": 1.0,
        "base_eval_loss": 3.0,
        "eval_token_accuracy": 0.7,
        "base_eval_token_accuracy": 0.2,
        "eval_exact_match": 0.9,
        "base_eval_exact_match": 0.1,
        "eval_rouge_l": 0.8,
        "parent_eval_rouge_l": 0.85,
        "eval_unjudged": 0.5,  # no base or parent value: no lift to show
    }
    found = scores(metrics, ["eval_loss", "eval_rouge_l", "eval_exact_match"])
    assert [s.metric for s in found] == ["eval_rouge_l", "eval_exact_match", "eval_token_accuracy"]
    assert found[0].label == "rouge_l 0.80 (parent 0.85, -0.05)"
    assert found[1].base_lift == pytest.approx(0.8) and found[1].parent is None
