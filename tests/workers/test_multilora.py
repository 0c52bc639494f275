"""The multi-LoRA layer against the math in its docstring."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.multilora import MultiLoraModel, linear_module_names, resolve_target_modules


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
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return model.add_adapter(name, r=r, alpha=alpha, dropout=kw.pop("dropout", 0.0), seed=0, **kw)


def test_fresh_adapter_leaves_logits_identical_to_the_base(tiny_base: Path) -> None:
    ids = _batch()
    expected = _base(tiny_base)(input_ids=ids).logits
    model = MultiLoraModel(_base(tiny_base))
    _add(model, "a")
    _add(model, "b", r=8, target_modules="all-linear")
    for kernel in ("loop", "bmm"):
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


def test_bmm_kernel_matches_the_segment_loop(tiny_base: Path) -> None:
    ids = _batch(rows=8)
    model = MultiLoraModel(_base(tiny_base))
    segments = []
    for k, name in enumerate("abcd"):
        _add(model, name, alpha=4.0 + k)
        _randomize_b(model, name, k)
        segments.append((name, 2 * k, 2 * k + 2))
    model.routing.kernel = "loop"
    loop = model(ids, None, segments)
    model.routing.kernel = "bmm"
    bmm = model(ids, None, segments)
    torch.testing.assert_close(bmm, loop, atol=1e-5, rtol=0)


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
