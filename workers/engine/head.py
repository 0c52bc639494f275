"""The output head and the cross-entropy in chunks of tokens, with the gradient taken in forward.

Full-vocabulary logits for every token of a pack are the largest tensor of a step at real vocab sizes
(e.g. 8 adapters x 4 rows x 256 tokens x 49,152 words x 4 bytes = 1.6 GB, and as much again for their
gradient). We only ever need a loss per target token and the gradient of the hidden state, so:

- only target tokens go through the head (prompt and padding positions get no logits at all);
- they go through it `chunk` tokens at a time, and a chunk's logits exist in fp32 only while that chunk
  is processed;
- when a backward will follow, each chunk's gradient with respect to the hidden state is computed in
  forward, while its logits exist (as Liger's fused linear cross-entropy does), and kept: one [tokens, d]
  tensor, the size of the hidden state itself. Backward only scales it by the upstream per-token gradient,
  which is exact because each token's loss depends on its own hidden state alone. Recomputing the logits
  in backward instead costs a third head matmul per token: 13% of all FLOPs at Qwen2.5-0.5B's 152k vocab.

The loss is the standard one: logsumexp(logits) - logits[target], in fp32 (logits are computed in the
head's dtype, as `F.linear` would, then upcast). Its gradient is softmax(logits) - onehot(target).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from workers.contract.memory import (
    HEAD_CHUNK_BYTES,  # fp32 logits per chunk; the memory model counts the same
)

# Configs whose head is more than a linear layer (soft-capping, scaled logits): they take the full path.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_tokens(vocab_size: int, chunk_bytes: int = HEAD_CHUNK_BYTES) -> int:
    return max(16, chunk_bytes // (4 * vocab_size))


def plain_linear_head(model: Any) -> nn.Linear | None:
    """The model's output head if logits are exactly `head(final hidden state)`, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_EXTRAS):
        return None
    return head


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        with_gradient: bool,
    ) -> torch.Tensor:
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # d loss_t / d hidden_t for a unit upstream gradient, one row per token; backward only scales it.
        unit_grad = torch.empty_like(hidden) if with_gradient else None
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            logits = F.linear(hidden[start:end], weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)
            losses[start:end] = lse - picked
            if unit_grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(probs.shape[0], device=probs.device), targets[start:end]] -= 1.0
                unit_grad[start:end] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(unit_grad)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("the chunked head is frozen: it gives no gradient to its weight or bias")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        (unit_grad,) = ctx.saved_tensors
        grad_hidden = (unit_grad.float() * grad_losses.float()[:, None]).to(unit_grad.dtype)
        return grad_hidden, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Per-token losses (fp32) of `hidden` [tokens, d] through `head` against `targets` [tokens].

    When a backward will follow, each chunk's gradient is computed in forward while its logits exist.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    chunk = chunk or chunk_tokens(head.out_features)
    with_gradient = torch.is_grad_enabled() and hidden.requires_grad
    return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, with_gradient)


@torch.no_grad()
def linear_cross_entropy_hits(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses (fp32, as `linear_cross_entropy` computes them) and whether the head's argmax is
    the target (bool), chunk by chunk: the eval forward gives token accuracy with no full-vocabulary
    logits tensor and no gradient."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    hits = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    chunk = chunk or chunk_tokens(head.out_features)
    for start in range(0, hidden.shape[0], chunk):
        end = start + chunk
        logits = F.linear(hidden[start:end], head.weight, head.bias).float()
        picked = logits.gather(1, targets[start:end, None]).squeeze(1)
        losses[start:end] = torch.logsumexp(logits, dim=-1) - picked
        hits[start:end] = logits.argmax(dim=-1) == targets[start:end]
    return losses, hits
