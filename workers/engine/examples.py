"""A tokenized document, the unit the engine lays out: token ids and, aligned with them, the labels.

Its own module so that the engine (layout, LoRA layers) needs nothing from the data loader: the loader
makes `Example`s, the engine consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # a label that carries no loss (prompt tokens, padding), as torch's cross-entropy skips


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ")

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss; position 0 never does, since logits[t-1] predicts labels[t]."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)
