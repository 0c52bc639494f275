"""Greedy generation for rows of many adapters (and the bare base) in one batch over the shared base.

Serving (`workers.serving`) and the final eval (`workers.training.trainer`) both ask the same question: "what
does each of these adapters answer to this prompt?". One `generate` answers all of them: every row goes
through its own adapter by row segment (`MultiLoraModel.routed`), so the base's weights are read once per
token for the whole batch however many adapters it holds. Rows are left-padded, so new tokens line up at
the right edge, and each row stops on its own at EOS or the chat template's end-of-turn token.

A row's answer must not depend on its neighbours (an eval score never depends on what else shared the
pack): decoding is greedy under a fresh `GenerationConfig` (a checkpoint's sampling or repetition-penalty
defaults do not apply), padding is masked, and each row's text is cut at its own `max_new_tokens` and
first stop token; generating longer for a neighbour's sake only adds tokens past that cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.engine.adapters import Segment
from workers.engine.multilora import MultiLoraModel

# rows x (longest prompt + new tokens) per `generate` call: bounds the KV cache and the activations.
GENERATION_TOKENS_PER_CHUNK = 16_384


@dataclass(frozen=True)
class GenerationRequest:
    """One row: the adapter to route it through (an attached adapter's name; None: the bare base), the
    prompt's token ids (already formatted, e.g. `workers.training.data.prompt_ids`) and its token budget."""

    route: str | None
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The tokens that end an answer: EOS (the tokenizer's and the checkpoint's generation config's) and
    the token that closes an assistant turn in the chat template (e.g. `<|im_end|>`, `<|end|>`), found by
    rendering a short conversation: a chat model ends its turn with it, not always with EOS."""
    stops: list[int] = []

    def add(ids: Any) -> None:
        for i in ids if isinstance(ids, (list, tuple)) else [ids]:
            if isinstance(i, int) and i not in stops:
                stops.append(i)

    add(tokenizer.eos_token_id)
    config = getattr(model, "generation_config", None)
    if config is not None:
        add(config.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": "a"}]
        try:
            asked = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
            answered = tokenizer.apply_chat_template(
                [*user, {"role": "assistant", "content": "b"}], tokenize=True
            )
        except Exception:  # a template that cannot render this has no end-of-turn to find
            return stops
        asked, answered = _ids(asked), _ids(answered)
        special = set(tokenizer.all_special_ids)
        if answered[: len(asked)] == asked:
            add(next((t for t in answered[len(asked) :] if t in special), None))
    return stops


def _ids(rendered: Any) -> list[int]:
    """Token ids of `apply_chat_template(tokenize=True)`, a list or (newer transformers) a mapping."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def _chunks(order: list[int], requests: Sequence[GenerationRequest], budget: int) -> list[list[int]]:
    """Consecutive runs of `order` whose padded size (rows x (longest prompt + largest budget)) stays
    within `budget`; a row larger than that alone gets a run of its own."""
    chunks: list[list[int]] = []
    width = new = 0
    for i in order:
        request = requests[i]
        w, n = max(width, len(request.prompt_ids)), max(new, request.max_new_tokens)
        if chunks and (len(chunks[-1]) + 1) * (w + n) <= budget:
            chunks[-1].append(i)
            width, new = w, n
        else:
            chunks.append([i])
            width, new = len(request.prompt_ids), request.max_new_tokens
    return chunks


@torch.no_grad()
def generate_greedy(
    model: MultiLoraModel,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    device: torch.device,
    tokens_per_chunk: int = GENERATION_TOKENS_PER_CHUNK,
) -> list[str]:
    """The greedy answer (decoded, special tokens dropped) to each request, in order. Rows are grouped
    by adapter (one segment each) and generated `tokens_per_chunk` padded tokens at a time."""
    from transformers import GenerationConfig

    if not requests:
        return []
    for request in requests:
        if not request.prompt_ids:
            raise ValueError("a generation request needs at least one prompt token")
    stops = stop_token_ids(tokenizer, model.base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    routes = [(request.route is not None, request.route or "") for request in requests]
    order = sorted(range(len(requests)), key=routes.__getitem__)  # one segment per adapter
    answers = [""] * len(requests)
    for chunk in _chunks(order, requests, tokens_per_chunk):
        width = max(len(requests[i].prompt_ids) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        segments: list[Segment] = []
        for row, i in enumerate(chunk):
            ids = requests[i].prompt_ids
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
            route = requests[i].route
            if segments and segments[-1][0] == route:
                segments[-1] = (route, segments[-1][1], row + 1)
            else:
                segments.append((route, row, row + 1))
        config = GenerationConfig(
            max_new_tokens=max(requests[i].max_new_tokens for i in chunk),
            do_sample=False,
            eos_token_id=stops or None,
            pad_token_id=pad,
        )
        defaults = model.base.generation_config
        model.base.generation_config = GenerationConfig()  # fill unset fields with the library's defaults
        try:
            with model.routed(segments, training=False):
                out = model.base.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                )
        finally:
            model.base.generation_config = defaults
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()[: requests[i].max_new_tokens]
            end = next((k for k, t in enumerate(new) if t in stops), len(new))
            answers[i] = tokenizer.decode(new[:end], skip_special_tokens=True)
    return answers
