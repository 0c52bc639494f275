"""The typed contract between the control plane and the training engine.

`orchestrator/` builds a `PackPlan`, `workers/` runs it and answers with events. Everything here is plain
data (pydantic, no torch) so the control plane can import it without pulling in the engine, and so a plan
can cross a process boundary (Ray) as JSON.
"""

from __future__ import annotations

import math
import os
import re
import time
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

# A directory or an object-store URI (`workers.storage` reads and writes both); paths become strings.
Location = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]

ADAPTER_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"
NAME_MAX = 100


def check_name(value: str, what: str = "adapter `name`") -> str:
    """Names become directories and MLflow names: lowercase letters, digits, '.', '_', '-', at most
    NAME_MAX characters, the whole string (a trailing newline is not a name character)."""
    if len(value) > NAME_MAX:
        raise ValueError(f"{what} is {len(value)} characters long; use at most {NAME_MAX}")
    if not re.fullmatch(ADAPTER_NAME_PATTERN, value) or value in (".", ".."):
        raise ValueError(
            f"{what} {value!r} is invalid: use lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged adapter reports a huge number rather than an overflow."""
    return math.exp(min(loss, 700.0))


Quantization = Literal["none", "8bit", "4bit"]
DType = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
LrSchedule = Literal["cosine", "linear", "constant"]
Checkpointing = Literal["auto", "on", "off"]


class _Strict(BaseModel):
    """Unknown fields are an error: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Strict):
    r: Annotated[int, Field(gt=0, le=4096, description="LoRA rank.")] = 8
    alpha: Annotated[float, Field(gt=0, description="Scaling numerator: the update is (alpha/r)·B·A.")] = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0, description="Dropout on the LoRA input.")] = 0.0
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Linear module names (matched as a dotted suffix) or 'all-linear'.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("`target_modules` is empty: name at least one module or use 'all-linear'")
        return value

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def branch_problems(parent: LoraConfig, child: LoraConfig, parent_name: str | None = None) -> list[str]:
    """Why `child` cannot start from `parent`'s weights (empty: it can), in words naming the field and
    the fix. Rank and target modules shape the A/B matrices a child inherits; alpha and dropout are its
    own. The one check: the service calls it on the spec's words before anything runs, and the engine
    on module paths (both sides resolved on the loaded base) when it loads the parent's weights."""
    who = f"parent {parent_name!r}" if parent_name else "its parent"
    problems = []
    if parent.r != child.r:
        problems.append(
            f"`lora.r` {child.r} differs from {who}'s rank {parent.r}; a child keeps its parent's rank"
        )
    if parent.target_modules != child.target_modules:
        problems.append(
            f"`lora.target_modules` {_brief(child.target_modules)} differ from {who}'s "
            f"{_brief(parent.target_modules)}; a child keeps the target modules"
        )
    return problems


def _brief(targets: list[str] | str, most: int = 8) -> str:
    if isinstance(targets, str) or len(targets) <= most:
        return repr(targets)
    shown = ", ".join(repr(t) for t in targets[:most])
    return f"[{shown}, ... ({len(targets)} in all)]"


class TrainConfig(_Strict):
    steps: Annotated[int, Field(ge=0, description="Optimizer steps to train.")] = 100
    batch_size: Annotated[int, Field(gt=0, description="Sequences per micro-batch for this adapter.")] = 4
    grad_accum_steps: Annotated[int, Field(gt=0, description="Micro-batches per optimizer step.")] = 1
    learning_rate: Annotated[float, Field(gt=0)] = 1.0e-3
    lr_schedule: LrSchedule = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0, description="Floor of the decay, x lr.")] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    max_grad_norm: Annotated[float | None, Field(gt=0, description="Clip per adapter; null: off.")] = 1.0
    max_seq_len: Annotated[int, Field(gt=1, le=1_000_000)] = 256
    seed: int = 0
    eval_every: Annotated[int, Field(ge=0, description="Steps between evals; 0: only at the end.")] = 50
    eval_max_examples: Annotated[int | None, Field(gt=0)] = None
    checkpoint_every: Annotated[int, Field(ge=0, description="Steps between checkpoints; 0: only final.")] = (
        50
    )
    keep_checkpoints: Annotated[int, Field(gt=0, description="Intermediate checkpoints kept on disk.")] = 2
    packing: bool = Field(
        default=True,
        description="Pack this adapter's examples into rows with no padding between documents (attention "
        "never crosses a document boundary); false: one example per row, padded.",
    )


class ShardConfig(_Strict):
    count: Annotated[int, Field(gt=0)] = 1
    index: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _index_in_range(self) -> ShardConfig:
        if self.index >= self.count:
            raise ValueError(f"`shard.index` must be < `shard.count` ({self.count}); got {self.index}")
        return self


class DataConfig(_Strict):
    path: Path
    eval_path: Path | None = None
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    shard: ShardConfig = Field(default_factory=ShardConfig)

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval_path is not None and self.eval_fraction > 0:
            raise ValueError("give either `eval_path` or `eval_fraction`, not both")
        return self


SCORERS = ("exact_match", "contains", "regex", "token_f1", "rouge_l", "json_valid", "json_schema")
SCORER_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"


def scorer_metric(scorer: str) -> str:
    """The metric a scorer reports under: `eval_<name>` for a built-in, `eval_<function>` for a user's
    `module:function` (so `eval_exact_match`, `base_eval_exact_match`, `parent_eval_exact_match`)."""
    return "eval_" + scorer.rpartition(":")[2]


class EvalConfig(_Strict):
    """How an adapter's eval split is judged beyond its loss, the way its users will judge it: greedy
    generation from each eval record's prompt (`prompt`/`completion` and `messages` records), scored
    against the record's reference, for the adapter, for the base and, for a child, for its parent, on
    the same records, so every score comes with its lift. Runs at the adapter's final eval."""

    scorers: list[str] = Field(
        default_factory=lambda: ["exact_match", "token_f1"],
        description="Built-in scorers (" + ", ".join(SCORERS) + ") or a user's `module:function` "
        "(called with prediction and reference, returns a float in [0, 1]). Each is reported as "
        "`eval_<scorer>`, `base_eval_<scorer>` and `parent_eval_<scorer>`.",
    )
    max_new_tokens: Annotated[int, Field(gt=0, le=4096, description="Tokens generated per prompt.")] = 64
    max_examples: Annotated[
        int, Field(ge=0, le=100_000, description="Eval records judged by generation (the first N); 0: none.")
    ] = 200
    pattern: str | None = Field(default=None, description="The `regex` scorer's pattern (fullmatch).")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="The `json_schema` scorer's JSON Schema for the generated JSON."
    )
    samples: Annotated[
        int, Field(ge=0, le=100, description="Sample generations kept (MLflow table, model card).")
    ] = 10

    @field_validator("scorers")
    @classmethod
    def _known_scorers(cls, value: list[str]) -> list[str]:
        for scorer in value:
            if scorer not in SCORERS and not re.fullmatch(SCORER_PATTERN, scorer):
                raise ValueError(
                    f"unknown scorer {scorer[:80]!r}: use one of {list(SCORERS)} or `module:function`"
                )
        metrics = [scorer_metric(s) for s in value]
        repeated = sorted({m for m in metrics if metrics.count(m) > 1})
        if repeated:
            raise ValueError(f"two scorers report under the same metric name: {repeated}")
        return value

    @model_validator(mode="after")
    def _scorer_settings(self) -> EvalConfig:
        """A scorer's setting is checked when the spec is submitted, not at the end of training: a
        missing or broken `pattern` / `json_schema` would otherwise cost a whole run."""
        if "regex" in self.scorers:
            if not self.pattern:
                raise ValueError(
                    "the `regex` scorer needs `eval.pattern` (a Python regular expression the whole answer "
                    "must match); give one or drop `regex` from `eval.scorers`"
                )
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(
                    f"`eval.pattern` {self.pattern[:80]!r} is not a valid regular expression: {exc}"
                ) from None
        if "json_schema" in self.scorers:
            if self.json_schema is None:
                raise ValueError(
                    "the `json_schema` scorer needs `eval.json_schema` (a JSON Schema the answer must "
                    "match); give one or drop `json_schema` from `eval.scorers`"
                )
            import jsonschema

            try:
                jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"`eval.json_schema` is not a valid JSON Schema: {exc.message}") from None
        return self


class EvalSample(_Strict):
    """One judged eval record, as the MLflow table and the model card show it."""

    prompt: str
    reference: str
    output: str = Field(description="The adapter's answer.")
    base_output: str | None = None
    parent_output: str | None = None
    scores: dict[str, float] = Field(default_factory=dict, description="The adapter's answer, per metric.")


class AdapterTask(_Strict):
    """One adapter to train inside a pack."""

    name: str
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig
    output_dir: Location = Field(description="A directory or an object-store URI (`workers.storage`).")
    init_from: Location | None = Field(
        default=None, description="PEFT adapter dir whose weights start this adapter (branching)."
    )
    resume_from: Location | None = Field(
        default=None, description="Our checkpoint dir (adapter + training state) to resume exactly."
    )
    baseline_from: Location | None = Field(
        default=None,
        description="PEFT adapter (e.g. the parent) to evaluate on this adapter's eval data at the end, "
        "so a promotion gate can compare the two on the same data.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    max_record_bytes: Annotated[int, Field(gt=0)] = Field(
        default=1 << 20,
        description="The largest data record the worker reads (the server's `LORAFLEET_MAX_RECORD_BYTES`).",
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_name(value)


class PackPlan(_Strict):
    """K adapters over one frozen base, trained in the same batched step on one worker group."""

    pack_id: str = "pack"
    base_model: str = Field(
        description="Local directory, hub id, .gguf file or catalogued name of a transformers causal LM."
    )
    bases_home: str | None = Field(
        default=None,
        description="The LORAFLEET_HOME whose `bases/` holds converted GGUF and catalogued bases; "
        "null: the worker's own `LORAFLEET_HOME`.",
    )
    tokenizer: str | None = Field(default=None, description="Defaults to `base_model`.")
    quantization: Quantization = "none"
    dtype: DType = "float32"
    device: Device = "auto"
    adapters: list[AdapterTask]
    max_adapters: Annotated[
        int | None, Field(gt=0, description="Slots, for refill; default: len(adapters).")
    ] = None
    memory_budget_bytes: Annotated[
        int | None,
        Field(gt=0, description="The worker's memory budget (GPU memory, or its share of RAM); null: none."),
    ] = None
    activation_checkpointing: Checkpointing = Field(
        default="auto",
        description="Recompute each decoder layer in backward instead of keeping its activations. auto: on "
        "for a step whose estimated peak would exceed `memory_budget_bytes` without it (off if no budget).",
    )
    allow_user_scorers: bool = Field(
        default=True,
        description="Whether adapters may be judged by a user's `module:function` scorer, which runs the "
        "user's code in the worker (a server's setting); false: such a metric is left out, with the reason "
        "in `EvalEvent.errors`.",
    )
    max_tokens_per_pass: Annotated[
        int | None,
        Field(
            gt=0,
            description="At most this many tokens in one forward/backward: a step over more runs as several "
            "passes of whole adapters (same gradients, less activation memory). null: "
            "`workers.contract.memory.CPU_PASS_TOKENS` on CPU, one pass per step on GPU.",
        ),
    ] = None

    @property
    def capacity(self) -> int:
        return max(self.max_adapters or 0, len(self.adapters))

    @model_validator(mode="after")
    def _unique_names(self) -> PackPlan:
        names = [task.name for task in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names in a pack must be unique; repeated: {dupes}")
        return self


# ---- events: what the engine reports back, in order, per adapter ----


class _Event(_Strict):
    pack_id: str
    adapter: str
    step: int
    at: float = Field(
        default_factory=time.time, description="When the engine emitted it (Unix seconds): MLflow's times."
    )
    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        description="Unique per emitted event: a replayed event log is recorded once.",
    )


class StartEvent(_Event):
    """An adapter joined the pack: fresh (step 0), branched, or resumed at `step`."""

    kind: Literal["start"] = "start"
    data_fingerprint: str
    train_examples: int
    eval_examples: int
    resumed: bool = False
    node: str | None = Field(default=None, description="The Ray node the pack runs on (set by the runner).")


class StepEvent(_Event):
    kind: Literal["step"] = "step"
    loss: float
    lr: float
    grad_norm: float
    tokens: int = Field(description="Target tokens seen so far by this adapter.")
    tokens_per_s: float


class EvalEvent(_Event):
    """An eval of the adapter on its eval split. `metrics` holds the named metrics beyond the loss:
    `eval_token_accuracy` at every eval; at the final eval (`final`) also the generation scores
    `eval_<scorer>` and the same for the base (`base_eval_*`, incl. `base_eval_loss`) and, for a child,
    its parent (`parent_eval_*`, incl. `parent_eval_loss`), all on the same records; `samples` a few
    judged records."""

    kind: Literal["eval"] = "eval"
    eval_loss: float
    perplexity: float
    eval_tokens: int
    final: bool = False
    metrics: dict[str, float] = Field(default_factory=dict)
    samples: list[EvalSample] = Field(default_factory=list)
    errors: dict[str, str] = Field(
        default_factory=dict,
        description="Metrics that could not be computed (a user scorer failed, or is not allowed here), "
        "each with the reason; the metric is absent from `metrics`, the adapter is still trained.",
    )


class CheckpointEvent(_Event):
    kind: Literal["checkpoint"] = "checkpoint"
    path: Location
    final: bool = False


class Outcome(StrEnum):
    """How an adapter left its pack: the engine's word. The control plane turns it into the adapter's
    lifecycle state in one place (`orchestrator.spec.states.adapter_state_after`)."""

    TRAINED = "trained"
    FAILED = "failed"
    CANCELLED = "cancelled"
    YIELDED = "yielded"  # made room at a step boundary, right after a checkpoint: it resumes from there


class AdapterDone(_Event):
    """An adapter left its pack. `yielded`: it made room for other work at a step boundary, right after a
    checkpoint of that step, and goes back to the queue to resume from it (nothing is redone)."""

    kind: Literal["done"] = "done"
    status: Outcome
    final_dir: Location | None = None
    eval_loss: float | None = None
    baseline_eval_loss: float | None = None
    error: str | None = None


Event = Annotated[
    StartEvent | StepEvent | EvalEvent | CheckpointEvent | AdapterDone, Field(discriminator="kind")
]


class PackResult(_Strict):
    pack_id: str
    adapters: dict[str, AdapterDone]
