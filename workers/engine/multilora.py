"""A frozen linear layer shared by K LoRA adapters, each owning a contiguous segment of the batch.

For the rows ``x[s:e]`` of adapter ``k`` (rank r_k, alpha_k, dropout p_k) the layer computes

    y[s:e] = W x[s:e] + (alpha_k / r_k) * B_k A_k dropout_k(x[s:e])

with the base product ``W x`` done once over all rows. A_k is Kaiming-uniform and B_k zero at creation (as
in PEFT), so a fresh adapter leaves the output unchanged. Rows whose segment has no adapter in this layer
(the adapter does not target it, or the row is base-only) get the base output alone.

Adapter weights live outside the module tree on purpose: slots come and go between steps (continuous
refill) without touching the other adapters' tensors, the base's `state_dict` stays the base's, and each
adapter's parameters are handed to its own optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from workers.contract.plan import LoraConfig
from workers.engine.adapters import Adapter, LoraKernel, LoraWeights, Routing, Segment, seeded_generator
from workers.engine.examples import IGNORE_INDEX
from workers.engine.grouped import GroupIndex, grouped_lora
from workers.engine.head import linear_cross_entropy, linear_cross_entropy_hits, plain_linear_head
from workers.engine.recompute import LayerCheckpointing

if TYPE_CHECKING:
    from workers.engine.layout import Batch


class MultiLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.adapters: dict[str, Adapter] = {}
        self.path = ""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        segments = self.routing.segments
        if not segments or not any(name in self.adapters for name, _, _ in segments):
            return out
        ranges = self.routing.token_ranges(x)
        taking = self._taking(ranges)
        if not taking:  # this layer's adapters have no tokens in this pass
            return out
        flat = x.reshape(-1, x.shape[-1])
        index = self.routing.group_index([(s, e) for _, s, e in taking], flat.shape[0], x.device)
        if self._use_grouped(x, taking, index):
            return out + self._grouped_delta(flat, taking, index).view(out.shape)
        # `split`, not one slice per segment: a slice's backward allocates a zero tensor the size of the
        # whole batch, which for K segments costs K full-size fills and adds per layer.
        chunks = flat.split([end - start for _, start, end in ranges])
        deltas = [
            self._segment_delta(chunk, name, start, end, out.dtype)
            for chunk, (name, start, end) in zip(chunks, ranges, strict=True)
        ]
        return out + torch.cat(deltas, dim=0).view(out.shape)

    def _taking(self, ranges: Sequence[Segment]) -> list[tuple[Adapter, int, int]]:
        """The non-empty token ranges whose adapter has weights in this layer, in order."""
        return [
            (self.adapters[name], start, end)
            for name, start, end in ranges
            if name is not None and name in self.adapters and end > start
        ]

    def _segment_delta(
        self, x: torch.Tensor, name: str | None, start: int, end: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """(alpha/r)·B·A·dropout(x) for one segment's tokens; the scaling is applied to the thin r-wide
        product."""
        adapter = self.adapters.get(name) if name is not None else None
        if adapter is None or end == start:
            return x.new_zeros((end - start, self.out_features), dtype=dtype)
        weights = adapter.modules[self.path]
        x = x.to(weights.lora_A.dtype)
        if self.routing.training and adapter.dropout > 0:
            x = x * self._keep_mask(adapter, start, end, x.device) * adapter.keep_scale(x.device)
        return ((x @ weights.lora_A.t()) * adapter.scaling @ weights.lora_B.t()).to(dtype)

    def _keep_mask(self, adapter: Adapter, start: int, end: int, device: torch.device) -> torch.Tensor:
        """[end - start, in] bool keep-mask for tokens start:end, drawn for real tokens only, so the RNG
        stream (and so the adapter's result) does not depend on how its tokens were laid out or padded."""
        n_tokens = end - start
        valid = self.routing.valid
        if valid is None or valid.numel() < end:
            return adapter.draw_keep(n_tokens, self.in_features, device)
        real = valid.reshape(-1)[start:end]
        keep = torch.zeros((n_tokens, self.in_features), dtype=torch.bool, device=device)
        keep[real] = adapter.draw_keep(int(real.sum()), self.in_features, device)
        return keep

    def _use_grouped(
        self, x: torch.Tensor, taking: list[tuple[Adapter, int, int]], index: GroupIndex
    ) -> bool:
        """Which kernel runs (`Routing.kernel`): forced, or for "auto" the grouped one wherever it wins.

        That is on CUDA with two segments or more (2K small matmul launches become two), and on CPU when
        the segments tile the batch in equal lengths, so the padded block is a view of the input. On CPU
        a ragged block costs more in copies than the loop's per-segment matmuls (see docs/architecture.md).
        """
        kernel = self.routing.kernel
        if kernel != "auto":
            return kernel == "grouped"
        if len(taking) < 2:
            return False
        return x.is_cuda or index.is_view

    def _grouped_delta(
        self, flat: torch.Tensor, taking: list[tuple[Adapter, int, int]], index: GroupIndex
    ) -> torch.Tensor:
        keep = keep_scale = None
        if self.routing.training and any(adapter.dropout > 0 for adapter, _, _ in taking):
            device = flat.device
            keep = torch.ones((index.k, index.max_len, self.in_features), dtype=torch.bool, device=device)
            one = torch.ones((), dtype=torch.float32, device=device)
            for k, (adapter, start, end) in enumerate(taking):  # in segment order, as the loop draws
                if adapter.dropout > 0:
                    keep[k, : end - start] = self._keep_mask(adapter, start, end, flat.device)
            keep_scale = torch.stack(
                [adapter.keep_scale(flat.device) if adapter.dropout > 0 else one for adapter, _, _ in taking]
            )
        weights = [adapter.modules[self.path] for adapter, _, _ in taking]
        return grouped_lora(
            flat,
            [w.lora_A for w in weights],
            [w.lora_B for w in weights],
            [adapter.scaling for adapter, _, _ in taking],
            index,
            keep,
            keep_scale,
        )


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear8bitLt and Linear4bit subclass nn.Linear, so this covers quantized bases too.
    return isinstance(module, nn.Linear)


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the linears LoRA can target; the output head is left out, as PEFT's 'all-linear' does."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, MultiLoraLinear)
        or (_is_linear(module) and module is not head and not name.endswith(".base_layer"))
    ]


def resolve_target_modules(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Module paths matched by `targets` (dotted-suffix match, as PEFT does), or a clear error."""
    linears = linear_module_names(model)
    if targets == "all-linear":
        return linears
    assert not isinstance(targets, str)
    matched = [p for p in linears if any(p == t or p.endswith("." + t) for t in targets)]
    missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in linears)]
    if missing:
        kinds = sorted({p.rsplit(".", 1)[-1] for p in linears})
        raise ValueError(
            f"`target_modules` {missing} match no linear module of this model; "
            f"its linear modules are {kinds} (or use 'all-linear')"
        )
    return matched


class MultiLoraModel(nn.Module):
    """A frozen causal LM whose targeted linears carry any number of named LoRA adapters."""

    def __init__(self, base: nn.Module, kernel: LoraKernel = "auto") -> None:
        super().__init__()
        self.base = base
        self.routing = Routing(kernel=kernel)
        self.adapters: dict[str, Adapter] = {}
        self._wrapped: dict[str, MultiLoraLinear] = {}
        self._checkpointing: LayerCheckpointing | None = None
        self.head_chunk: int | None = None  # tokens per head chunk; None: from the vocabulary size
        base.requires_grad_(False)
        base.eval()  # the base never trains: its own dropout stays off, LoRA dropout is ours

    # ---- adapters ----

    def add_adapter(
        self,
        name: str,
        lora: LoraConfig,
        *,
        seed: int,
        rank: int = 0,
        init: dict[str, LoraWeights] | None = None,
        init_name: str | None = None,
    ) -> Adapter:
        """Create (or load from `init`) an adapter with `lora`'s rank, alpha, dropout and targets; other
        adapters are not touched.

        Initial A depends on (seed, name, module) only, where `init_name`, if given, stands for the name
        (a training session seeds with a fixed one, so its start does not depend on its id); the dropout
        RNG also on the worker `rank`, so data parallel workers draw different masks for their different
        rows.
        """
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already attached")
        r = lora.r
        paths = resolve_target_modules(self.base, lora.target_modules)
        modules: dict[str, LoraWeights] = {}
        for path in paths:
            layer = self._wrap(path)
            base_weight = layer.base_layer.weight
            device = base_weight.device
            if init is not None:
                if path not in init:
                    raise ValueError(f"initial weights for adapter {name!r} lack module `{path}`")
                a = init[path].lora_A.detach().to(device=device, dtype=torch.float32).clone()
                b = init[path].lora_B.detach().to(device=device, dtype=torch.float32).clone()
                expected_a, expected_b = (r, layer.in_features), (layer.out_features, r)
                if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                    raise ValueError(
                        f"initial weights for `{path}` have shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                        f"expected {expected_a}/{expected_b} (rank {r})"
                    )
            else:
                a = torch.empty(r, layer.in_features, device=device, dtype=torch.float32)
                nn.init.kaiming_uniform_(
                    a, a=math.sqrt(5), generator=seeded_generator(device, seed, init_name or name, path)
                )
                b = torch.zeros(layer.out_features, r, device=device, dtype=torch.float32)
            modules[path] = LoraWeights(a.requires_grad_(True), b.requires_grad_(True))
        if init is not None and set(init) - set(paths):
            extra = sorted(set(init) - set(paths))[:3]
            raise ValueError(
                f"initial weights for adapter {name!r} target modules not selected here: {extra}"
            )
        device = next(iter(modules.values())).lora_A.device
        adapter = Adapter(
            name, lora, modules, seeded_generator(device, seed, init_name or name, "dropout", rank)
        )
        for path in paths:
            self._wrapped[path].adapters[name] = adapter
        self.adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        for path in adapter.modules:
            del self._wrapped[path].adapters[name]

    def _wrap(self, path: str) -> MultiLoraLinear:
        if path in self._wrapped:
            return self._wrapped[path]
        parent_path, _, attr = path.rpartition(".")
        parent = self.base.get_submodule(parent_path) if parent_path else self.base
        layer = MultiLoraLinear(getattr(parent, attr), self.routing)
        layer.path = path
        setattr(parent, attr, layer)
        self._wrapped[path] = layer
        return layer

    # ---- forward ----

    @contextmanager
    def routed(
        self,
        segments: list[Segment],
        training: bool,
        valid: torch.Tensor | None = None,
        by_token: bool = False,
    ) -> Iterator[None]:
        routing = self.routing
        routing.restore((segments, training, valid, by_token))
        try:
            yield
        finally:
            routing.restore(([], False, None, False))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        segments: list[tuple[str | None, int, int]],
        training: bool = False,
        position_ids: torch.Tensor | None = None,
        by_token: bool = False,
    ) -> torch.Tensor:
        """Full logits for rows routed to adapters; `segments` must cover the rows in order.

        Packed rows (a `workers.engine.layout.Batch`) pass `position_ids` restarting at 0 per document, no
        `attention_mask` (transformers then masks attention block-diagonally) and their token-range
        segments with `by_token=True`.
        """
        valid = attention_mask.bool() if attention_mask is not None else None
        with self.routed(segments, training, valid, by_token):
            return self.base(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits

    def set_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in backward (see `workers.engine.recompute`) from the next forward
        on."""
        if enabled and self._checkpointing is None:
            self._checkpointing = LayerCheckpointing(self.base, self.routing, self.adapters)
        if self._checkpointing is not None:
            self._checkpointing.enabled = enabled

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing is not None and self._checkpointing.enabled

    def segment_losses(self, batch: Batch, training: bool) -> torch.Tensor:
        """Summed next-token loss (fp32) per segment of `batch`; padding and non-targets add nothing.

        Only target positions reach the head, in chunks whose gradient is taken in forward
        (`workers.engine.head`), so no full-vocabulary logits tensor exists; heads that are more than a
        linear layer go the full way.
        """
        return self._segment_sums(batch, training, hits=False)[0]

    @torch.no_grad()
    def segment_eval(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss (fp32) and the number of target tokens the model's argmax predicts
        (token accuracy's numerator, as TRL reports it), per segment of `batch`; one eval forward, the
        head in chunks as in `segment_losses`."""
        sums, hits = self._segment_sums(batch, training=False, hits=True)
        assert hits is not None
        return sums, hits

    def target_logprobs(self, batch: Batch, training: bool) -> torch.Tensor:
        """log p(target) (fp32) of every target token of `batch`, in flattened order (part by part,
        document by document), differentiable; as `segment_losses`, with no full-vocabulary logits."""
        return -self._target_losses(batch, training, hits=False)[1]

    def _segment_sums(
        self, batch: Batch, training: bool, hits: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        where, losses, correct = self._target_losses(batch, training, hits)
        starts = torch.tensor([start for _, start, _ in batch.segments], device=where.device)
        owner = torch.searchsorted(starts, where, right=True) - 1  # the segment of each target token
        sums = losses.new_zeros(len(batch.segments)).index_add(0, owner, losses)
        if correct is None:
            return sums, None
        return sums, losses.new_zeros(len(batch.segments)).index_add(0, owner, correct.to(losses.dtype))

    def _target_losses(
        self, batch: Batch, training: bool, hits: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(flat positions of the target tokens, their losses, whether the argmax hit them if `hits`)."""
        flat_targets = batch.targets.reshape(-1)
        where = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        targets = flat_targets.index_select(0, where)
        correct: torch.Tensor | None = None
        with self.routed(batch.segments, training, batch.valid, by_token=True):
            inputs = {
                "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids,
                "use_cache": False,
            }
            head = plain_linear_head(self.base)
            if head is not None:
                hidden = self.base.get_decoder()(**inputs).last_hidden_state
                picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
                if hits:
                    losses, correct = linear_cross_entropy_hits(picked, head, targets, self.head_chunk)
                else:
                    losses = linear_cross_entropy(picked, head, targets, self.head_chunk)
            else:
                logits = self.base(**inputs).logits
                picked = logits.reshape(-1, logits.shape[-1]).index_select(0, where).float()
                losses = F.cross_entropy(picked, targets, reduction="none")
                if hits:
                    correct = picked.argmax(dim=-1) == targets
        return where, losses, correct

    def merge_adapter(self, name: str) -> None:
        """Fold W += (alpha/r)·B·A into the base linears in place (plain float bases only)."""
        adapter = self.adapters[name]
        with torch.no_grad():
            for path, weights in adapter.modules.items():
                base_weight = self._wrapped[path].base_layer.weight
                delta = (weights.lora_B @ weights.lora_A) * adapter.scaling
                base_weight += delta.to(base_weight.dtype)
