"""The live progress line of `submit --wait` / `status --wait` names the loss it shows."""

from __future__ import annotations

from orchestrator.cli.commands import progress_info
from orchestrator.spec.views import Score


def test_the_progress_line_says_train_loss_while_training_and_eval_loss_once_evaluated() -> None:
    assert progress_info("queued", None, None) == "queued"
    assert progress_info("training", 2.5, None) == "training · train loss 2.500"
    assert progress_info("training", 2.5, 2.75) == "training · train loss 2.500"  # a mid-run eval
    assert progress_info("evaluated", 2.5, 2.75) == "evaluated · eval loss 2.750"
    assert progress_info("promoted", 2.5, 2.75) == "promoted · eval loss 2.750"
    assert progress_info("trained", 2.5, None) == "trained · train loss 2.500"  # no eval data
    assert progress_info("failed", None, None) == "failed"


def test_the_progress_line_adds_the_main_task_score_once_judged() -> None:
    score = Score(metric="eval_exact_match", value=0.92, base=0.05, base_lift=0.87)
    assert progress_info("evaluated", 2.5, 2.75, score) == (
        "evaluated · eval loss 2.750 · exact_match 0.92 (base 0.05, +0.87)"
    )
