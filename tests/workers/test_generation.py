"""Batched multi-adapter greedy generation answers every row as if it were generated alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.contract.plan import LoraConfig
from workers.engine.model import LoadedBase, load_base
from workers.engine.multilora import MultiLoraModel
from workers.evaluation.generation import GenerationRequest, generate_greedy, stop_token_ids


@pytest.fixture(scope="module")
def loaded(tiny_base: Path) -> LoadedBase:
    return load_base(str(tiny_base), device="cpu")  # fp32


@pytest.fixture(scope="module")
def model(loaded: LoadedBase) -> MultiLoraModel:
    """The tiny base with two adapters whose B is far from zero, so each answers differently."""
    model = MultiLoraModel(loaded.model)
    for seed, (name, targets) in enumerate([("a", ["q_proj", "v_proj"]), ("b", "all-linear")]):
        adapter = model.add_adapter(name, LoraConfig(r=4, alpha=8.0, target_modules=targets), seed=seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weights in adapter.modules.values():
                weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator))
    return model


def _requests(loaded: LoadedBase) -> list[GenerationRequest]:
    tok = loaded.tokenizer
    prompts = ["counting: one", "colors: red orange", "hi", "animals: cat dog bird fish horse"]
    ids = [(tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    routes = ["a", None, "b", "a", None, "b", "b", None]  # interleaved: grouping must restore the order
    budgets = [12, 5, 9, 12, 1, 12, 3, 12]
    return [
        GenerationRequest(route, ids[i % len(ids)], budget)
        for i, (route, budget) in enumerate(zip(routes, budgets, strict=True))
    ]


def test_a_batch_of_many_adapters_answers_as_each_prompt_alone(
    loaded: LoadedBase, model: MultiLoraModel
) -> None:
    requests = _requests(loaded)
    together = generate_greedy(model, loaded.tokenizer, requests, loaded.device)
    alone = [generate_greedy(model, loaded.tokenizer, [r], loaded.device)[0] for r in requests]
    assert together == alone
    assert len({together[0], together[1]}) == 2  # adapter and base differ: rows really are routed
    assert len(together[4]) <= len(together[1])  # a budget of one token: a prefix of the same answer
    small_chunks = generate_greedy(model, loaded.tokenizer, requests, loaded.device, tokens_per_chunk=40)
    assert small_chunks == together


def test_generation_ignores_the_checkpoints_own_generation_defaults(
    loaded: LoadedBase, model: MultiLoraModel
) -> None:
    requests = _requests(loaded)[:3]
    expected = generate_greedy(model, loaded.tokenizer, requests, loaded.device)
    config = model.base.generation_config
    saved = (config.do_sample, config.repetition_penalty)
    config.do_sample, config.repetition_penalty = True, 5.0  # as a checkpoint's generation_config.json may
    try:
        assert generate_greedy(model, loaded.tokenizer, requests, loaded.device) == expected
    finally:
        config.do_sample, config.repetition_penalty = saved
    assert model.base.generation_config is config


def test_answers_stop_at_eos_and_at_the_chat_end_of_turn(loaded: LoadedBase) -> None:
    tok = loaded.tokenizer
    assert stop_token_ids(tok, loaded.model) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
