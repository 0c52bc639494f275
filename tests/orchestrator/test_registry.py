"""The promotion gate as a pure function: every policy field, with the reason it gives."""

from __future__ import annotations

import math

from orchestrator.registry import decide
from orchestrator.spec import PromotionPolicy


def test_max_and_min_bound_the_metric() -> None:
    policy = PromotionPolicy(metric="eval_loss", max=2.0, min=0.1)
    assert decide(policy, {"eval_loss": 1.5}, None, has_parent=False).passed
    high = decide(policy, {"eval_loss": 2.5}, None, has_parent=False)
    assert not high.passed and high.reason == "eval_loss 2.5000 > max 2.0" and high.value == 2.5
    low = decide(policy, {"eval_loss": 0.05}, None, has_parent=False)
    assert not low.passed and "< min 0.1" in low.reason


def test_no_metric_is_a_rejection_that_says_how_to_fix_it() -> None:
    decision = decide(PromotionPolicy(max=2.0), {}, None, has_parent=False)
    assert not decision.passed and "eval_path" in decision.reason
    assert not decide(PromotionPolicy(), {"eval_loss": math.nan}, None, has_parent=False).passed


def test_better_than_parent_compares_on_the_same_eval_data() -> None:
    policy = PromotionPolicy(better_than_parent=True)
    assert decide(policy, {"eval_loss": 1.0}, 1.2, has_parent=True).passed
    worse = decide(policy, {"eval_loss": 1.3}, 1.2, has_parent=True)
    assert not worse.passed and "does not beat the parent's eval_loss 1.2000" in worse.reason
    assert not decide(policy, {"eval_loss": 1.0}, None, has_parent=True).passed  # parent never measured
    assert decide(policy, {"eval_loss": 1.0}, None, has_parent=False).passed  # a root has no parent to beat


def test_a_child_must_beat_its_parent_unless_the_policy_says_otherwise() -> None:
    default = PromotionPolicy()  # no condition written: a child is still compared with its parent
    worse = decide(default, {"eval_loss": 1.3}, 1.2, has_parent=True)
    assert not worse.passed
    assert (
        worse.reason == "eval_loss 1.3000 does not beat the parent's eval_loss 1.2000 on the same eval data"
    )
    better = decide(default, {"eval_loss": 1.1}, 1.2, has_parent=True)
    assert better.passed and better.reason == "eval_loss 1.1000 beats the parent's 1.2000"
    unmeasured = decide(default, {"eval_loss": 1.1}, None, has_parent=True)
    assert not unmeasured.passed and "better_than_parent: false" in unmeasured.reason
    assert decide(default, {"eval_loss": 1.3}, None, has_parent=False).reason == "no gate conditions set"
    opted_out = PromotionPolicy(better_than_parent=False)
    assert decide(opted_out, {"eval_loss": 1.3}, 1.2, has_parent=True).passed


def test_perplexity_gate_converts_the_parent_loss() -> None:
    policy = PromotionPolicy(metric="perplexity", better_than_parent=True)
    assert decide(policy, {"perplexity": math.exp(0.9)}, 1.0, has_parent=True).passed
    assert not decide(policy, {"perplexity": math.exp(1.1)}, 1.0, has_parent=True).passed
