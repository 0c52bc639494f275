"""The output head and the cross-entropy in chunks of tokens, recomputed in backward.

Full-vocabulary logits for every token of a pack are the largest tensor of a step at real vocab sizes
(e.g. 8 adapters x 4 rows x 256 tokens x 49,152 words x 4 bytes = 1.6 GB, and as much again for their
gradient). We only ever need a loss per target token and the gradient of the hidden state, so:

- only target tokens go through the head (prompt and padding positions get no logits at all);
- they go through it `chunk` tokens at a time, and a chunk's logits exist in fp32 only while that chunk
  is processed;
- backward recomputes each chunk's logits (one extra head matmul) instead of keeping them.

The loss is the standard one: logsumexp(logits) - logits[target], in fp32 (logits are computed in the
head's dtype, as `F.linear` would, then upcast). Its gradient is softmax(logits) - onehot(target).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from workers.memory import HEAD_CHUNK_BYTES  # fp32 logits per chunk; the memory model counts the same

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
    ) -> torch.Tensor:
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            logits = F.linear(hidden[start:end], weight, bias).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)
            losses[start:end] = lse[start:end] - picked
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("the chunked head is frozen: it gives no gradient to its weight or bias")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_hidden = torch.empty_like(hidden)
        grad_losses = grad_losses.float()
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            probs = F.linear(hidden[start:end], weight, bias).float()
            probs.sub_(lse[start:end, None]).exp_()  # softmax
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, targets[start:end]] -= 1.0
            probs.mul_(grad_losses[start:end, None])
            grad_hidden[start:end] = probs.to(weight.dtype) @ weight
        return grad_hidden, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Per-token losses (fp32) of `hidden` [tokens, d] through `head` against `targets` [tokens]."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    chunk = chunk or chunk_tokens(head.out_features)
    return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)
