"""An adapter's final eval judges it the way its users will: greedy answers to its eval prompts, scored,
beside the base's and its parent's answers on the same records; token accuracy at every eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.workers.conftest import TaskFactory, plan_of
from workers import storage
from workers.contract.plan import AdapterDone, EvalConfig, EvalEvent, Event
from workers.engine.examples import IGNORE_INDEX, Example
from workers.engine.model import load_base
from workers.engine.multilora import MultiLoraModel
from workers.evaluation.scoring import score
from workers.serving import AdapterServer
from workers.training.checkpoint import attach_frozen, read_adapter
from workers.training.data import load_adapter_data
from workers.training.pack import run_pack

SCORERS = ["exact_match", "token_f1", "contains", "tests.workers.test_scoring:first_word"]
FAILING = "tests.workers.test_scoring:raises"


def _run(base: Path, *tasks) -> tuple[dict[str, AdapterDone], list[Event]]:
    events: list[Event] = []
    result = run_pack(plan_of(base, *tasks), emit=events.append)
    return result.adapters, events


def _evals(events: list[Event], name: str) -> list[EvalEvent]:
    return [e for e in events if isinstance(e, EvalEvent) and e.adapter == name]


def _final_dir(task) -> str:
    return storage.join(task.output_dir, "final")


def _full_logits_eval(base: Path, adapter_dir: str | None, examples: list[Example]) -> tuple[float, float]:
    """(mean loss, token accuracy) from full logits, one example per forward: the long way round."""
    loaded = load_base(str(base), device="cpu")
    model = MultiLoraModel(loaded.model)
    route = None
    if adapter_dir is not None:
        attach_frozen(model, "a", read_adapter(adapter_dir))
        route = "a"
    loss = hits = count = 0.0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logits = model(ids, None, [(route, 0, 1)])[0, :-1]
            labels = torch.tensor(example.labels[1:])
            keep = labels != IGNORE_INDEX
            loss += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            hits += float((logits[keep].argmax(-1) == labels[keep]).sum())
            count += int(keep.sum())
    return loss / count, hits / count


def test_the_final_eval_scores_generations_of_the_adapter_and_the_base(
    tiny_base: Path, tiny_tokenizer, make_task: TaskFactory, tmp_path: Path
) -> None:
    judged = EvalConfig(scorers=[*SCORERS, FAILING], max_new_tokens=10, samples=3)
    counting = make_task("counting", steps=6, eval_every=3).model_copy(update={"eval": judged})
    silent = make_task("colors", steps=6).model_copy(update={"eval": EvalConfig(max_examples=0)})
    text_path = tmp_path / "text.jsonl"
    text_path.write_text("".join(json.dumps({"text": f"row {i} of text"}) + "\n" for i in range(30)))
    text = make_task("text", skill="animals", steps=6, data={"path": text_path})
    done, events = _run(tiny_base, counting, silent, text)
    assert {d.status for d in done.values()} == {"trained"}

    middle, final = _evals(events, "counting")
    assert (middle.step, middle.final, list(middle.metrics), middle.samples) == (
        3,
        False,
        ["eval_token_accuracy"],
        [],
    )
    assert final.final and final.step == 6
    scored = ["eval_exact_match", "eval_token_f1", "eval_contains", "eval_first_word"]
    assert set(final.metrics) == {
        "eval_token_accuracy",
        "base_eval_loss",
        "base_eval_token_accuracy",
        *scored,
        *("base_" + m for m in scored),
    }
    assert set(final.errors) == {"eval_raises", "base_eval_raises"}
    assert "failed on eval record 0: RuntimeError: boom" in final.errors["eval_raises"]

    # The same records through serving give the same answers, hence the same scores.
    data = load_adapter_data(counting.data, tiny_tokenizer, 48, 0, "counting", eval_records=200)
    records = data.eval_records
    assert len(records) == 12
    server = AdapterServer(str(tiny_base), device="cpu")
    adapter = _final_dir(counting)
    prompts = [r.prompt for r in records]
    outputs = server.generate([(adapter, p) for p in prompts], max_new_tokens=10)
    base_outputs = server.generate([(None, p) for p in prompts], max_new_tokens=10)  # BOS + prompt, too
    references = [r.reference for r in records]
    expected = score(EvalConfig(scorers=SCORERS), outputs, references).means()
    expected |= score(EvalConfig(scorers=SCORERS), base_outputs, references).means("base_")
    assert {m: final.metrics[m] for m in expected} == expected
    assert [(s.prompt, s.reference, s.output, s.base_output) for s in final.samples] == list(
        zip(prompts[:3], references[:3], outputs[:3], base_outputs[:3], strict=True)
    )
    assert all(s.parent_output is None and set(s.scores) == set(scored) for s in final.samples)

    # Token accuracy and losses as full logits give them, for the adapter and for the base.
    loss, accuracy = _full_logits_eval(tiny_base, adapter, data.eval)
    assert final.eval_loss == pytest.approx(loss, abs=1e-5)
    assert final.metrics["eval_token_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    base_loss, base_accuracy = _full_logits_eval(tiny_base, None, data.eval)
    assert final.metrics["base_eval_loss"] == pytest.approx(base_loss, abs=1e-5)
    assert final.metrics["base_eval_token_accuracy"] == pytest.approx(base_accuracy, abs=1e-9)

    # No generation asked for (max_examples 0), or no prompt to generate from (text): loss metrics only.
    for name in ("colors", "text"):
        (event,) = _evals(events, name)
        assert event.final and event.samples == [] and event.errors == {}
        assert set(event.metrics) == {"eval_token_accuracy", "base_eval_loss", "base_eval_token_accuracy"}


def test_a_child_reports_its_parent_and_its_scores_do_not_depend_on_its_neighbours(
    tiny_base: Path, make_task: TaskFactory
) -> None:
    judged = EvalConfig(scorers=["exact_match", "token_f1"], max_new_tokens=10, samples=2)
    parent = make_task("counting", out="parent", steps=6).model_copy(update={"eval": judged})
    _run(tiny_base, parent)

    def child(out: str):
        return make_task("child", skill="counting", out=out, steps=3).model_copy(
            update={"init_from": _final_dir(parent), "baseline_from": _final_dir(parent), "eval": judged}
        )

    alone = child("alone")
    done, events = _run(tiny_base, alone)
    (final,) = _evals(events, "child")
    assert done["child"].baseline_eval_loss == final.metrics["parent_eval_loss"]
    assert {"parent_eval_loss", "parent_eval_token_accuracy", "parent_eval_exact_match"} <= set(final.metrics)
    assert "parent_eval_token_f1" in final.metrics
    server = AdapterServer(str(tiny_base), device="cpu")
    parent_says = server.generate([(_final_dir(parent), s.prompt) for s in final.samples], max_new_tokens=10)
    assert [s.parent_output for s in final.samples] == parent_says

    # The same child beside a neighbour that finishes in the same step (one batched generation).
    packed = child("packed")
    neighbour = make_task("colors", out="packed", steps=3, lora={"r": 8}).model_copy(update={"eval": judged})
    _, pack_events = _run(tiny_base, packed, neighbour)
    (in_pack,) = _evals(pack_events, "child")
    assert (_evals(pack_events, "colors")[0].step, in_pack.step) == (3, 3)
    assert in_pack.samples == final.samples
    generated = {m: v for m, v in final.metrics.items() if "loss" not in m and "accuracy" not in m}
    assert {m: in_pack.metrics[m] for m in generated} == generated
    for metric, value in final.metrics.items():
        assert in_pack.metrics[metric] == pytest.approx(value, abs=1e-6)
