"""Greedy and sampled generation for rows of many adapters (and the bare base) in one batch over the
shared base.

Serving (`workers.serving`) and the final eval (`workers.training.trainer`) both ask the same question: "what
does each of these adapters answer to this prompt?". One `generate` answers all of them: every row goes
through its own adapter by row segment (`MultiLoraModel.routed`), so the base's weights are read once per
token for the whole batch however many adapters it holds. Rows are left-padded, so new tokens line up at
the right edge, and each row stops on its own at EOS or the chat template's end-of-turn token.

A row's answer must not depend on its neighbours (an eval score never depends on what else shared the
pack): decoding is greedy under a fresh `GenerationConfig` (a checkpoint's sampling or repetition-penalty
defaults do not apply), padding is masked, and each row's text is cut at its own `max_new_tokens` and
first stop token; generating longer for a neighbour's sake only adds tokens past that cut.

Training sessions (`workers.sessions`) sample: `generate_sampled` keeps the same batching and draws each
row's next token in a logits processor, from that row's own seeded generator with its own temperature,
top-k and top-p, and hands the greedy search a score that picks it; a stopping criterion ends each row at
its own stop tokens or texts. So a row's samples depend on its seed, prompt and adapter only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.engine.adapters import Segment, seeded_generator
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


def _left_padded(
    chunk: list[int], requests: Sequence[GenerationRequest | SampleRequest], pad: int
) -> tuple[torch.Tensor, torch.Tensor, list[Segment]]:
    """Left-padded prompts of `chunk`'s requests, their padding mask and one row segment per route."""
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
    return input_ids, attention_mask, segments


def _route_order(requests: Sequence[GenerationRequest | SampleRequest]) -> list[int]:
    """Request indices grouped by route (one segment per adapter), the bare base first."""
    for request in requests:
        if not request.prompt_ids:
            raise ValueError("a generation request needs at least one prompt token")
    routes = [(request.route is not None, request.route or "") for request in requests]
    return sorted(range(len(requests)), key=routes.__getitem__)


def _run_generate(
    model: MultiLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    segments: list[Segment],
    config: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """`generate` through the routed adapters, with none of the checkpoint's generation defaults."""
    from transformers import GenerationConfig

    defaults = model.base.generation_config
    model.base.generation_config = GenerationConfig()  # fill unset fields with the library's defaults
    try:
        with model.routed(segments, training=False):
            return model.base.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs
            )
    finally:
        model.base.generation_config = defaults


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
    order = _route_order(requests)
    stops = stop_token_ids(tokenizer, model.base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    answers = [""] * len(requests)
    for chunk in _chunks(order, requests, tokens_per_chunk):
        input_ids, attention_mask, segments = _left_padded(chunk, requests, pad)
        width = input_ids.shape[1]
        config = GenerationConfig(
            max_new_tokens=max(requests[i].max_new_tokens for i in chunk),
            do_sample=False,
            eos_token_id=stops or None,
            pad_token_id=pad,
        )
        out = _run_generate(model, input_ids.to(device), attention_mask.to(device), segments, config)
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()[: requests[i].max_new_tokens]
            end = next((k for k, t in enumerate(new) if t in stops), len(new))
            answers[i] = tokenizer.decode(new[:end], skip_special_tokens=True)
    return answers


@dataclass(frozen=True)
class SampleRequest:
    """One sampled row (training sessions' `sample`): the route and prompt as in `GenerationRequest`, the
    sampling parameters, and the seed of this row's own generator. `stop`: token ids that end the row
    (kept as its last token); None: the tokenizer's stop tokens (`stop_token_ids`)."""

    route: str | None
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    seed: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()  # texts that end the row (with `stop` (), they replace the defaults)


@dataclass(frozen=True)
class Sampled:
    tokens: list[int]
    logprobs: list[float]  # log-softmax(logits / temperature) of each token, before top-k / top-p
    stop_reason: str  # "stop" or "length"


def _filtered(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`scaled` logits with everything outside the top-k tokens and the top-p nucleus at -inf."""
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if top_p < 1.0:
        ordered, index = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p  # keep the smallest set reaching top_p
        scaled = scaled.clone()
        scaled[index[drop]] = -math.inf
    return scaled


class _RowSampler:
    """A logits processor that draws each row's next token with that row's own generator and parameters
    (so a row's samples depend on its seed, prompt and weights only, never on its neighbours) and hands
    `generate` a one-hot score that its greedy search then picks."""

    def __init__(self, rows: list[SampleRequest], device: torch.device) -> None:
        self.rows = rows
        self.generators = [seeded_generator(device, "sample", row.seed) for row in rows]
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.logprobs: list[list[float]] = [[] for _ in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, -math.inf)
        for r, row in enumerate(self.rows):
            logits = scores[r].float()
            if row.temperature == 0.0:
                token = int(logits.argmax())
                logp = torch.log_softmax(logits, dim=-1)[token]
            else:
                scaled = logits / row.temperature
                probs = torch.softmax(_filtered(scaled, row.top_k, row.top_p), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=self.generators[r]))
                logp = torch.log_softmax(scaled, dim=-1)[token]
            out[r, token] = 0.0
            self.tokens[r].append(token)
            self.logprobs[r].append(float(logp))
        return out


def _stop_end(tokens: list[int], ids: set[int], texts: tuple[str, ...], tokenizer: Any) -> int | None:
    """How many of `tokens` a row keeps when it stopped: through its first stop token, or through the
    token that completes a stop text; None if it never stopped."""
    by_id = next((k + 1 for k, t in enumerate(tokens) if t in ids), None)
    if texts and any(text in tokenizer.decode(tokens) for text in texts):
        by_text = next(
            k
            for k in range(1, len(tokens) + 1)
            if any(text in tokenizer.decode(tokens[:k]) for text in texts)
        )
        return by_text if by_id is None else min(by_id, by_text)
    return by_id


class _RowStops:
    """Per-row stopping for `generate`: a row is done at its own stop token or text, or its own budget."""

    def __init__(
        self, rows: list[SampleRequest], stops: list[set[int]], sampler: _RowSampler, tokenizer: Any
    ) -> None:
        self.rows, self.stops, self.sampler, self.tokenizer = rows, stops, sampler, tokenizer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = []
        for r, row in enumerate(self.rows):
            tokens = self.sampler.tokens[r]
            done.append(
                len(tokens) >= row.max_new_tokens
                or (bool(tokens) and tokens[-1] in self.stops[r])
                or any(text in self.tokenizer.decode(tokens) for text in row.stop_strings)
            )
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_sampled(
    model: MultiLoraModel,
    tokenizer: Any,
    requests: Sequence[SampleRequest],
    device: torch.device,
    tokens_per_chunk: int = GENERATION_TOKENS_PER_CHUNK,
) -> list[Sampled]:
    """Sampled continuations of each request, in order, batched over the shared base as
    `generate_greedy` is: temperature, top-k, top-p and a seeded generator per row, each row cut at its
    own stop token (included) or budget."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    if not requests:
        return []
    order = _route_order(requests)
    default_stops = stop_token_ids(tokenizer, model.base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[Sampled | None] = [None] * len(requests)
    for chunk in _chunks(order, requests, tokens_per_chunk):
        rows = [requests[i] for i in chunk]
        stops = [set(default_stops if row.stop is None else row.stop) for row in rows]
        input_ids, attention_mask, segments = _left_padded(chunk, requests, pad)
        sampler = _RowSampler(rows, device)
        row_stops = _RowStops(rows, stops, sampler, tokenizer)
        config = GenerationConfig(
            max_new_tokens=max(row.max_new_tokens for row in rows), do_sample=False, pad_token_id=pad
        )
        _run_generate(
            model,
            input_ids.to(device),
            attention_mask.to(device),
            segments,
            config,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([row_stops]),
        )
        for r, (i, row) in enumerate(zip(chunk, rows, strict=True)):
            tokens = sampler.tokens[r][: row.max_new_tokens]
            end = _stop_end(tokens, stops[r], row.stop_strings, tokenizer)
            cut = end if end is not None else len(tokens)
            results[i] = Sampled(
                tokens[:cut], sampler.logprobs[r][:cut], "stop" if end is not None else "length"
            )
    return [result for result in results if result is not None]
