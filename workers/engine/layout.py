"""Lay one forward pass's documents out as rows: padding-free packing by default.

The parts of a pass (each adapter's micro-batch, or an eval request) are laid out one after the other as
a stream of documents cut into rows of one width. A packing part's documents follow each other with no
padding between them (next-fit, in the part's own order: a row is closed when the next document does not
fit), and documents of the next part continue in the same row, so a row may hold several adapters'
documents. Position ids restart at 0 for every document, and transformers turns such position ids into a
block-diagonal causal mask, so attention never crosses a document boundary and every document's logits
are those of the document alone. A part that does not pack puts each document in a row of its own.

Each part owns one contiguous range of the flattened [rows x width] tokens (the LoRA layers route by
token ranges), from its first document up to the next part's first document: the padding at the end of
a row goes to the part before it.

The width is chosen from the documents by a cost model: padded tokens through the linear layers, plus
attention, which without a variable-length kernel costs width x width per row. The order of an adapter's
real tokens is its documents' order whatever the width and whoever shares its rows, so dropout masks drawn
over real tokens (and so an adapter's result) never depend on its neighbours.

Targets are shifted within each document (position t predicts token t+1 of the same document), so no
position predicts across a document boundary and padding never carries loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.engine.examples import IGNORE_INDEX, Example

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
    """Token tensors of one forward pass, [rows, width] each, and which tokens belong to whom."""

    input_ids: torch.Tensor  # long
    targets: torch.Tensor  # long: the next token of the same document, IGNORE_INDEX where no loss
    valid: torch.Tensor  # bool: real tokens (not padding)
    position_ids: torch.Tensor | None  # long, restarting per document; None: 0..width-1 in every row
    attention_mask: torch.Tensor | None  # long padding mask (one document per row); None when packed
    segments: list[Segment]  # (name, start, end) per part, in order: ranges of the flattened tokens

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


def lay_out(parts: Sequence[tuple[Sequence[int], bool]], width: int) -> list[list[tuple[int, int]]]:
    """Rows of (part, document) indices, in stream order, for parts given as (lengths, packing)."""
    rows: list[list[tuple[int, int]]] = []
    used = width
    for p, (lengths, packing) in enumerate(parts):
        for d, n in enumerate(lengths):
            if n > width:
                raise ValueError(f"a document of {n} tokens does not fit a row of {width}")
            if not packing or used + n > width:
                rows.append([])
                used = 0
            rows[-1].append((p, d))
            used = used + n if packing else width  # an unpacked document keeps its row to itself
    return rows


def next_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """One packing part's document indices per row."""
    return [[d for _, d in row] for row in lay_out([(lengths, True)], width)]


def choose_width(
    parts: Sequence[tuple[Sequence[int], bool]], attention_weight: float, max_width: int | None = None
) -> int:
    """The row width with the least estimated compute for these parts' document lengths.

    Cost of a width W: rows(W) * W * (1 + attention_weight * W), i.e. padded tokens through the linear
    layers plus attention over the whole row. `attention_weight` is the cost of one query-key pair
    relative to one token through the linears (0 with a variable-length attention kernel, whose cost does
    not depend on the row). Candidates run from the longest document up to all documents in one row
    (or `max_width`, if given and longer than the longest document).
    """
    longest = max((n for lengths, _ in parts for n in lengths), default=1)
    if not any(packing for _, packing in parts):
        return longest
    top = sum(n for lengths, _ in parts for n in lengths)
    if max_width is not None:
        top = max(longest, min(top, max_width))
    candidates = {longest, top}
    w = float(longest)
    while w < top:
        w *= WIDTH_STEP
        candidates.add(min(top, math.ceil(w)))

    def cost(width: int) -> float:
        return len(lay_out(parts, width)) * width * (1.0 + attention_weight * width)

    return min(sorted(candidates), key=cost)


def _shifted(example: Example) -> list[int]:
    return [*example.labels[1:], IGNORE_INDEX]


def build_batch(
    parts: Sequence[Part], pad_id: int, attention_weight: float = 0.0, max_width: int | None = None
) -> Batch:
    """Rows for `parts` (see the module docstring); a part with no examples gets an empty token range.

    When no part packs, this is the classic padded batch: one document per row, right-padded to the
    longest, with a 2D padding mask and default position ids.
    """
    if not any(part.examples for part in parts):
        raise ValueError("build_batch needs at least one example")
    shapes = [([len(ex.input_ids) for ex in part.examples], part.packing) for part in parts]
    packed = any(part.packing for part in parts)
    width = choose_width(shapes, attention_weight, max_width)
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    real: list[bool] = []
    first: dict[int, int] = {}  # part -> flat position of its first document
    for row in lay_out(shapes, width):
        for p, d in row:
            example = parts[p].examples[d]
            first.setdefault(p, len(ids))
            ids.extend(example.input_ids)
            targets.extend(_shifted(example))
            positions.extend(range(len(example.input_ids)))
            real.extend([True] * len(example.input_ids))
        pad = width - len(ids) % width if len(ids) % width else 0
        ids.extend([pad_id] * pad)
        targets.extend([IGNORE_INDEX] * pad)
        positions.extend(range(pad))  # padding restarts: a block of its own
        real.extend([False] * pad)
    total = len(ids)
    bounds = [0] * (len(parts) + 1)
    bounds[-1] = total
    for p in range(len(parts) - 1, 0, -1):
        bounds[p] = first.get(p, bounds[p + 1])
    segments = [(part.name, bounds[p], bounds[p + 1]) for p, part in enumerate(parts)]
    shape = (total // width, width)
    input_ids = torch.tensor(ids, dtype=torch.long).view(shape)
    target_ids = torch.tensor(targets, dtype=torch.long).view(shape)
    valid = torch.tensor(real, dtype=torch.bool).view(shape)
    if packed:
        position_ids = torch.tensor(positions, dtype=torch.long).view(shape)
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
