"""The promotion gate as a pure function: every policy field, every kind of metric, with the reason it
gives; and once through a store, on the metrics a final eval recorded."""

from __future__ import annotations

import math

import pytest

from orchestrator.registry.promotion import decide
from orchestrator.spec.job import PromotionPolicy

SCORES = {"eval_exact_match": 0.92, "base_eval_exact_match": 0.05, "eval_loss": 1.1}
CHILD = {**SCORES, "parent_eval_exact_match": 0.80, "parent_eval_loss": 1.2}

# (policy, metrics, has_parent, passed, reason: the whole of it, or a part of it after `...`)
GATES = [
    # bounds, lower is better (a loss)
    (PromotionPolicy(metric="eval_loss", max=2.0, min=0.1), {"eval_loss": 1.5}, False, True, None),
    (PromotionPolicy(max=2.0), {"eval_loss": 2.5}, False, False, "eval_loss 2.5000 > max 2.0"),
    (PromotionPolicy(min=0.1), {"eval_loss": 0.05}, False, False, "eval_loss 0.0500 < min 0.1"),
    # bounds, higher is better (a task score): the README's example
    (
        PromotionPolicy(metric="eval_exact_match", min=0.8, better_than_parent=True),
        SCORES,
        False,
        True,
        "eval_exact_match 0.9200 >= min 0.8",
    ),
    (
        PromotionPolicy(metric="eval_exact_match", min=0.95),
        SCORES,
        False,
        False,
        "eval_exact_match 0.9200 < min 0.95",
    ),
    (
        PromotionPolicy(metric="eval_token_accuracy", max=0.5),
        {"eval_token_accuracy": 0.7},
        False,
        False,
        "eval_token_accuracy 0.7000 > max 0.5",
    ),
    # the parent, on the same records: a score must be higher, a loss lower
    (
        PromotionPolicy(metric="eval_exact_match", min=0.8, better_than_parent=True),
        CHILD,
        True,
        True,
        "eval_exact_match 0.9200 >= min 0.8; eval_exact_match 0.9200 beats the parent's 0.8000",
    ),
    (
        PromotionPolicy(metric="eval_exact_match"),
        {**CHILD, "parent_eval_exact_match": 0.95},
        True,
        False,
        "eval_exact_match 0.9200 does not beat the parent's eval_exact_match 0.9500 on the same eval data",
    ),
    (
        PromotionPolicy(metric="eval_exact_match"),
        {**CHILD, "parent_eval_exact_match": 0.92},
        True,
        False,
        "...does not beat the parent's eval_exact_match 0.9200",
    ),
    (PromotionPolicy(), CHILD, True, True, "eval_loss 1.1000 beats the parent's 1.2000"),
    (
        PromotionPolicy(),
        {"eval_loss": 1.3, "parent_eval_loss": 1.2},
        True,
        False,
        "eval_loss 1.3000 does not beat the parent's eval_loss 1.2000 on the same eval data",
    ),
    (
        PromotionPolicy(metric="perplexity"),
        {"perplexity": math.exp(0.9), "parent_eval_loss": 1.0},
        True,
        True,
        None,
    ),
    (
        PromotionPolicy(metric="perplexity"),
        {"perplexity": math.exp(1.1), "parent_eval_loss": 1.0},
        True,
        False,
        None,
    ),
    # unset `better_than_parent` still compares a child; `false` opts out; a root has no parent
    (
        PromotionPolicy(better_than_parent=False),
        {"eval_loss": 1.3, "parent_eval_loss": 1.2},
        True,
        True,
        None,
    ),
    (PromotionPolicy(), {"eval_loss": 1.3}, False, True, "no gate conditions set"),
    (
        PromotionPolicy(metric="eval_exact_match"),
        SCORES,
        True,
        False,
        "the parent's eval_exact_match was not measured on this adapter's eval data; set "
        "`promotion.better_than_parent: false` to promote without comparing",
    ),
    (PromotionPolicy(), {"eval_loss": 1.0, "parent_eval_loss": math.nan}, True, False, "...was not measured"),
    # nothing recorded: a rejection that says how to fix it
    (PromotionPolicy(max=2.0), {}, False, False, "...`data.eval_path`"),
    (PromotionPolicy(), {"eval_loss": math.nan}, False, False, "...`data.eval_path`"),
    (PromotionPolicy(metric="eval_token_f1"), SCORES, False, False, "...`eval.max_examples` above 0"),
]


@pytest.mark.parametrize(("policy", "metrics", "has_parent", "passed", "reason"), GATES)
def test_the_gate_judges_any_recorded_metric_in_its_direction(
    policy: PromotionPolicy, metrics: dict[str, float], has_parent: bool, passed: bool, reason: str | None
) -> None:
    decision = decide(policy, metrics, has_parent)
    assert decision.passed is passed and decision.metric == policy.metric
    assert decision.value == (
        metrics.get(policy.metric) if math.isfinite(metrics.get(policy.metric, math.nan)) else None
    )
    if reason is not None and reason.startswith("..."):
        assert reason[3:] in decision.reason
    elif reason is not None:
        assert decision.reason == reason
