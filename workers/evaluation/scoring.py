"""Score generated answers against references: the built-in scorers and a user's `module:function`.

Every scorer is a pure function `(prediction, reference, config) -> float in [0, 1]`, so a metric is the
mean over records and the same answer always gets the same score, whoever else was in the pack. Word
overlap (token F1, ROUGE-L) comes from `rouge_score`, the reference implementation, rather than our own.

A user's scorer is the user's code: it may fail to import, raise, or return something that is not a score.
We never let that fail the adapter, which trained fine: that metric (for the adapter, the base and the
parent alike) is left out and the reason reported (`ScorerError`, then `EvalEvent.errors`). A server can
refuse user scorers altogether (`PackPlan.allow_user_scorers`), since they run arbitrary code.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.contract.plan import SCORERS, EvalConfig, scorer_metric

Scorer = Callable[[str, str, EvalConfig], float]
_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_FENCED = re.compile(r"\A```[A-Za-z0-9_-]*\s*\n(.*?)\n?```\Z", re.DOTALL)


class ScorerError(Exception):
    """A scorer could not give a score; the message names the scorer and says why."""


def normalize(text: str) -> str:
    """The comparison form of an answer: surrounding whitespace stripped, inner runs of whitespace made
    one space, case folded, and trailing punctuation (any Unicode punctuation: `.`, `!`, `。`...)
    removed. So "Paris." and " paris" match, "Paris, France" and "Paris" do not."""
    text = _WHITESPACE.sub(" ", text.strip()).casefold()
    end = len(text)
    while end and (unicodedata.category(text[end - 1]).startswith("P") or text[end - 1] == " "):
        end -= 1
    return text[:end]


def exact_match(prediction: str, reference: str, config: EvalConfig) -> float:
    """1 if both answers are equal after `normalize`."""
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str, config: EvalConfig) -> float:
    """1 if the normalised reference occurs in the normalised prediction (answers with extra words)."""
    return float(normalize(reference) in normalize(prediction))


def regex(prediction: str, reference: str, config: EvalConfig) -> float:
    """1 if `config.pattern` matches the whole stripped prediction (the reference is not used)."""
    if not config.pattern:
        raise ValueError("the `regex` scorer needs `eval.pattern`")
    return float(_compiled(config.pattern).fullmatch(prediction.strip()) is not None)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class _WordTokenizer:
    """Words for ROUGE: casefolded runs of Unicode word characters. rouge_score's default keeps only
    [a-z0-9], which would score any answer in Greek, Chinese or with accents as empty."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.casefold())


@functools.lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=_WordTokenizer())


def _rouge_f(prediction: str, reference: str, kind: str) -> float:
    words = _WordTokenizer()
    if not words.tokenize(prediction) and not words.tokenize(reference):
        return 1.0  # nothing was expected and nothing was said: a perfect answer, not a 0/0
    return float(_rouge().score(reference, prediction)[kind].fmeasure)


def token_f1(prediction: str, reference: str, config: EvalConfig) -> float:
    """F1 of the words both answers share, as a bag (ROUGE-1 F-measure); both empty: 1."""
    return _rouge_f(prediction, reference, "rouge1")


def rouge_l(prediction: str, reference: str, config: EvalConfig) -> float:
    """F-measure of the longest common word subsequence (ROUGE-L); both empty: 1."""
    return _rouge_f(prediction, reference, "rougeL")


def _json_of(prediction: str) -> tuple[bool, Any]:
    """(parsed, value) of the answer as JSON. One fenced block (```json ... ```) around it is removed
    first: chat models write JSON that way, and the fence is presentation, not content."""
    text = prediction.strip()
    fenced = _FENCED.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def json_valid(prediction: str, reference: str, config: EvalConfig) -> float:
    """1 if the answer is one JSON document."""
    return float(_json_of(prediction)[0])


def json_schema(prediction: str, reference: str, config: EvalConfig) -> float:
    """1 if the answer is JSON that `config.json_schema` accepts."""
    if config.json_schema is None:
        raise ValueError("the `json_schema` scorer needs `eval.json_schema`")
    parsed, value = _json_of(prediction)
    return float(parsed and _validator(json.dumps(config.json_schema, sort_keys=True)).is_valid(value))


@functools.lru_cache(maxsize=16)
def _validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)


BUILTIN: dict[str, Scorer] = {
    "exact_match": exact_match,
    "contains": contains,
    "regex": regex,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "json_valid": json_valid,
    "json_schema": json_schema,
}
assert tuple(BUILTIN) == SCORERS, "every scorer the contract names is implemented here"


@functools.lru_cache(maxsize=64)
def user_scorer(spec: str) -> Callable[[str, str], Any]:
    """The function a `module:function` names, imported once per process."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything on import
        why = f"{type(exc).__name__}: {exc}"
        raise ScorerError(f"scorer {spec!r}: cannot import {module_name!r}: {why}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ScorerError(f"scorer {spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def _checked(spec: str, value: Any, record: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScorerError(
            f"scorer {spec!r} returned {type(value).__name__} {str(value)[:60]!r} for eval record {record}; "
            "it must return a number in [0, 1]"
        )
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ScorerError(
            f"scorer {spec!r} returned {value!r} for eval record {record}; it must be in [0, 1]"
        )
    return float(value)


@dataclass
class Scores:
    """Per metric: the score of each record; and the metrics that could not be computed, with why."""

    per_record: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + m: sum(v) / len(v) for m, v in self.per_record.items() if v}


def score(
    config: EvalConfig,
    predictions: Sequence[str],
    references: Sequence[str],
    allow_user_scorers: bool = True,
) -> Scores:
    """Every scorer of `config` on every (prediction, reference) pair, keyed by metric (`eval_<scorer>`).

    A user scorer that cannot be imported, raises, or returns anything but a number in [0, 1] on any
    record gives no metric at all (a mean over the records it happened to accept would mislead), and
    its reason goes in `Scores.errors`; so does one refused by `allow_user_scorers`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = Scores()
    for spec in config.scorers:
        metric = scorer_metric(spec)
        builtin = BUILTIN.get(spec)
        if builtin is not None:
            pairs = zip(predictions, references, strict=True)
            scores.per_record[metric] = [builtin(p, r, config) for p, r in pairs]
            continue
        if not allow_user_scorers:
            scores.errors[metric] = f"scorer {spec!r}: user scorers are not allowed on this server"
            continue
        try:
            function = user_scorer(spec)
            values = []
            for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
                try:
                    value = function(p, r)
                except Exception as exc:  # the user's code may raise anything
                    why = f"{type(exc).__name__}: {exc}"
                    raise ScorerError(f"scorer {spec!r} failed on eval record {i}: {why}") from exc
                values.append(_checked(spec, value, i))
            scores.per_record[metric] = values
        except ScorerError as exc:
            scores.errors[metric] = str(exc)[:1000]
    return scores
