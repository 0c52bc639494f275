"""What one adapter owns (its A/B per linear, its dropout generator) and how a batch is routed to adapters.

Apart from the layers (`workers.engine.multilora`) so that per-layer recompute (`workers.engine.recompute`)
can restore a pass's routing and rewind each adapter's dropout without importing the layers back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch

from workers.contract.plan import LoraConfig
from workers.engine.grouped import GroupIndex

LoraKernel = Literal["auto", "loop", "grouped"]


def seeded_generator(device: torch.device, *parts: object) -> torch.Generator:
    """A generator whose seed depends only on `parts`, so results never depend on pack neighbours."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


@dataclass
class LoraWeights:
    """One adapter's A and B for one linear (PEFT shapes: A is [r, in], B is [out, r])."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor


@dataclass
class Adapter:
    """Everything one adapter owns across the model: its config (the spec's own `LoraConfig`, so rank,
    alpha and dropout are never copied out of it), its weights per module path and its dropout RNG."""

    name: str
    lora: LoraConfig
    modules: dict[str, LoraWeights]
    dropout_generator: torch.Generator

    @property
    def scaling(self) -> float:
        return self.lora.scaling

    @property
    def dropout(self) -> float:
        return self.lora.dropout

    def parameters(self) -> list[torch.Tensor]:
        return [t for w in self.modules.values() for t in (w.lora_A, w.lora_B)]

    def draw_keep(self, n_tokens: int, features: int, device: torch.device) -> torch.Tensor:
        """A [n_tokens, features] bool dropout keep-mask from this adapter's own generator.

        Both kernels draw through here, in segment order, so they consume the stream identically.
        """
        drawn = torch.empty((n_tokens, features), dtype=torch.float32, device=device)
        return drawn.bernoulli_(1.0 - self.dropout, generator=self.dropout_generator).bool()

    def keep_scale(self, device: torch.device) -> torch.Tensor:
        return torch.ones((), dtype=torch.float32, device=device) / (1.0 - self.dropout)


Segment = tuple[str | None, int, int]
RoutingState = tuple[list[Segment], bool, torch.Tensor | None, bool]


@dataclass
class Routing:
    """Which part of the batch belongs to which adapter for the current forward; shared by every layer.

    `segments` cover the batch in order, as row ranges (`by_token` False: a plain padded batch, and
    generation, where the sequence length changes between calls) or as ranges of the flattened
    [rows x width] tokens (`by_token` True: packed rows, where documents of several adapters may share a
    row). `valid` marks real tokens (not padding): dropout masks are drawn for those only.
    """

    segments: list[Segment] = field(default_factory=list)
    training: bool = False
    kernel: LoraKernel = "auto"
    valid: torch.Tensor | None = None  # [rows, seq] bool: real tokens, not padding
    by_token: bool = False
    _indices: dict[tuple[object, ...], GroupIndex] = field(default_factory=dict)

    def snapshot(self) -> RoutingState:
        return self.segments, self.training, self.valid, self.by_token

    def restore(self, state: RoutingState) -> None:
        self.segments, self.training, self.valid, self.by_token = state
        self._indices = {}

    def token_ranges(self, x: torch.Tensor) -> list[Segment]:
        """`segments` as ranges of x's flattened tokens (x: [rows, seq, features] or [tokens, features])."""
        if self.by_token:
            return self.segments
        per_row = x.shape[1] if x.dim() == 3 else 1
        return [(name, start * per_row, end * per_row) for name, start, end in self.segments]

    def group_index(self, ranges: list[tuple[int, int]], n_tokens: int, device: torch.device) -> GroupIndex:
        """The grouped kernel's index for these token ranges, built once per forward and shared."""
        key = (tuple(ranges), n_tokens, device)
        if key not in self._indices:
            self._indices[key] = GroupIndex.build(ranges, n_tokens, device)
        return self._indices[key]
