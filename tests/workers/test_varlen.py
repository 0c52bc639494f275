"""Variable-length attention on CPU: a whole step in one row, every document computed as if alone."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.workers.test_layout import PARTS, _model, worst_gap_to_alone
from workers.engine import varlen
from workers.engine.layout import Part, build_batch


def _varlen(model) -> None:
    model.base.set_attn_implementation(varlen.register())


def test_documents_bounds_come_from_restarting_positions() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    assert varlen.document_bounds(positions) == [[0, 3, 5, 6], [0, 4, 5, 6]]


def test_one_row_without_padding_gives_each_document_its_logits_alone(tiny_base: Path) -> None:
    model = _model(tiny_base)
    _varlen(model)
    batch = build_batch(PARTS, pad_id=0, attention_weight=0.0)
    assert batch.input_ids.shape[0] == 1 and batch.real_tokens == batch.padded_tokens  # no padding at all
    reference = _model(tiny_base)  # transformers' SDPA, one document at a time
    assert worst_gap_to_alone(model, reference, batch) <= 1e-5


def test_losses_and_gradients_equal_sdpa_with_and_without_recompute(tiny_base: Path) -> None:
    batch = build_batch(PARTS, pad_id=0, attention_weight=0.0)
    unpacked = build_batch([Part(p.name, p.examples, packing=False) for p in PARTS], pad_id=0)
    results = []
    for attention, layout, recompute in (
        ("sdpa", unpacked, False),
        ("varlen", batch, False),
        ("varlen", batch, True),
    ):
        model = _model(tiny_base)
        if attention == "varlen":
            _varlen(model)
        model.set_checkpointing(recompute)
        sums = model.segment_losses(layout, training=True)
        sums.sum().backward()
        grads = [t.grad for name in ("a", "b") for t in model.adapters[name].parameters()]
        results.append((sums.detach(), grads))
    (reference, reference_grads), *others = results
    for sums, grads in others:
        torch.testing.assert_close(sums, reference, atol=1e-5, rtol=0)
        for got, expected in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_padding_masks_and_cached_decoding_fall_back_to_sdpa(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = torch.randint(10, 500, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding, as generation uses
    outputs = {}
    for attention in ("sdpa", varlen.register()):
        model.set_attn_implementation(attention)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        outputs[attention] = (logits[mask.bool()], generated)
    (logits, generated), (varlen_logits, varlen_generated) = outputs.values()
    torch.testing.assert_close(varlen_logits, logits, atol=1e-5, rtol=0)
    assert torch.equal(varlen_generated, generated)
