"""The batched pack trainer: packing changes nothing about an adapter's result, and adapters do learn."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.workers.conftest import TaskFactory, final_weights, max_weight_diff, plan_of
from workers.contract.plan import AdapterDone, CheckpointEvent, EvalEvent, Event, StepEvent
from workers.engine.model import load_base
from workers.training.checkpoint import attach_frozen, checkpoint_dir, read_adapter
from workers.training.data import load_adapter_data
from workers.training.pack import run_pack
from workers.training.synthetic import SKILLS
from workers.training.trainer import PackTrainer, adapter_passes


def _train(base: Path, *tasks, **kw) -> tuple[dict[str, AdapterDone], list[Event]]:
    events: list[Event] = []
    result = run_pack(plan_of(base, *tasks), emit=events.append, **kw)
    return result.adapters, events


def test_adapter_in_a_pack_of_four_equals_the_adapter_alone(tiny_base: Path, make_task: TaskFactory) -> None:
    alone = make_task("counting", out="alone", lora={"dropout": 0.1})
    _train(tiny_base, alone)
    pack = [
        make_task("counting", out="pack", lora={"dropout": 0.1}),
        make_task("colors", out="pack", lora={"r": 8, "alpha": 8}),
        make_task("animals", out="pack", lora={"target_modules": "all-linear"}, batch_size=3),
        make_task("greetings", out="pack", learning_rate=1e-2),
    ]
    done, _ = _train(tiny_base, *pack)
    assert {d.status for d in done.values()} == {"trained"}
    assert max_weight_diff(final_weights(alone), final_weights(pack[0])) <= 1e-5


@pytest.mark.parametrize("packing", [True, False])
def test_grouped_and_loop_kernels_train_the_same_adapters(
    tiny_base: Path, make_task: TaskFactory, packing: bool
) -> None:
    def pack(out: str):  # mixed ranks, targets, dropout and batch sizes: segments of mixed lengths
        return [
            make_task("counting", out=out, steps=8, packing=packing, lora={"r": 2, "dropout": 0.1}),
            make_task("colors", out=out, steps=8, packing=packing, batch_size=7, lora={"r": 16}),
            make_task("animals", out=out, steps=8, packing=packing, lora={"target_modules": "all-linear"}),
        ]

    loop, grouped = pack("loop"), pack("grouped")
    _train(tiny_base, *loop, kernel="loop")
    _train(tiny_base, *grouped, kernel="grouped")
    for a, b in zip(loop, grouped, strict=True):
        assert max_weight_diff(final_weights(a), final_weights(b)) <= 1e-5


def test_adapter_passes_take_whole_adapters_up_to_the_token_limit() -> None:
    from workers.engine.examples import Example

    def docs(*lengths: int) -> list[Example]:
        return [Example(tuple(range(n)), tuple(range(n))) for n in lengths]

    parts = [docs(30, 20), docs(40), [], docs(90), docs(10, 10)]
    assert adapter_passes(parts, None) == [parts] and adapter_passes(parts, 500) == [parts]
    passes = adapter_passes(parts, 60)
    members = [[i for i, part in enumerate(p) if part] for p in passes]
    assert members == [[0], [1], [3], [4]]  # 50 | 40 | 90 alone (over the limit) | 20
    assert all(len(p) == len(parts) for p in passes)  # aligned with the pack's adapters
    assert [passes[k][i] for k, i in ((0, 0), (1, 1), (2, 3), (3, 4))] == [
        parts[0],
        parts[1],
        parts[3],
        parts[4],
    ]


def test_a_step_split_into_passes_trains_the_same_adapters(tiny_base: Path, make_task: TaskFactory) -> None:
    def pack(out: str):
        return [
            make_task("counting", out=out, steps=6, lora={"dropout": 0.1}),
            make_task("colors", out=out, steps=6, batch_size=7, lora={"r": 8}),
            make_task("animals", out=out, steps=6, lora={"target_modules": "all-linear", "dropout": 0.2}),
        ]

    whole, split = pack("whole"), pack("split")
    run_pack(plan_of(tiny_base, *whole).model_copy(update={"max_tokens_per_pass": 100_000}))
    run_pack(plan_of(tiny_base, *split).model_copy(update={"max_tokens_per_pass": 60}))  # ~one adapter a pass
    for a, b in zip(whole, split, strict=True):
        assert max_weight_diff(final_weights(a), final_weights(b)) <= 1e-6


def test_changing_a_neighbours_data_leaves_an_adapter_unchanged(
    tiny_base: Path, make_task: TaskFactory
) -> None:
    first = [
        make_task("counting", out="one", steps=10),
        make_task("other", skill="colors", out="one", steps=10),
    ]
    second = [
        make_task("counting", out="two", steps=10),
        make_task("other", skill="animals", out="two", steps=10),
    ]
    _train(tiny_base, *first)
    _train(tiny_base, *second)
    assert max_weight_diff(final_weights(first[0]), final_weights(second[0])) <= 1e-6
    assert max_weight_diff(final_weights(first[1]), final_weights(second[1])) > 1e-3


def test_each_adapter_learns_its_own_skill(tiny_base: Path, make_task: TaskFactory) -> None:
    skills = sorted(SKILLS)
    tasks = [
        make_task(
            s,
            steps=40,
            batch_size=8,
            learning_rate=1e-2,
            lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
            eval_every=20,
        )
        for s in skills
    ]
    done, events = _train(tiny_base, *tasks)
    assert all(d.status == "trained" for d in done.values())
    losses = {s: [e.loss for e in events if isinstance(e, StepEvent) and e.adapter == s] for s in skills}
    assert all(len(v) == 40 and v[-1] < v[0] for v in losses.values())

    # Evaluate every adapter (and the bare base) on every skill's eval split, in one trainer.
    loaded = load_base(str(tiny_base), device="cpu")
    trainer = PackTrainer(loaded, str(tiny_base), emit=lambda e: None, pack_id="eval")
    for task in tasks:
        files = read_adapter(Path(task.output_dir) / "final")
        attach_frozen(trainer.model, task.name, files)
    evals = {t.name: load_adapter_data(t.data, loaded.tokenizer, 48, 0, t.name).eval for t in tasks}
    requests = [(who, evals[skill]) for skill in skills for who in [None, *skills]]
    results = iter(trainer.evaluate(requests))
    for skill in skills:
        base_loss = next(results)[0]
        by_adapter = {who: next(results)[0] for who in skills}
        assert by_adapter[skill] < 0.25 * base_loss, (skill, by_adapter[skill], base_loss)
        others = [loss for who, loss in by_adapter.items() if who != skill]
        assert by_adapter[skill] < min(others) / 2, (skill, by_adapter)


def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_run(
    tiny_base: Path, make_task: TaskFactory
) -> None:
    kw = {"steps": 12, "checkpoint_every": 4, "lora": {"dropout": 0.2}, "warmup_steps": 3}
    straight = [make_task("counting", out="straight", **kw), make_task("colors", out="straight", **kw)]
    _train(tiny_base, *straight)

    crashed = [make_task("counting", out="crashed", **kw), make_task("colors", out="crashed", **kw)]

    def crash_after_step_8(event: Event) -> None:
        if isinstance(event, CheckpointEvent) and event.step == 8 and event.adapter == "colors":
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_pack(plan_of(tiny_base, *crashed), emit=crash_after_step_8)
    assert not (Path(crashed[0].output_dir) / "final").exists()
    done, events = _train(tiny_base, *crashed)  # the same plan again, as Ray Train's restart does
    first_steps = [e.step for e in events if isinstance(e, StepEvent) and e.adapter == "counting"]
    assert first_steps[0] == 9
    for a, b in zip(straight, crashed, strict=True):
        assert max_weight_diff(final_weights(a), final_weights(b)) <= 1e-6
    assert {d.status for d in done.values()} == {"trained"}

    again, events = _train(tiny_base, *crashed)  # finished adapters are reported, not retrained
    assert {d.status for d in again.values()} == {"trained"} and not any(
        isinstance(e, StepEvent) for e in events
    )


def test_explicit_resume_from_checkpoint(tiny_base: Path, make_task: TaskFactory) -> None:
    full = make_task("animals", out="full", steps=8, checkpoint_every=4)
    _train(tiny_base, full)
    source = checkpoint_dir(full.output_dir, 4)
    resumed = make_task("animals", out="resumed", steps=8).model_copy(update={"resume_from": source})
    _train(tiny_base, resumed)
    assert max_weight_diff(final_weights(full), final_weights(resumed)) <= 1e-6


def test_gradient_accumulation_matches_the_bigger_batch(tiny_base: Path, make_task: TaskFactory) -> None:
    big = make_task("counting", out="big", steps=8, batch_size=4)
    accumulated = make_task("counting", out="acc", steps=8, batch_size=2, grad_accum_steps=2)
    _train(tiny_base, big, kernel="loop")
    _train(tiny_base, accumulated, kernel="loop")
    assert max_weight_diff(final_weights(big), final_weights(accumulated)) <= 1e-5


def test_adapters_finish_on_their_own_schedule_and_slots_refill(
    tiny_base: Path, make_task: TaskFactory
) -> None:
    short_alone = make_task("colors", out="alone", steps=5)
    late_alone = make_task("greetings", out="alone", steps=4)
    _train(tiny_base, short_alone)
    _train(tiny_base, late_alone)

    short = make_task("colors", out="pack", steps=5)
    late = make_task("greetings", out="pack", steps=4)
    queue = [late]
    asked: list[int] = []

    def refill(free: int):
        asked.append(free)
        taken, queue[:] = queue[:free], queue[free:]
        return taken

    done, events = _train(tiny_base, short, make_task("counting", out="pack", steps=10), refill=refill)
    assert set(done) == {"colors", "counting", "greetings"}
    order = [e.adapter for e in events if isinstance(e, AdapterDone)]
    assert order == ["colors", "greetings", "counting"]  # greetings: steps 6-9 in colors' old slot
    assert asked[0] == 1  # asked only once a slot was free
    assert max_weight_diff(final_weights(short_alone), final_weights(short)) <= 1e-5
    assert max_weight_diff(final_weights(late_alone), final_weights(late)) <= 1e-5


def test_zero_steps_from_a_parent_keeps_its_weights_bit_for_bit(
    tiny_base: Path, make_task: TaskFactory
) -> None:
    parent = make_task("counting", out="parent", steps=6)
    _train(tiny_base, parent)
    child = make_task("child", skill="colors", out="child", steps=0).model_copy(
        update={
            "init_from": Path(parent.output_dir) / "final",
            "baseline_from": Path(parent.output_dir) / "final",
        }
    )
    done, events = _train(tiny_base, child)
    assert done["child"].status == "trained" and done["child"].eval_loss is not None
    assert done["child"].baseline_eval_loss == done["child"].eval_loss  # same weights, same eval data
    (final,) = [e for e in events if isinstance(e, EvalEvent)]
    assert final.final and final.samples and final.metrics["parent_eval_loss"] == final.eval_loss
    assert all(s.parent_output == s.output for s in final.samples)  # and the same answers
    for metric in ("eval_token_accuracy", "eval_exact_match", "eval_token_f1"):
        assert final.metrics["parent_" + metric] == final.metrics[metric]
    for key, value in final_weights(parent).items():
        assert torch.equal(value, final_weights(child)[key])


def test_a_child_with_another_rank_fails_alone(tiny_base: Path, make_task: TaskFactory) -> None:
    parent = make_task("counting", out="parent", steps=2)
    _train(tiny_base, parent)
    child = make_task("child", skill="colors", out="c", steps=2, lora={"r": 8}).model_copy(
        update={"init_from": Path(parent.output_dir) / "final"}
    )
    sibling = make_task("animals", out="c", steps=2)
    done, _ = _train(tiny_base, child, sibling)
    assert (
        done["child"].status == "failed"
        and "rank 4" in done["child"].error
        and "`lora.r`" in done["child"].error
    )
    assert done["animals"].status == "trained"


def test_bad_inputs_fail_their_adapter_with_a_clear_error(
    tiny_base: Path, make_task: TaskFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    tasks = [
        make_task("bad-targets", skill="colors", lora={"target_modules": ["q_proj", "query"]}, steps=2),
        make_task("bad-data", skill="colors", data={"path": broken, "eval_fraction": 0.0}, steps=2),
        make_task("good", skill="colors", steps=2),
    ]
    done, _ = _train(tiny_base, *tasks)
    assert done["good"].status == "trained"
    assert done["bad-targets"].status == "failed"
    assert (
        "`target_modules` ['query']" in done["bad-targets"].error and "'o_proj'" in done["bad-targets"].error
    )
    assert done["bad-data"].status == "failed"
    assert "broken.jsonl" in done["bad-data"].error and "line 2" in done["bad-data"].error
    assert "text" in done["bad-data"].error
    assert not (Path(tasks[0].output_dir) / "final").exists()


def test_fixed_seed_gives_identical_results(tiny_base: Path, make_task: TaskFactory) -> None:
    runs = [make_task("colors", out=f"run{i}", steps=6, lora={"dropout": 0.3}) for i in range(2)]
    for task in runs:
        _train(tiny_base, task)
    assert max_weight_diff(final_weights(runs[0]), final_weights(runs[1])) == 0.0


def test_a_cancelled_adapter_leaves_between_steps(tiny_base: Path, make_task: TaskFactory) -> None:
    tasks = [make_task("colors", steps=10, checkpoint_every=2), make_task("animals", steps=10)]
    steps_seen: list[int] = []

    def cancelled() -> set[str]:
        return {"colors"} if len(steps_seen) >= 3 else set()

    def emit(event: Event) -> None:
        if isinstance(event, StepEvent) and event.adapter == "colors":
            steps_seen.append(event.step)

    result = run_pack(plan_of(tiny_base, *tasks), emit=emit, cancelled=cancelled)
    assert result.adapters["colors"].status == "cancelled" and result.adapters["colors"].step == 3
    assert result.adapters["animals"].status == "trained"
    assert (
        not (Path(tasks[0].output_dir) / "final").exists()
        and (Path(tasks[0].output_dir) / "checkpoint-00000002").is_dir()
    )


def test_a_yielded_adapter_resumes_exactly_where_it_left_off(tiny_base: Path, make_task: TaskFactory) -> None:
    """Yielding (making room for other work) costs a checkpoint, never a step: asked in the middle of
    step 5's accumulation window (`checkpoint_every: 4`), the adapter leaves once step 5 is done, with a
    checkpoint of step 5, and resumed from the queue it ends bit for bit where an uninterrupted run ends,
    redoing no step."""
    kw = {"steps": 9, "checkpoint_every": 4, "lora": {"dropout": 0.2}, "batch_size": 2, "grad_accum_steps": 2}
    straight = make_task("counting", out="straight", **kw)
    yielded = make_task("counting", out="yielded", **kw)
    _train(tiny_base, straight)
    asked = 0

    def yielding() -> set[str]:  # asked before each pack step; the 10th is the middle of step 5's window
        nonlocal asked
        asked += 1
        return {"counting"} if asked == 10 else set()

    left = run_pack(plan_of(tiny_base, yielded), yielding=yielding).adapters["counting"]
    assert (left.status, left.step) == ("yielded", 5)
    assert (Path(yielded.output_dir) / "checkpoint-00000005").is_dir()
    assert not (Path(yielded.output_dir) / "final").exists()

    done, events = _train(tiny_base, yielded)  # back from the queue: the same task again
    assert [e.step for e in events if isinstance(e, StepEvent)] == [6, 7, 8, 9]
    assert done["counting"].status == "trained"
    assert max_weight_diff(final_weights(straight), final_weights(yielded)) == 0


def test_length_groups_split_only_when_it_saves_padding() -> None:
    from workers.engine.examples import Example
    from workers.training.trainer import length_groups

    def ex(n: int) -> Example:
        return Example(tuple(range(n)), tuple(range(n)))

    even = [[ex(10), ex(11)], [ex(10), ex(11)]]
    assert length_groups(even) == [even]  # nothing to save
    mixed = [[ex(10), ex(40), ex(11)], [ex(39), ex(12)]]
    short, long = length_groups(mixed)
    assert short == [[ex(10), ex(11)], [ex(12)]] and long == [[ex(40)], [ex(39)]]


def _mixed_lengths(tmp_path: Path) -> Path:
    import json

    mixed = tmp_path / "mixed.jsonl"  # very different lengths: padding would waste most of a batch
    records = [{"text": " ".join(["red green blue"] * (1 + 5 * (i % 3)))} for i in range(60)]
    mixed.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return mixed


@pytest.mark.parametrize("packing", [True, False])
def test_mixed_lengths_in_a_pack_still_equal_each_adapter_alone(
    tiny_base: Path, make_task: TaskFactory, tmp_path: Path, packing: bool
) -> None:
    """Unpacked, the pack's rows are regrouped by length; packed, documents share rows. Both exact."""
    data = {"path": _mixed_lengths(tmp_path), "eval_fraction": 0.0}
    kw = {"steps": 8, "packing": packing, "lora": {"dropout": 0.1}}
    alone = make_task("mixed", skill="colors", out="alone", data=data, **kw)
    _train(tiny_base, alone)
    pack = [
        make_task("mixed", skill="colors", out="pack", data=data, **kw),
        make_task("colors", out="pack", steps=8, packing=packing),
        make_task("animals", out="pack", steps=8, batch_size=6, packing=packing),
    ]
    _train(tiny_base, *pack)
    assert max_weight_diff(final_weights(alone), final_weights(pack[0])) <= 1e-5


def test_packed_rows_no_longer_pad_to_the_longest_of_the_pack(
    tiny_base: Path, make_task: TaskFactory, tmp_path: Path
) -> None:
    data = {"path": _mixed_lengths(tmp_path), "eval_fraction": 0.0}
    trainer = PackTrainer(load_base(str(tiny_base), device="cpu"), str(tiny_base), lambda e: None, "p")
    kw = {"batch_size": 8, "max_seq_len": 128}
    trainer.add(make_task("mixed", skill="colors", data=data, **kw))
    trainer.add(make_task("colors", **kw))
    trainer.step()
    docs = [ex for run in trainer.active for ex in run.window[0]]
    batch = trainer.last_batch
    assert batch.real_tokens == sum(len(ex.input_ids) for ex in docs)
    padded_to_longest = len(docs) * max(len(ex.input_ids) for ex in docs)
    assert batch.padded_tokens < 0.7 * padded_to_longest
    assert 1 - batch.real_tokens / batch.padded_tokens < 0.2  # the packed pass's padding share


def test_a_bfloat16_base_trains_with_float32_adapters(tiny_base: Path, make_task: TaskFactory) -> None:
    loaded = load_base(str(tiny_base), dtype="bfloat16", device="cpu")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    events: list[Event] = []
    trainer = PackTrainer(loaded, str(tiny_base), events.append, "bf16")
    lora = {"target_modules": "all-linear"}
    task = make_task("colors", steps=30, batch_size=8, learning_rate=1e-2, lora=lora)
    trainer.add(task)
    run = trainer.runs["colors"]
    for _ in range(29):
        trainer.step()
    params = run.adapter.parameters()
    assert all(p.dtype == torch.float32 for p in params)
    state = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    assert state and all(v.dtype == torch.float32 for v in state)  # AdamW moments in fp32
    trainer.step()  # the last step finishes the adapter and writes it
    losses = [e.loss for e in events if isinstance(e, StepEvent)]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])  # it learns
    weights = read_adapter(Path(task.output_dir) / "final").weights
    assert all(w.lora_A.dtype == torch.float32 for w in weights.values())  # PEFT keeps adapters in fp32


def test_a_checkpoint_written_on_other_data_is_not_resumed(
    tiny_base: Path, make_task: TaskFactory, skill_files: dict[str, Path], tmp_path: Path
) -> None:
    """The data file was fixed while the adapter waited to resume: its checkpoint's weights, optimizer
    and sample position belong to the old rows, so the adapter fails with the reason (a person's retry
    starts it over) instead of quietly training on a mix of both files."""
    data = tmp_path / "counting.jsonl"
    data.write_bytes(skill_files["counting"].read_bytes())
    task = make_task("counting", out="changed", data={"path": data}, steps=8, checkpoint_every=4)

    def crash_after_step_4(event: Event) -> None:
        if isinstance(event, CheckpointEvent) and event.step == 4:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_pack(plan_of(tiny_base, task), emit=crash_after_step_4)
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # one more row
    done, events = _train(tiny_base, task)
    assert done["counting"].status == "failed", done
    assert "its data changed since its checkpoint at step 4" in str(done["counting"].error)
    assert not any(isinstance(e, StepEvent) for e in events)


def test_a_16_bit_base_on_a_cpu_without_native_support_is_called_slow() -> None:
    from workers.engine.model import slow_cpu_dtype

    avx2 = frozenset({"avx2", "fma"})
    assert "float32" in (slow_cpu_dtype("bfloat16", "cpu", avx2) or "")
    assert "float32" in (slow_cpu_dtype("float16", "cpu", avx2) or "")
    assert slow_cpu_dtype("bfloat16", "cpu", avx2 | {"avx512_bf16"}) is None
    assert slow_cpu_dtype("bfloat16", "cpu", avx2 | {"amx_bf16"}) is None
    assert slow_cpu_dtype("float32", "cpu", avx2) is None
    assert slow_cpu_dtype("bfloat16", "cuda", avx2) is None
    assert slow_cpu_dtype("bfloat16", "cpu", frozenset()) is None  # flags unknown: say nothing
