"""Activation checkpointing per decoder layer that keeps every adapter's result exact.

With it on, a decoder layer keeps only its input for backward and is run again when backward reaches it,
so a pack holds one layer's activations at a time instead of all of them (about a third more compute).

Two things a plain `torch.utils.checkpoint` would get wrong here, both restored around the recompute:

- **Routing.** Which rows go through which adapter is set on the shared `Routing` only while the forward
  runs; backward runs after it has been cleared.
- **Dropout streams.** Each adapter draws its LoRA dropout masks from its own generator (not the global
  RNG that checkpoint preserves). The recompute must draw the same masks, and must not advance the
  streams: so each generator is rewound to where it stood when the layer first ran, and put back after.

We wrap each layer's `forward` on the instance rather than use transformers' gradient checkpointing,
which only acts in training mode, while our frozen base stays in eval mode (its own dropout off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from workers.engine.adapters import Adapter, Routing


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's stack of layers: the ModuleList with `num_hidden_layers` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} (a ModuleList of {count} layers); "
        "use activation_checkpointing: off"
    )


class LayerCheckpointing:
    """Installs the wrapper on every decoder layer; `enabled` switches it per forward."""

    def __init__(self, model: nn.Module, routing: Routing, adapters: dict[str, Adapter]) -> None:
        self.routing = routing
        self.adapters = adapters
        self.enabled = False
        for layer in decoder_layers(model):
            layer.forward = self._wrap(layer.forward)

    def _wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            if not (self.enabled and torch.is_grad_enabled()):
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, context_fn=self._contexts, **kwargs)

        return checkpointed

    def _generators(self) -> dict[str, torch.Generator]:
        names = {name for name, start, end in self.routing.segments if name is not None and end > start}
        return {
            name: self.adapters[name].dropout_generator
            for name in sorted(names)
            if name in self.adapters and self.adapters[name].dropout > 0
        }

    def _contexts(self) -> tuple[Any, Any]:
        first: dict[str, Any] = {}

        @contextmanager
        def forward_pass() -> Iterator[None]:
            first["routing"] = self.routing.snapshot()
            first["rng"] = {name: g.get_state() for name, g in self._generators().items()}
            yield

        @contextmanager
        def recompute() -> Iterator[None]:
            now_routing = self.routing.snapshot()
            self.routing.restore(first["routing"])
            generators = self._generators()
            now_rng = {name: g.get_state() for name, g in generators.items()}
            for name, g in generators.items():
                g.set_state(first["rng"][name])
            try:
                yield
            finally:
                for name, g in generators.items():
                    g.set_state(now_rng[name])
                self.routing.restore(now_routing)

        return forward_pass(), recompute()
