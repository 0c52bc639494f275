"""One grouped LoRA product for all of a layer's adapters: mixed ranks, mixed segment lengths, dropout.

For K segments (adapter k owns tokens [s_k, e_k) of the flattened batch) the layer needs

    delta[s_k:e_k] = scaling_k * (x[s_k:e_k] * keep_k) @ A_k^T @ B_k^T

A Python loop runs 2K small matmuls per layer (and 4K more in backward). Here the segments are laid into
one zero-padded [K, L_max, in] block and A, B are zero-padded to the largest rank, so the whole layer is
two `bmm` calls forward and four backward. Padding is exact: padded token slots are zero, so they add
nothing to any product or gradient, and padded rank rows of A / columns of B are zero and are not
parameters (the padded stacks are built from the real A, B each step, and gradients flow back through
the stacking only to the real entries).

The block is a transient: backward keeps only the layer input `x` (in its own dtype, usually shared with
the base layer), the small [K, L_max, r] intermediate, the dropout keep-mask (bool) if any, and rebuilds
the block from `x`. When the segments tile the batch in equal lengths, the block is a view of `x`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class GroupIndex:
    """Where each participating token sits in the padded [K * L_max] block.

    `src`: token indices (into the flattened batch) of the participating tokens, in order, or None when
    they are all the tokens in order. `dest`: their slots in the block, or None when the block is exactly
    the batch (equal contiguous segments covering it).
    """

    k: int
    max_len: int
    n_tokens: int
    src: torch.Tensor | None
    dest: torch.Tensor | None

    @property
    def is_view(self) -> bool:
        """The block is the batch itself (no copy): equal contiguous segments covering every token."""
        return self.src is None and self.dest is None

    @classmethod
    def build(cls, ranges: list[tuple[int, int]], n_tokens: int, device: torch.device) -> GroupIndex:
        lengths = [end - start for start, end in ranges]
        k, max_len = len(ranges), max(lengths)
        contiguous = all(a[1] == b[0] for a, b in pairwise(ranges))
        covers = contiguous and ranges[0][0] == 0 and ranges[-1][1] == n_tokens
        src = None if covers else torch.cat([torch.arange(s, e) for s, e in ranges]).to(device)
        if covers and len(set(lengths)) == 1:
            return cls(k, max_len, n_tokens, None, None)
        dest = torch.cat([torch.arange(n) + i * max_len for i, n in enumerate(lengths)]).to(device)
        return cls(k, max_len, n_tokens, src, dest)

    def to_block(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n_tokens, f] -> [K, L_max, f] (fp32), zero in padded slots."""
        picked = tokens if self.src is None else tokens.index_select(0, self.src)
        if self.dest is None:
            return picked.float().view(self.k, self.max_len, -1)
        block = picked.new_zeros((self.k * self.max_len, picked.shape[-1]), dtype=torch.float32)
        return block.index_copy_(0, self.dest, picked.float()).view(self.k, self.max_len, -1)

    def from_block(self, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[K, L_max, f] -> [n_tokens, f] in `dtype`, zero for tokens outside every segment."""
        flat = block.reshape(self.k * self.max_len, -1)
        picked = flat if self.dest is None else flat.index_select(0, self.dest)
        picked = picked.to(dtype)
        if self.src is None:
            return picked
        out = picked.new_zeros((self.n_tokens, picked.shape[-1]))
        return out.index_copy_(0, self.src, picked)


class _GroupedLora(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: torch.Tensor,
        index: GroupIndex,
        keep: torch.Tensor | None,
        keep_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        xk = _masked_block(x, index, keep, keep_scale)
        h = torch.bmm(xk, a.transpose(1, 2)) * scaling.view(-1, 1, 1)
        y = torch.bmm(h, b.transpose(1, 2))
        ctx.save_for_backward(x, a, b, scaling, h, keep, keep_scale)
        ctx.index = index
        return index.from_block(y, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, a, b, scaling, h, keep, keep_scale = ctx.saved_tensors
        index: GroupIndex = ctx.index
        gk = index.to_block(grad)
        grad_b = torch.bmm(gk.transpose(1, 2), h)
        gh = torch.bmm(gk, b) * scaling.view(-1, 1, 1)
        del gk
        xk = _masked_block(x, index, keep, keep_scale)
        grad_a = torch.bmm(gh.transpose(1, 2), xk)
        del xk
        grad_x = None
        if ctx.needs_input_grad[0]:
            gx = torch.bmm(gh, a)
            if keep is not None:
                gx = gx.mul_(keep).mul_(keep_scale.view(-1, 1, 1))
            grad_x = index.from_block(gx, x.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None


def _masked_block(
    x: torch.Tensor, index: GroupIndex, keep: torch.Tensor | None, keep_scale: torch.Tensor | None
) -> torch.Tensor:
    xk = index.to_block(x)
    if keep is None:
        return xk
    if index.dest is None and xk.data_ptr() == x.data_ptr():
        xk = xk.clone()  # a view of x: never scale the layer input in place
    return xk.mul_(keep).mul_(keep_scale.view(-1, 1, 1))


def grouped_lora(
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scalings: list[float],
    index: GroupIndex,
    keep: torch.Tensor | None = None,
    keep_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA deltas of all segments at once, [n_tokens, out] in x's dtype (see the module docstring).

    `x` is [n_tokens, in]; `lora_a[k]` is [r_k, in], `lora_b[k]` is [out, r_k] (fp32); `keep`, if given,
    is the [K, L_max, in] bool dropout keep-mask and `keep_scale` [K] its 1 / (1 - p) per segment.
    """
    r_max = max(t.shape[0] for t in lora_a)
    a = torch.stack([F.pad(t, (0, 0, 0, r_max - t.shape[0])) for t in lora_a])
    b = torch.stack([F.pad(t, (0, r_max - t.shape[1])) for t in lora_b])
    scaling = torch.tensor(scalings, dtype=torch.float32, device=a.device)
    return _GroupedLora.apply(x, a, b, scaling, index, keep, keep_scale)
