"""Lay one forward pass's documents out as rows: padding-free packing by default.

Each part (one adapter's micro-batch, or an eval request) owns a contiguous range of rows, so the LoRA
layers route by row ranges. A packing part puts its documents into rows one after the other with no padding
between them (next-fit, in the part's own order); position ids restart at 0 for every document, and
transformers turns such position ids into a block-diagonal causal mask, so attention never crosses a
document boundary and every document's logits are those of the document alone. A part that does not pack
puts one document per row, as a padded batch does.

All rows of a pass share one width. It is chosen from the documents by a cost model (padded tokens for
the linear layers, plus attention, which without a variable-length kernel costs width x width per row),
so short documents are not padded to the longest one of the pack. The order of an adapter's real tokens
is its documents' order whatever the width, so dropout masks drawn over real tokens (and so an adapter's
result) never depend on its neighbours.

Targets are shifted within each document (position t predicts token t+1 of the same document), so no
position predicts across a document boundary and padding never carries loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.data import IGNORE_INDEX, Example

Segment = tuple[str | None, int, int]
# Candidate row widths grow by this factor from the longest document up to the longest part.
WIDTH_STEP = 2**0.5


@dataclass(frozen=True)
class Part:
    """The documents of one adapter (or of the bare base: name None) in one forward pass."""

    name: str | None
    examples: Sequence[Example]
    packing: bool = True


@dataclass
class Batch:
    """Token tensors of one forward pass, [rows, width] each, and which rows belong to whom."""

    input_ids: torch.Tensor  # long
    targets: torch.Tensor  # long: the next token of the same document, IGNORE_INDEX where no loss
    valid: torch.Tensor  # bool: real tokens (not padding)
    position_ids: torch.Tensor | None  # long, restarting per document; None: 0..width-1 in every row
    attention_mask: torch.Tensor | None  # long padding mask (one document per row); None when packed
    segments: list[Segment]  # (name, first row, end row) per part, in order

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def real_tokens(self) -> int:
        return int(self.valid.sum())

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.input_ids),  # type: ignore[arg-type]
            move(self.targets),  # type: ignore[arg-type]
            move(self.valid),  # type: ignore[arg-type]
            move(self.position_ids),
            move(self.attention_mask),
            self.segments,
        )


def next_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Document indices per row, in order: a row is closed when the next document does not fit."""
    rows: list[list[int]] = []
    used = width
    for i, n in enumerate(lengths):
        if n > width:
            raise ValueError(f"a document of {n} tokens does not fit a row of {width}")
        if used + n > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def _row_count(lengths: Sequence[int], width: int, packing: bool) -> int:
    return len(next_fit(lengths, width)) if packing else len(lengths)


def choose_width(
    parts: Sequence[tuple[Sequence[int], bool]], attention_weight: float, max_width: int | None = None
) -> int:
    """The row width with the least estimated compute for these parts' document lengths.

    Cost of a width W: rows(W) * W * (1 + attention_weight * W), i.e. padded tokens through the linear
    layers plus attention over the whole row. `attention_weight` is the cost of one query-key pair
    relative to one token through the linears (0 with a variable-length attention kernel, whose cost does
    not depend on the row). Candidates run from the longest document up to the longest part, and no
    further than `max_width` (rows are never wider than the longest document or `max_width`).
    """
    longest = max((n for lengths, _ in parts for n in lengths), default=1)
    totals = [sum(lengths) for lengths, packing in parts if packing]
    top = max(totals, default=longest)
    if max_width is not None:
        top = max(longest, min(top, max_width))
        totals = [t for t in totals if t <= top]
    candidates = {longest, *(t for t in totals if t >= longest)}
    w = float(longest)
    while w < top:
        w *= WIDTH_STEP
        candidates.add(min(top, math.ceil(w)))

    def cost(width: int) -> float:
        rows = sum(_row_count(lengths, width, packing) for lengths, packing in parts)
        return rows * width * (1.0 + attention_weight * width)

    return min(sorted(candidates), key=cost)


def _shifted(example: Example) -> list[int]:
    return [*example.labels[1:], IGNORE_INDEX]


def build_batch(
    parts: Sequence[Part], pad_id: int, attention_weight: float = 0.0, max_width: int | None = None
) -> Batch:
    """Rows for `parts` (see the module docstring); a part with no examples gets an empty row range.

    Packed rows are at most `max_width` tokens wide (or the longest document, if that is longer).

    When no part packs, this is the classic padded batch: one document per row, right-padded to the
    longest, with a 2D padding mask and default position ids.
    """
    if not any(part.examples for part in parts):
        raise ValueError("build_batch needs at least one example")
    lengths = [[len(ex.input_ids) for ex in part.examples] for part in parts]
    packed = any(part.packing for part in parts)
    if packed:
        width = choose_width(
            [(ls, part.packing) for ls, part in zip(lengths, parts, strict=True)], attention_weight, max_width
        )
    else:
        width = max(n for ls in lengths for n in ls)
    ids: list[list[int]] = []
    targets: list[list[int]] = []
    positions: list[list[int]] = []
    used: list[int] = []
    segments: list[Segment] = []
    for part, part_lengths in zip(parts, lengths, strict=True):
        start = len(ids)
        rows = next_fit(part_lengths, width) if part.packing else [[i] for i in range(len(part_lengths))]
        for row in rows:
            row_ids: list[int] = []
            row_targets: list[int] = []
            row_positions: list[int] = []
            for i in row:
                example = part.examples[i]
                row_ids.extend(example.input_ids)
                row_targets.extend(_shifted(example))
                row_positions.extend(range(len(example.input_ids)))
            pad = width - len(row_ids)
            used.append(len(row_ids))
            ids.append(row_ids + [pad_id] * pad)
            targets.append(row_targets + [IGNORE_INDEX] * pad)
            positions.append(row_positions + list(range(pad)))  # padding restarts: a block of its own
        segments.append((part.name, start, len(ids)))
    input_ids = torch.tensor(ids, dtype=torch.long)
    valid = torch.arange(width).unsqueeze(0) < torch.tensor(used).unsqueeze(1)
    target_ids = torch.tensor(targets, dtype=torch.long)
    if packed:
        position_ids = torch.tensor(positions, dtype=torch.long)
        return Batch(input_ids, target_ids, valid, position_ids, None, segments)
    return Batch(input_ids, target_ids, valid, None, valid.long(), segments)


def attention_weight_of(config: object, varlen: bool) -> float:
    """Cost of one query-key pair relative to one token through a decoder layer's linears.

    Per token and layer the linears cost 2 x their weights in FLOPs (forward); a query-key pair costs
    4 x the attention width (scores and the weighted sum). With a variable-length attention kernel the
    cost does not depend on the row width at all, so the weight is 0 and the widest rows win.
    """
    if varlen:
        return 0.0
    hidden = int(config.hidden_size)  # type: ignore[attr-defined]
    heads = int(config.num_attention_heads)  # type: ignore[attr-defined]
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    d_attn = heads * head_dim
    weights = hidden * (2 * d_attn + 2 * kv_heads * head_dim) + 3 * hidden * inter
    return 4 * d_attn / (2 * weights)
