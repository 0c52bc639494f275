"""Try adapters: one frozen base in memory, adapters cached in RAM (LRU), switched per request.

Switching is free by construction: every cached adapter is attached to the same `MultiLoraModel`, and a
request only changes which row segment points at which adapter. Loading an adapter the first time reads
its PEFT files once; beyond `capacity` the least recently used one is detached. Requests for different
adapters are answered in one batched `generate` (`workers.evaluation.generation`), each row through its own
adapter. Each prompt is formatted as the adapter's training formatted prompts (the chat template for a
`messages` adapter; the record kind is in its `lorafleet.json`), unless the request asks for the raw
prompt.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from workers import storage
from workers.contract.plan import Device, DType, Quantization
from workers.engine.model import load_base
from workers.engine.multilora import MultiLoraModel
from workers.evaluation.generation import GenerationRequest, generate_greedy
from workers.training.checkpoint import ADAPTER_WEIGHTS, attach_frozen, read_adapter, read_meta
from workers.training.data import prompt_ids


class AdapterServer:
    def __init__(
        self,
        base_model: str,
        *,
        capacity: int = 8,
        tokenizer: str | None = None,
        quantization: Quantization = "none",
        dtype: DType = "float32",
        device: Device = "auto",
        home: Path | None = None,
    ) -> None:
        loaded = load_base(
            base_model, tokenizer=tokenizer, quantization=quantization, dtype=dtype, device=device, home=home
        )
        self.model = MultiLoraModel(loaded.model)
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._formats: dict[str, str | None] = {}  # slot -> the record kind it was trained on
        self._serial = 0

    def load(self, adapter_dir: str | Path) -> str:
        """Attach the adapter (once; later calls are a dictionary lookup) and return its slot name.
        `adapter_dir` is a directory or an object-store location; a rewritten adapter is loaded anew."""
        where = os.fspath(adapter_dir) if storage.is_remote(adapter_dir) else str(Path(adapter_dir).resolve())
        key = (where, storage.modified_ns(storage.join(where, ADAPTER_WEIGHTS)) or 0)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        files = read_adapter(where)
        self._serial += 1
        name = f"cached-{self._serial}"
        self._formats[name] = read_meta(where).get("data_format")
        attach_frozen(self.model, name, files)
        self._cache[key] = name
        while len(self._cache) > self.capacity:
            _, evicted = self._cache.popitem(last=False)
            self.model.remove_adapter(evicted)
            self._formats.pop(evicted, None)
        return name

    @property
    def cached(self) -> list[str]:
        return [path for path, _ in self._cache]

    def prompt_ids(self, adapter: str | Path | None, prompt: str, raw: bool = False) -> list[int]:
        """What the model is fed for `prompt` through `adapter` (None: the bare base, fed as `text`)."""
        kind = self._formats[self.load(adapter)] if adapter is not None else "text"
        return prompt_ids(prompt, kind, self.tokenizer, raw=raw)

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[tuple[str | Path | None, str]],
        max_new_tokens: int = 16,
        raw: bool = False,
    ) -> list[str]:
        """Greedy completions for (adapter dir or None for the bare base, prompt) pairs, in one batch;
        `raw` feeds the prompts as they are, without the adapters' training format."""
        slots = [self.load(adapter) if adapter is not None else None for adapter, _ in requests]
        rows = [
            GenerationRequest(slot, tuple(self.prompt_ids(adapter, prompt, raw)), max_new_tokens)
            for slot, (adapter, prompt) in zip(slots, requests, strict=True)
        ]
        return generate_greedy(self.model, self.tokenizer, rows, self.device)
