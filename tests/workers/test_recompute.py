"""Activation checkpointing per decoder layer changes memory, never results (dropout included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.workers.conftest import TaskFactory, final_weights, max_weight_diff
from workers.contract.plan import LoraConfig, PackPlan
from workers.engine.examples import IGNORE_INDEX, Example
from workers.engine.layout import Part, build_batch
from workers.engine.model import load_base
from workers.engine.multilora import MultiLoraModel
from workers.training.pack import run_pack
from workers.training.trainer import PackTrainer


def _doc(n: int, seed: int) -> Example:
    ids = torch.randint(10, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Example(tuple(ids), (IGNORE_INDEX, *ids[1:]))


def _losses_and_grads(tiny_base: Path, checkpointing: bool, kernel: str):
    model = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), kernel)
    model.add_adapter("a", LoraConfig(r=4, alpha=8.0, dropout=0.2, target_modules="all-linear"), seed=0)
    model.add_adapter("b", LoraConfig(r=8, alpha=8.0, target_modules=["q_proj", "v_proj"]), seed=0)
    for name in ("a", "b"):
        with torch.no_grad():
            for w in model.adapters[name].modules.values():
                w.lora_B.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(3))
    model.set_checkpointing(checkpointing)
    parts = [Part("a", [_doc(9, 1), _doc(5, 2), _doc(12, 3)]), Part("b", [_doc(7, 4), _doc(10, 5)])]
    saved: dict[int, int] = {}  # storage -> bytes of the tensors autograd keeps for backward

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums = model.segment_losses(build_batch(parts, pad_id=0, max_width=16), training=True)
    sums.sum().backward()
    grads = [t.grad for name in ("a", "b") for t in model.adapters[name].parameters()]
    return sums.detach(), grads, model.adapters["a"].dropout_generator.get_state(), sum(saved.values())


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_checkpointing_gives_the_same_losses_gradients_and_dropout_streams(
    tiny_base: Path, kernel: str
) -> None:
    plain = _losses_and_grads(tiny_base, False, kernel)
    checkpointed = _losses_and_grads(tiny_base, True, kernel)
    torch.testing.assert_close(checkpointed[0], plain[0], atol=1e-5, rtol=0)
    for g1, g2 in zip(checkpointed[1], plain[1], strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=0)
    assert torch.equal(checkpointed[2], plain[2])  # the recompute rewound and restored the stream
    assert checkpointed[3] < plain[3] / 2  # and it did keep less for backward


def test_a_pack_trained_with_checkpointing_equals_one_without(
    tiny_base: Path, make_task: TaskFactory
) -> None:
    def tasks(out: str):
        return [
            make_task("counting", out=out, steps=6, lora={"dropout": 0.1}),
            make_task("colors", out=out, steps=6, lora={"r": 8, "target_modules": "all-linear"}),
        ]

    off, on = tasks("off"), tasks("on")
    for adapters, mode in ((off, "off"), (on, "on")):
        plan = PackPlan(
            base_model=str(tiny_base), device="cpu", adapters=adapters, activation_checkpointing=mode
        )
        run_pack(plan)
    for a, b in zip(off, on, strict=True):
        assert max_weight_diff(final_weights(a), final_weights(b)) <= 1e-5


@pytest.mark.parametrize(("budget", "expected"), [(None, False), (10**15, False), (1, True)])
def test_auto_checkpoints_only_when_the_step_would_not_fit_the_budget(
    tiny_base: Path, make_task: TaskFactory, budget: int | None, expected: bool
) -> None:
    loaded = load_base(str(tiny_base), device="cpu")
    trainer = PackTrainer(loaded, str(tiny_base), lambda e: None, "p", memory_budget_bytes=budget)
    trainer.add(make_task("colors", steps=2))
    trainer.step()
    assert trainer.model.checkpointing is expected
