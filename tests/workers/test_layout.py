"""Padding-free packing: rows hold several documents, and every document computes as if alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.contract.plan import LoraConfig
from workers.engine.examples import IGNORE_INDEX, Example
from workers.engine.layout import Part, build_batch, choose_width, next_fit
from workers.engine.multilora import MultiLoraModel


def _doc(n: int, seed: int, prompt: int = 0) -> Example:
    ids = torch.randint(10, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    labels = [IGNORE_INDEX] * prompt + ids[prompt:]
    return Example(tuple(ids), tuple(labels))


def _model(tiny_base: Path) -> MultiLoraModel:
    model = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32))
    for k, (name, targets) in enumerate((("a", ["q_proj", "v_proj"]), ("b", "all-linear"))):
        model.add_adapter(name, LoraConfig(r=4 + 4 * k, alpha=8.0, target_modules=targets), seed=0)
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for weights in model.adapters[name].modules.values():
                weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * 0.05)
    return model


PARTS = [
    Part("a", [_doc(9, 1), _doc(3, 2), _doc(14, 3, prompt=4), _doc(5, 4)]),
    Part(None, [_doc(6, 5)]),
    Part("b", [_doc(2, 6), _doc(11, 7), _doc(7, 8)]),
]


def test_next_fit_keeps_document_order_and_never_splits() -> None:
    assert next_fit([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    assert next_fit([7, 7], 7) == [[0], [1]]
    with pytest.raises(ValueError, match="does not fit"):
        next_fit([8], 7)


def test_the_row_width_trades_padding_against_attention() -> None:
    parts = [([6, 5, 5], True)]
    assert choose_width(parts, attention_weight=0.0) == 16  # free attention: one row, no padding
    assert choose_width(parts, attention_weight=1.0) == 6  # costly attention: narrow rows
    assert choose_width(parts, attention_weight=0.0, max_width=13) == 6  # 16 is too wide; 3 x 6 < 2 x 13
    assert choose_width([([5, 5], False)], attention_weight=0.0) == 5  # unpacked: rows are documents


def test_packed_rows_hold_documents_back_to_back() -> None:
    batch = build_batch(PARTS, pad_id=0, max_width=20)
    assert batch.attention_mask is None and batch.real_tokens == 57
    assert batch.padded_tokens == 70  # 5 rows of 14; unpacked: 8 rows padded to the longest = 112
    flat_ids, flat_valid = batch.input_ids.reshape(-1), batch.valid.reshape(-1)
    flat_pos, flat_targets = batch.position_ids.reshape(-1), batch.targets.reshape(-1)
    assert batch.segments[0][1] == 0 and batch.segments[-1][2] == batch.padded_tokens
    for (_, _, end), (_, next_start, _) in zip(batch.segments, batch.segments[1:], strict=False):
        assert end == next_start  # contiguous token ranges, in part order
    for part, (name, start, end) in zip(PARTS, batch.segments, strict=True):
        assert part.name == name
        real = flat_valid[start:end]
        ids = flat_ids[start:end][real].tolist()
        assert ids == [t for ex in part.examples for t in ex.input_ids]  # documents whole, in order
        positions = flat_pos[start:end][real].tolist()
        assert positions == [i for ex in part.examples for i in range(len(ex.input_ids))]
        shifted = [t for ex in part.examples for t in (*ex.labels[1:], IGNORE_INDEX)]
        assert flat_targets[start:end][real].tolist() == shifted  # never across documents
    rows_of = [{r for r in range(start // 14, (end - 1) // 14 + 1)} for _, start, end in batch.segments]
    assert rows_of[0] & rows_of[1] and rows_of[1] & rows_of[2]  # parts share rows
    unpacked = build_batch([Part(p.name, p.examples, packing=False) for p in PARTS], pad_id=0)
    assert unpacked.padded_tokens == 8 * 14 and unpacked.position_ids is None
    assert unpacked.attention_mask is not None and unpacked.segments[1] == (None, 4 * 14, 5 * 14)


@torch.no_grad()
def worst_gap_to_alone(model: MultiLoraModel, reference: MultiLoraModel, batch) -> float:
    """The largest logit difference between `model`'s packed forward of `batch` (laid out from `PARTS`)
    and `reference` run on each document alone."""
    packed = model(batch.input_ids, None, batch.segments, position_ids=batch.position_ids, by_token=True)
    logits = packed.reshape(-1, packed.shape[-1])
    worst = 0.0
    for name, start, end in batch.segments:
        part = next(p for p in PARTS if p.name == name)
        flat = logits[start:end][batch.valid.reshape(-1)[start:end]]
        offset = 0
        for example in part.examples:
            alone = reference(torch.tensor([example.input_ids]), None, [(name, 0, 1)])[0]
            n = len(example.input_ids)
            worst = max(worst, float((flat[offset : offset + n] - alone).abs().max()))
            offset += n
    return worst


def test_a_packed_forward_gives_each_document_its_logits_alone(tiny_base: Path) -> None:
    model = _model(tiny_base)
    assert worst_gap_to_alone(model, model, build_batch(PARTS, pad_id=0, max_width=20)) <= 1e-5


def test_packed_and_unpacked_losses_and_gradients_agree(tiny_base: Path) -> None:
    model = _model(tiny_base)
    results = []
    for packing in (True, False):
        batch = build_batch([Part(p.name, p.examples, packing) for p in PARTS], pad_id=0, max_width=20)
        sums = model.segment_losses(batch, training=True)
        sums.sum().backward()
        grads = [t.grad.clone() for name in ("a", "b") for t in model.adapters[name].parameters()]
        for name in ("a", "b"):
            for t in model.adapters[name].parameters():
                t.grad = None
        results.append((sums.detach(), grads))
    (packed, packed_grads), (unpacked, unpacked_grads) = results
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=0)
    for g1, g2 in zip(packed_grads, unpacked_grads, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=0)
