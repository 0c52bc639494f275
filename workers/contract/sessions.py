"""The plain contract of interactive training sessions (Tinker-style): what a client sends and gets back.

A session is a live LoRA adapter held by a worker (`workers.sessions.host.SessionHost`). Its primitives
follow Thinking Machines' Tinker API closely, so a Tinker training loop ports with little change:

- `Datum`: one sequence. `model_input` holds its N input tokens; `loss_fn_inputs` holds N-long arrays
  aligned with them: position i of `model_input` predicts `target_tokens[i]` (for plain next-token data,
  `model_input = full[:-1]`, `target_tokens = full[1:]`), `weights[i]` scales that token's loss, and the
  RL losses add the sampler's `logprobs` and the `advantages`.
- `ForwardBackwardInput` (`data`, `loss_fn`, `loss_fn_config`) -> `ForwardBackwardOutput`: the summed loss,
  per datum the per-token `logprobs` and `elementwise_loss`, and metrics. Losses are sums, never means, as
  in Tinker: a client that wants a mean puts 1/N in `weights`.
- `AdamParams` -> `OptimStepOutput`; `SamplingParams` -> `SampleOutput` of `SampledSequence`s.

Everything here is pydantic and torch-free, so the control plane and an HTTP layer validate a request
before it reaches a worker. A malformed datum fails its own request with a `ValueError` (pydantic's
`ValidationError` is one) whose location names the datum index and the field, e.g.
`data.3.loss_fn_inputs.advantages`. What only the worker knows (the vocabulary size, the token budget of a
pass) is checked by `check_data`, with messages of the same shape.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LossFn = Literal["cross_entropy", "importance_sampling", "ppo"]
StopReason = Literal["length", "stop"]

# Which `loss_fn_inputs` each loss needs, besides `target_tokens` (always required).
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": (),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
}


class _Strict(BaseModel):
    """Unknown fields are an error: a typo in a request must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite(values: list[float] | None, field: str) -> list[float] | None:
    if values is None:
        return None
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"`{field}[{i}]` is {v}: every value must be a finite number")
    return values


class LossFnInputs(_Strict):
    """Per-token arrays, each as long as the datum's `model_input`."""

    target_tokens: list[Annotated[int, Field(ge=0)]]
    weights: list[float] | None = Field(
        default=None, description="Per-token loss weight (cross_entropy); absent: 1 for every token."
    )
    logprobs: list[float] | None = Field(
        default=None, description="The sampler's logprob of each target token (importance_sampling, ppo)."
    )
    advantages: list[float] | None = Field(
        default=None, description="Per-token advantage (importance_sampling, ppo)."
    )

    @field_validator("weights", "logprobs", "advantages")
    @classmethod
    def _no_nan(cls, values: list[float] | None, info: object) -> list[float] | None:
        return _finite(values, getattr(info, "field_name", "value"))


class Datum(_Strict):
    model_input: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    loss_fn_inputs: LossFnInputs

    @model_validator(mode="after")
    def _aligned(self) -> Datum:
        n = len(self.model_input)
        inputs = self.loss_fn_inputs
        for name in ("target_tokens", "weights", "logprobs", "advantages"):
            values = getattr(inputs, name)
            if values is not None and len(values) != n:
                raise ValueError(
                    f"`loss_fn_inputs.{name}` has {len(values)} values but `model_input` has {n} tokens: "
                    "every per-token array must be as long as `model_input`"
                )
        return self

    @property
    def length(self) -> int:
        return len(self.model_input)

    @classmethod
    def from_sequence(cls, tokens: list[int], weights: list[float] | None = None) -> Datum:
        """Next-token data: `model_input` = tokens[:-1], `target_tokens` = tokens[1:]; `weights`, if
        given, is aligned with the targets (tokens[1:])."""
        return cls(
            model_input=list(tokens[:-1]),
            loss_fn_inputs=LossFnInputs(target_tokens=list(tokens[1:]), weights=weights),
        )


class LossFnConfig(_Strict):
    """PPO's clipping of the probability ratio p/q to [clip_low_threshold, clip_high_threshold]."""

    clip_low_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8
    clip_high_threshold: Annotated[float, Field(ge=1.0)] = 1.2


class ForwardBackwardInput(_Strict):
    data: list[Datum] = Field(min_length=1)
    loss_fn: LossFn = "cross_entropy"
    loss_fn_config: LossFnConfig | None = None

    @model_validator(mode="after")
    def _inputs_for_the_loss(self) -> ForwardBackwardInput:
        for i, datum in enumerate(self.data):
            for name in REQUIRED_INPUTS[self.loss_fn]:
                if getattr(datum.loss_fn_inputs, name) is None:
                    raise ValueError(
                        f"`data[{i}].loss_fn_inputs.{name}` is missing: loss_fn {self.loss_fn!r} needs "
                        f"{', '.join(REQUIRED_INPUTS[self.loss_fn])} for every datum"
                    )
        return self


def check_data(data: list[Datum], vocab_size: int, max_tokens: int | None = None) -> None:
    """What only a worker can check: token ids inside its base's vocabulary, and every datum fitting one
    pass (`max_tokens`: the worker's token budget; a datum costs its length plus one token)."""
    for i, datum in enumerate(data):
        for field, tokens in (
            ("model_input", datum.model_input),
            ("loss_fn_inputs.target_tokens", datum.loss_fn_inputs.target_tokens),
        ):
            bad = next((t for t in tokens if t >= vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"`data[{i}].{field}` holds token id {bad}, outside this base's vocabulary "
                    f"(ids 0..{vocab_size - 1})"
                )
        if max_tokens is not None and datum.length + 1 > max_tokens:
            raise ValueError(
                f"`data[{i}].model_input` has {datum.length} tokens, more than one pass of this worker "
                f"holds ({max_tokens - 1}); split the sequence or use a worker with more memory"
            )


class ForwardBackwardOutput(_Strict):
    """`loss`: the call's summed loss. `loss_fn_outputs[i]`: datum i's per-token `logprobs` (of its target
    tokens, under the weights before this call's optim_step) and `elementwise_loss`."""

    loss: float
    loss_fn_outputs: list[dict[str, list[float]]]
    metrics: dict[str, float] = Field(default_factory=dict)


class AdamParams(_Strict):
    """One AdamW step (decoupled weight decay); Tinker's defaults. `grad_clip_norm` 0: no clipping."""

    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    eps: Annotated[float, Field(gt=0)] = 1e-12
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip_norm: Annotated[float, Field(ge=0.0)] = 0.0


class OptimStepOutput(_Strict):
    step: int  # optimizer steps taken by this session so far
    metrics: dict[str, float] = Field(default_factory=dict)  # grad_norm (before clipping), learning_rate


class SamplingParams(_Strict):
    """`temperature` 0: greedy. `stop`: token ids, or texts, that end a sample (the token that ends it is
    kept as its last); None: the tokenizer's end-of-sequence and end-of-turn tokens; any list replaces
    those, and [] runs every sample to `max_tokens`. `seed`: the same seed, prompt and weights give the
    same samples, whatever else the worker is doing."""

    max_tokens: Annotated[int, Field(gt=0)] = 16
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    stop: list[Annotated[int, Field(ge=0)]] | list[Annotated[str, Field(min_length=1)]] | None = None
    seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_text(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0:
            raise ValueError("`top_k` is 0: use -1 for no limit, or a positive number of tokens")
        return value


class SampledSequence(_Strict):
    tokens: list[int]
    # Of each sampled token: log-softmax of logits / temperature (the plain logits when greedy), before
    # top-k / top-p; at temperature 1 these are `compute_logprobs`'s values for the same tokens.
    logprobs: list[float]
    stop_reason: StopReason


class SampleOutput(_Strict):
    sequences: list[SampledSequence]


class WorkerLost(RuntimeError):
    """The worker holding a session's host is gone (its Ray actor died, its node was lost): the calls it
    had not answered are lost with it. The session's next call starts a new host and restores the
    session from its last `save_state` (or its starting state if it never saved), so what is redone is
    every call since that save. Retryable: the HTTP API answers 503 with `Retry-After`."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}; the session's next call restores it on another worker from its last save_state "
            "(or its starting state), so redo the steps since then"
        )
