"""Scorers of generated answers: what each built-in counts as right, settings checked at submit, and a
user's scorer that fails or is refused leaves its metric out with the reason instead of failing."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from workers.contract.plan import SCORERS, EvalConfig, scorer_metric
from workers.evaluation.scoring import BUILTIN, normalize, score

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CONFIG = EvalConfig(scorers=list(SCORERS), pattern=r"\d{3}-\d{4}", json_schema=SCHEMA)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("  Paris. ", "paris"),
        ("New\n  York!!", "new york"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),  # casefold, not lower
        ("東京。", "東京"),  # Unicode punctuation
        ("Paris, France", "paris, france"),  # only trailing punctuation goes
        ("...", ""),
    ],
)
def test_normalize(text: str, normal: str) -> None:
    assert normalize(text) == normal


@pytest.mark.parametrize(
    ("scorer", "prediction", "reference", "expected"),
    [
        ("exact_match", " Paris.", "paris", 1.0),
        ("exact_match", "Paris, France", "Paris", 0.0),
        ("exact_match", "", "", 1.0),
        ("contains", "The capital is Paris.", "paris", 1.0),
        ("contains", "The capital is Lyon.", "Paris", 0.0),
        ("regex", " 555-1234\n", "", 1.0),  # the stripped answer, matched whole
        ("regex", "call 555-1234", "", 0.0),
        ("token_f1", "the cat sat", "the cat sat", 1.0),
        ("token_f1", "sat the cat", "the cat sat", 1.0),  # a bag of words
        ("token_f1", "the cat", "the cat sat down", 2 * (1.0 * 0.5) / 1.5),
        ("token_f1", "", "", 1.0),
        ("token_f1", "", "something", 0.0),
        ("token_f1", "Café crème", "café CRÈME", 1.0),  # accented words count as words
        ("rouge_l", "sat the cat", "the cat sat", 2 * (2 / 3) * (2 / 3) / (4 / 3)),  # order matters
        ("rouge_l", "", "", 1.0),
        ("json_valid", '{"a": [1, 2]}', "", 1.0),
        ("json_valid", '```json\n{"a": 1}\n```', "", 1.0),  # a chat model's fence
        ("json_valid", "{'a': 1}", "", 0.0),
        ("json_valid", "", "", 0.0),
        ("json_schema", '{"city": "Paris"}', "", 1.0),
        ("json_schema", '{"town": "Paris"}', "", 0.0),
        ("json_schema", '{"city": 3}', "", 0.0),
        ("json_schema", "Paris", "", 0.0),
    ],
)
def test_builtin_scorers(scorer: str, prediction: str, reference: str, expected: float) -> None:
    assert BUILTIN[scorer](prediction, reference, CONFIG) == pytest.approx(expected)


def test_score_reports_each_scorer_as_its_metric_with_per_record_values() -> None:
    scores = score(CONFIG, [" Paris.", "Lyon"], ["paris", "Paris"])
    assert list(scores.per_record) == [scorer_metric(s) for s in SCORERS]
    assert scores.per_record["eval_exact_match"] == [1.0, 0.0]
    assert scores.means("base_")["base_eval_exact_match"] == 0.5
    assert not scores.errors


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"scorers": ["regex"]}, "needs `eval.pattern`"),
        ({"scorers": ["regex"], "pattern": "(unclosed"}, "not a valid regular expression"),
        ({"scorers": ["json_schema"]}, "needs `eval.json_schema`"),
        ({"scorers": ["json_schema"], "json_schema": {"type": "no-such-type"}}, "not a valid JSON Schema"),
        ({"scorers": ["bleu"]}, "unknown scorer 'bleu'"),
        ({"scorers": ["a:f", "b:f"]}, "same metric name"),
    ],
)
def test_a_scorer_without_a_valid_setting_is_refused_at_submit(settings: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle.replace("(", r"\(")):
        EvalConfig(**settings)


# ---- user scorers, imported by `module:function` from here ----


def first_word(prediction: str, reference: str) -> float:
    """A user scorer: 1 if the first words agree."""
    return float(prediction.split()[:1] == reference.split()[:1])


def raises(prediction: str, reference: str) -> float:
    raise RuntimeError("boom")


def returns_text(prediction: str, reference: str) -> Any:
    return "good"


def returns_nan(prediction: str, reference: str) -> float:
    return math.nan


def returns_two(prediction: str, reference: str) -> float:
    return 2.0


HERE = __name__


def test_a_user_scorer_is_called_with_prediction_and_reference() -> None:
    config = EvalConfig(scorers=["exact_match", f"{HERE}:first_word"])
    scores = score(config, ["red car", "blue car"], ["red bus", "red bus"])
    assert scores.per_record["eval_first_word"] == [1.0, 0.0]
    assert scores.per_record["eval_exact_match"] == [0.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (f"{HERE}:raises", "failed on eval record 0: RuntimeError: boom"),
        (f"{HERE}:returns_text", "returned str 'good' for eval record 0; it must return a number"),
        (f"{HERE}:returns_nan", "returned nan for eval record 0; it must be in [0, 1]"),
        (f"{HERE}:returns_two", "returned 2.0 for eval record 0; it must be in [0, 1]"),
        (f"{HERE}:missing", "has no function 'missing'"),
        ("no_such_module_here:f", "cannot import 'no_such_module_here': ModuleNotFoundError"),
    ],
)
def test_a_failing_user_scorer_leaves_its_metric_out_with_the_reason(spec: str, needle: str) -> None:
    config = EvalConfig(scorers=["exact_match", spec])
    scores = score(config, ["a"], ["a"])
    metric = scorer_metric(spec)
    assert metric not in scores.per_record
    assert scores.per_record["eval_exact_match"] == [1.0]  # the built-ins still count
    assert spec in scores.errors[metric] and needle in scores.errors[metric]


def test_a_server_that_refuses_user_scorers_never_imports_them() -> None:
    config = EvalConfig(scorers=["exact_match", "no_such_module_here:f"])
    scores = score(config, ["a"], ["a"], allow_user_scorers=False)
    assert scores.errors == {
        "eval_f": "scorer 'no_such_module_here:f': user scorers are not allowed on this server"
    }
    assert list(scores.per_record) == ["eval_exact_match"]
