"""The built-in session losses, on per-token logprobs of the target tokens (Tinker's definitions).

Every loss is a sum over tokens, never a mean (a client that wants a mean puts 1/N in `weights`):

- `cross_entropy`: sum_t -weights_t * logp_t
- `importance_sampling` (REINFORCE with a correction for sampling from q, the sampler's policy):
  sum_t -(p_t / q_t) * A_t, where p_t / q_t = exp(logp_t - logq_t)
- `ppo`: sum_t -min(r_t * A_t, clip(r_t, low, high) * A_t) with r_t = p_t / q_t and `LossFnConfig`'s
  thresholds (Tinker's defaults: 0.8 and 1.2)

A custom loss (`SessionHost.forward_backward_custom`) is any differentiable function of the logprobs:
the host takes its gradient g = d loss / d logp and back-propagates `surrogate(logp, g)` = sum_t g_t logp_t,
whose gradient with respect to the weights is exactly the custom loss's. Over HTTP a client does the same
by sending `cross_entropy` with `weights` = -g.

Pure torch on flat [tokens] tensors, so they are checked against autograd on small tensors.
"""

from __future__ import annotations

import torch

from workers.contract.sessions import LossFn, LossFnConfig


def elementwise_loss(
    loss_fn: LossFn,
    logprobs: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    config: LossFnConfig | None = None,
) -> torch.Tensor:
    """Each token's loss (its sum is the call's loss); `inputs` holds `weights` (cross_entropy, absent:
    ones) or `logprobs` (the sampler's) and `advantages` (the RL losses), aligned with `logprobs`."""
    if loss_fn == "cross_entropy":
        weights = inputs.get("weights")
        return -logprobs if weights is None else -weights * logprobs
    ratio = torch.exp(logprobs - inputs["logprobs"])
    advantages = inputs["advantages"]
    if loss_fn == "importance_sampling":
        return -ratio * advantages
    if loss_fn == "ppo":
        config = config or LossFnConfig()
        clipped = torch.clamp(ratio, config.clip_low_threshold, config.clip_high_threshold)
        return -torch.minimum(ratio * advantages, clipped * advantages)
    raise ValueError(f"unknown `loss_fn` {loss_fn!r}; use cross_entropy, importance_sampling or ppo")


def surrogate(logprobs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to `logprobs` is `grad`: how a custom loss's gradient
    (computed on detached logprobs) is carried back through the model."""
    return (logprobs * grad.detach()).sum()
