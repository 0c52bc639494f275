"""The multi-LoRA layer against the math in its docstring."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.contract.plan import LoraConfig
from workers.engine.multilora import MultiLoraModel, linear_module_names, resolve_target_modules


def _base(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _batch(rows: int = 6, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 500, (rows, length), generator=torch.Generator().manual_seed(seed))


def _randomize_b(model: MultiLoraModel, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weights in model.adapters[name].modules.values():
            weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * 0.05)


def _add(model: MultiLoraModel, name: str, r: int = 4, alpha: float = 8.0, **kw):
    targets = kw.pop("target_modules", ["q_proj", "v_proj"])
    lora = LoraConfig(r=r, alpha=alpha, dropout=kw.pop("dropout", 0.0), target_modules=targets)
    return model.add_adapter(name, lora, seed=0, **kw)


def test_fresh_adapter_leaves_logits_identical_to_the_base(tiny_base: Path) -> None:
    ids = _batch()
    expected = _base(tiny_base)(input_ids=ids).logits
    model = MultiLoraModel(_base(tiny_base))
    _add(model, "a")
    _add(model, "b", r=8, target_modules="all-linear")
    for kernel in ("loop", "grouped"):
        model.routing.kernel = kernel
        got = model(ids, None, [("a", 0, 3), ("b", 3, 6)])
        assert torch.equal(got, expected)
    assert torch.equal(model(ids, None, []), expected)


def test_each_segment_sees_only_its_own_adapter(tiny_base: Path) -> None:
    ids = _batch()
    model = MultiLoraModel(_base(tiny_base))
    _add(model, "a")
    _add(model, "b", r=2, alpha=4, target_modules=["o_proj", "down_proj"])
    _randomize_b(model, "a", 1)
    _randomize_b(model, "b", 2)
    packed = model(ids, None, [("a", 0, 2), ("b", 2, 4), (None, 4, 6)])
    alone_a = model(ids[0:2], None, [("a", 0, 2)])
    alone_b = model(ids[2:4], None, [("b", 0, 2)])
    base_rows = model(ids[4:6], None, [])
    torch.testing.assert_close(packed[0:2], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[2:4], alone_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[4:6], base_rows, atol=1e-5, rtol=0)
    assert (alone_a - model(ids[0:2], None, [])).abs().max() > 1e-3  # the adapter does change outputs


def _mixed_model(tiny_base: Path) -> tuple[MultiLoraModel, list[tuple[str, int, int]], torch.Tensor]:
    """Four adapters of ranks 2..16, one with dropout, one on other modules; segments of 1-3 rows."""
    model = MultiLoraModel(_base(tiny_base))
    _add(model, "a", r=2, alpha=4.0)
    _add(model, "b", r=16, alpha=8.0, dropout=0.3, target_modules="all-linear")
    _add(model, "c", r=8, alpha=8.0, target_modules=["q_proj", "o_proj"])
    _add(model, "d", r=4, alpha=2.0, dropout=0.1)
    for k, name in enumerate("abcd"):
        _randomize_b(model, name, k)
    segments = [("a", 0, 1), ("b", 1, 4), (None, 4, 5), ("c", 5, 7), ("d", 7, 8)]
    valid = torch.ones(8, 12, dtype=torch.bool)
    valid[2, 9:] = False  # some padding: dropout masks are drawn for real tokens only
    return model, segments, valid


@pytest.mark.parametrize("training", [False, True])
def test_grouped_kernel_matches_the_loop_with_mixed_ranks_lengths_and_dropout(
    tiny_base: Path, training: bool
) -> None:
    ids = _batch(rows=8)
    results = {}
    for kernel in ("loop", "grouped"):
        model, segments, valid = _mixed_model(tiny_base)  # fresh: the same dropout streams
        model.routing.kernel = kernel
        with model.routed(segments, training, valid):
            logits = model.base(input_ids=ids, use_cache=False).logits
        logits.square().mean().backward()
        grads = {n: [t.grad for t in model.adapters[n].parameters()] for n in "abcd"}
        results[kernel] = (logits.detach(), grads)
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], atol=1e-5, rtol=0)
    for name in "abcd":
        for g, ref in zip(results["grouped"][1][name], results["loop"][1][name], strict=True):
            torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)


def test_auto_takes_the_grouped_kernel_where_it_wins(tiny_base: Path) -> None:
    model, _, _ = _mixed_model(tiny_base)
    layer = model._wrapped["model.layers.0.self_attn.q_proj"]
    x = torch.randn(8, 12, 64)

    def grouped(segments: list[tuple[str | None, int, int]], kernel: str = "auto") -> bool:
        model.routing.kernel = kernel
        with model.routed(segments, training=False):
            taking = layer._taking(model.routing.token_ranges(x))
            index = model.routing.group_index([(s, e) for _, s, e in taking], 8 * 12, x.device)
            return layer._use_grouped(x, taking, index)

    equal = [("a", 0, 2), ("b", 2, 4), ("c", 4, 6), ("d", 6, 8)]
    assert grouped(equal)  # equal segments tiling the batch: the block is a view, grouped wins
    assert not grouped([("a", 0, 1), ("b", 1, 8)])  # ragged on CPU: the loop's copies are cheaper
    assert not grouped([("a", 0, 8)])  # one segment: one matmul either way
    assert grouped([("a", 0, 1), ("b", 1, 8)], kernel="grouped")
    assert not grouped(equal, kernel="loop")


def test_merge_reproduces_adapter_logits(tiny_base: Path) -> None:
    ids = _batch(rows=2)
    model = MultiLoraModel(_base(tiny_base))
    _add(model, "a", target_modules="all-linear")
    _randomize_b(model, "a", 3)
    with_adapter = model(ids, None, [("a", 0, 2)])
    model.merge_adapter("a")
    model.remove_adapter("a")
    merged = model(ids, None, [])
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=0)


def test_adding_and_removing_slots_leaves_others_untouched(tiny_base: Path) -> None:
    ids = _batch(rows=2)
    model = MultiLoraModel(_base(tiny_base))
    _add(model, "a")
    _randomize_b(model, "a", 4)
    before = model(ids, None, [("a", 0, 2)])
    snapshot = [t.clone() for t in model.adapters["a"].parameters()]
    _add(model, "b", target_modules="all-linear")
    _randomize_b(model, "b", 5)
    model.remove_adapter("b")
    _add(model, "c")
    assert all(torch.equal(x, y) for x, y in zip(snapshot, model.adapters["a"].parameters(), strict=True))
    assert torch.equal(model(ids, None, [("a", 0, 2)]), before)


def test_initial_a_depends_only_on_seed_name_and_module(tiny_base: Path) -> None:
    one = MultiLoraModel(_base(tiny_base))
    _add(one, "x")
    two = MultiLoraModel(_base(tiny_base))
    _add(two, "other")
    _add(two, "x")
    for path, weights in one.adapters["x"].modules.items():
        assert torch.equal(weights.lora_A, two.adapters["x"].modules[path].lora_A)
        assert torch.count_nonzero(weights.lora_B) == 0
    assert not torch.equal(*(m.adapters[n].parameters()[0] for m, n in ((two, "x"), (two, "other"))))


def test_target_modules_resolution(tiny_base: Path) -> None:
    base = _base(tiny_base)
    linears = linear_module_names(base)
    assert "lm_head" not in linears
    assert len(resolve_target_modules(base, "all-linear")) == 14
    assert resolve_target_modules(base, ["q_proj"]) == [p for p in linears if p.endswith("q_proj")]
    with pytest.raises(ValueError, match=r"qkv_proj.*match no linear module.*'down_proj'.*'v_proj'"):
        resolve_target_modules(base, ["q_proj", "qkv_proj"])
