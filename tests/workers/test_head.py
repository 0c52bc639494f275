"""The chunked head + cross-entropy equals the full-logits loss, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from workers.engine.head import chunk_tokens, linear_cross_entropy, linear_cross_entropy_hits


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_loss_equals_the_full_loss(chunk: int) -> None:
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(32, 300, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(300, 32, generator=generator) / 4)
    head.requires_grad_(False)
    hidden = torch.randn(50, 32, generator=generator, requires_grad=True)
    targets = torch.randint(0, 300, (50,), generator=generator)
    weights = torch.rand(50, generator=generator)  # as per-segment normalisation weighs tokens

    full = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    (full * weights).sum().backward()
    full_grad, hidden.grad = hidden.grad.clone(), None

    chunked = linear_cross_entropy(hidden, head, targets, chunk)
    (chunked * weights).sum().backward()
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad, full_grad, atol=1e-5, rtol=0)


def test_bfloat16_head_gives_float32_losses_close_to_the_full_path() -> None:
    generator = torch.Generator().manual_seed(1)
    head = nn.Linear(32, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(40, 32, generator=generator).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 300, (40,), generator=generator)
    full = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    full.sum().backward()
    full_grad, hidden.grad = hidden.grad.clone(), None
    chunked = linear_cross_entropy(hidden, head, targets, chunk=16)
    chunked.sum().backward()
    assert chunked.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, full.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad.float(), full_grad.float(), atol=1e-2, rtol=0)


def test_chunk_size_follows_the_vocabulary() -> None:
    assert chunk_tokens(49_152) == 682  # 128 MiB of fp32 logits
    assert chunk_tokens(10**9) == 16


def test_backward_keeps_one_hidden_sized_tensor_and_no_logits() -> None:
    """The gradient is taken in forward: what autograd keeps is [tokens, d], never [tokens, vocab]."""
    generator = torch.Generator().manual_seed(2)
    head = nn.Linear(32, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(50, 32, generator=generator, requires_grad=True)
    targets = torch.randint(0, 300, (50,), generator=generator)
    saved: list[tuple[int, ...]] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        losses = linear_cross_entropy(hidden, head, targets, chunk=16)
    assert saved == [(50, 32)]
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(hidden, head, targets, chunk=16), losses.detach())
    losses.sum().backward()
    assert hidden.grad is not None and hidden.grad.shape == (50, 32)


@pytest.mark.parametrize("chunk", [7, 1000])
def test_eval_losses_and_argmax_hits_equal_the_full_logits(chunk: int) -> None:
    generator = torch.Generator().manual_seed(2)
    head = nn.Linear(32, 300, bias=True).requires_grad_(False)
    hidden = torch.randn(50, 32, generator=generator)
    logits = head(hidden).float()
    targets = logits.argmax(-1)
    targets[::2] = torch.randint(0, 300, (25,), generator=generator)  # about half predicted right
    losses, hits = linear_cross_entropy_hits(hidden, head, targets, chunk)
    torch.testing.assert_close(losses, F.cross_entropy(logits, targets, reduction="none"), atol=1e-5, rtol=0)
    assert torch.equal(hits, logits.argmax(-1) == targets)
    assert 20 <= int(hits.sum()) < 50
