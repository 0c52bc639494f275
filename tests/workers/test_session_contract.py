"""The session contract refuses malformed requests with errors that name the datum and the field."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from workers.contract.sessions import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    LossFnInputs,
    SamplingParams,
    check_data,
)


def _datum(n: int = 4, **inputs: list[float]) -> dict:
    return {"model_input": list(range(1, n + 1)), "loss_fn_inputs": {"target_tokens": [2] * n, **inputs}}


def test_a_per_token_array_of_the_wrong_length_names_datum_and_field() -> None:
    with pytest.raises(ValidationError) as info:
        ForwardBackwardInput(data=[_datum(), _datum(weights=[1.0, 1.0])])
    text = str(info.value)
    assert "data.1" in text and "loss_fn_inputs.weights" in text and "has 2 values" in text


def test_nan_advantages_name_the_datum_and_the_position() -> None:
    with pytest.raises(ValidationError) as info:
        ForwardBackwardInput(
            data=[_datum(logprobs=[-1.0] * 4, advantages=[0.0, math.nan, 0.0, 0.0])], loss_fn="ppo"
        )
    text = str(info.value)
    assert "data.0.loss_fn_inputs.advantages" in text and "`advantages[1]` is nan" in text


def test_an_rl_loss_without_its_inputs_says_which() -> None:
    with pytest.raises(ValueError, match=r"data\[1\]\.loss_fn_inputs\.logprobs` is missing"):
        ForwardBackwardInput(
            data=[_datum(logprobs=[0.0] * 4, advantages=[1.0] * 4), _datum(advantages=[1.0] * 4)],
            loss_fn="importance_sampling",
        )


def test_negative_tokens_unknown_fields_and_empty_inputs_are_refused() -> None:
    with pytest.raises(ValidationError, match="model_input"):
        Datum(model_input=[1, -2], loss_fn_inputs=LossFnInputs(target_tokens=[1, 2]))
    with pytest.raises(ValidationError, match="extra"):
        Datum(model_input=[1], loss_fn_inputs={"target_tokens": [1], "weight": [1.0]})
    with pytest.raises(ValidationError, match="model_input"):
        Datum(model_input=[], loss_fn_inputs={"target_tokens": []})
    with pytest.raises(ValidationError, match="top_k"):
        SamplingParams(top_k=0)
    with pytest.raises(ValidationError, match="learning_rate"):
        AdamParams(learning_rate=0)


def test_check_data_knows_the_vocabulary_and_the_pass_budget() -> None:
    data = [Datum(**_datum()), Datum(model_input=[1, 2, 600], loss_fn_inputs={"target_tokens": [1, 2, 3]})]
    with pytest.raises(ValueError, match=r"`data\[1\]\.model_input` holds token id 600.*0\.\.511"):
        check_data(data, vocab_size=512)
    with pytest.raises(ValueError, match=r"`data\[0\]\.model_input` has 4 tokens, more than one pass"):
        check_data(data[:1], vocab_size=512, max_tokens=4)
    check_data(data[:1], vocab_size=512, max_tokens=5)


def test_a_stop_is_token_ids_or_texts() -> None:
    assert SamplingParams(stop="</s>").stop == ["</s>"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(stop=[3, 4]).stop == [3, 4]
    with pytest.raises(ValidationError, match="stop"):
        SamplingParams(stop=[3, "a"])


def test_from_sequence_shifts_by_one() -> None:
    datum = Datum.from_sequence([5, 6, 7, 8], weights=[0.0, 1.0, 1.0])
    assert datum.model_input == [5, 6, 7]
    assert datum.loss_fn_inputs.target_tokens == [6, 7, 8]
