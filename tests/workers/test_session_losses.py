"""The session losses against their hand-written formulas and autograd (gradient checks in float64)."""

from __future__ import annotations

import torch

from workers.contract.sessions import LossFnConfig
from workers.sessions.losses import elementwise_loss, surrogate


def _tensors(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    inputs = {
        "weights": torch.rand(n, generator=g, dtype=torch.float64),
        "logprobs": logprobs + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5),  # ratios 0.6..1.6
        "advantages": torch.randn(n, generator=g, dtype=torch.float64),
    }
    return logprobs.requires_grad_(True), inputs


def test_cross_entropy_is_the_weighted_sum_of_negative_logprobs() -> None:
    lp, inputs = _tensors()
    loss = elementwise_loss("cross_entropy", lp, inputs).sum()
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.allclose(loss, -(inputs["weights"] * lp).sum())
    assert torch.allclose(grad, -inputs["weights"])
    assert torch.allclose(elementwise_loss("cross_entropy", lp, {}), -lp)  # no weights: all ones


def test_importance_sampling_gradient_is_minus_ratio_times_advantage() -> None:
    lp, inputs = _tensors()
    loss = elementwise_loss("importance_sampling", lp, inputs).sum()
    (grad,) = torch.autograd.grad(loss, lp)
    ratio = torch.exp(lp.detach() - inputs["logprobs"])
    assert torch.allclose(loss, -(ratio * inputs["advantages"]).sum())
    assert torch.allclose(grad, -ratio * inputs["advantages"])


def test_ppo_clips_the_ratio_where_the_clipped_objective_is_smaller() -> None:
    lp, inputs = _tensors(n=64)
    config = LossFnConfig(clip_low_threshold=0.9, clip_high_threshold=1.1)
    losses = elementwise_loss("ppo", lp, inputs, config)
    (grad,) = torch.autograd.grad(losses.sum(), lp)
    ratio = torch.exp(lp.detach() - inputs["logprobs"]).tolist()
    for t, (r, a) in enumerate(zip(ratio, inputs["advantages"].tolist(), strict=True)):
        clipped = min(max(r, 0.9), 1.1)
        assert abs(float(losses[t].detach()) - (-min(r * a, clipped * a))) < 1e-12
        # the gradient flows only where the unclipped term is the minimum (the ratio is inside the
        # clip range, or outside it on the side that makes the objective worse)
        expected = -r * a if r * a <= clipped * a else 0.0
        assert abs(float(grad[t]) - expected) < 1e-12
    assert 0 < sum(1 for g in grad.tolist() if g == 0.0) < 64  # both cases occur


def test_every_loss_passes_a_gradient_check() -> None:
    lp, inputs = _tensors(n=6)
    for loss_fn in ("cross_entropy", "importance_sampling", "ppo"):
        assert torch.autograd.gradcheck(lambda x, f=loss_fn: elementwise_loss(f, x, inputs), (lp,))


def test_the_surrogate_carries_a_custom_losss_gradient() -> None:
    lp, _ = _tensors()

    def custom(x: torch.Tensor) -> torch.Tensor:
        return torch.var(x) + (x**2).sum()

    leaf = lp.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(custom(leaf), leaf)
    (direct,) = torch.autograd.grad(custom(lp), lp)
    (through,) = torch.autograd.grad(surrogate(lp, g), lp)
    assert torch.allclose(through, direct)
