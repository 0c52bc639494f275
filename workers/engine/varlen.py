"""Variable-length attention without flash-attn: each packed document attends only to itself.

transformers' SDPA path handles packed rows (position ids restarting per document) with a block-diagonal
mask over the whole row, so a row of W tokens costs W x W attention however short its documents are, and
the layout (`workers.engine.layout`) must then trade padding (narrow rows) against attention (wide rows). Here
the attention of a row is computed document by document (`F.scaled_dot_product_attention`, causal, on
each document's own queries and keys), which is what flash-attn's varlen kernel does on CUDA: attention
costs the sum of each document's length squared, so the whole step can be one row with no padding.

It is registered with transformers as the attention implementation `lorafleet_varlen` (and a mask
function that builds no mask for it). Anything it is not made for falls back to transformers' SDPA:
a padding mask (left-padded generation), or queries shorter than keys (decoding with a cache).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch.nn import functional as F

NAME = "lorafleet_varlen"


_last_bounds: tuple[torch.Tensor, list[list[int]]] | None = None


def _bounds_of(position_ids: torch.Tensor) -> list[list[int]]:
    """`document_bounds`, once per forward pass: every layer (and its recompute) gets the same tensor."""
    global _last_bounds
    if _last_bounds is None or _last_bounds[0] is not position_ids:
        _last_bounds = (position_ids, document_bounds(position_ids))
    return _last_bounds[1]


def document_bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the offsets where documents start (position id 0), plus the row's end."""
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    starts = (rows == 0).nonzero().tolist()  # a host sync: once per forward pass (`_bounds_of`)
    width = rows.shape[-1]
    bounds: list[list[int]] = [[] for _ in range(rows.shape[0])]
    for row, column in starts:
        bounds[row].append(column)
    for row in bounds:
        if not row or row[0] != 0:
            row.insert(0, 0)
        row.append(width)
    return bounds


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q [B, H, S, D], k/v [B, KV, S, D] -> [B, S, H, D]."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or query.shape[2] != key.shape[2] or position_ids is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    rows = []
    bounds_per_row = _bounds_of(position_ids)
    if len(bounds_per_row) == 1 < query.shape[0]:  # one row of positions shared by every row
        bounds_per_row = bounds_per_row * query.shape[0]
    for b, bounds in enumerate(bounds_per_row):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, start:end],
                key[b : b + 1, :, start:end],
                value[b : b + 1, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
            )
            for start, end in itertools.pairwise(bounds)
            if end > start
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask for packed or plain causal rows; transformers' SDPA mask when there is padding."""
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None or bool(attention_mask.all()):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Give a loaded base variable-length attention for training: flash-attn's when it runs on it,
    else ours. False (the model keeps transformers' SDPA with a block-diagonal mask) for a model that
    does not take a pluggable attention function."""
    config = model.config  # type: ignore[attr-defined]
    if getattr(config, "_attn_implementation", None) in FLASH:
        return True
    try:
        model.set_attn_implementation(register())  # type: ignore[operator]
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return config._attn_implementation == NAME


def register() -> str:
    """Make `lorafleet_varlen` known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
