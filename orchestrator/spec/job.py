"""The job spec: the one definition of a job (YAML, dict or Python), also exported as JSON Schema.

Job-level `lora`/`train` are defaults; an adapter's own `lora`/`train` override them field by field, and the
result is validated again as a whole so a bad merged value names the adapter and the field. Unknown fields
are errors everywhere: a typo must never be silently ignored. Checks that need the outside world (does the
data file exist and parse, does the base model load, does the parent adapter exist in the store) live in
`preflight` and the service layer, which report them together with these.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from workers.contract.plan import (
    SCORERS,
    Checkpointing,
    DataConfig,
    DType,
    EvalConfig,
    LoraConfig,
    Quantization,
    TrainConfig,
    check_name,
    scorer_metric,
)


class SpecError(ValueError):
    """A job spec is invalid; `problems` lists every (field, message) found, all at once."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("invalid job spec:\n" + "\n".join(f"  - `{f}`: {m}" for f, m in problems))


def _partial(model: type[BaseModel]) -> type[BaseModel]:
    """The same fields as `model`, all optional: an override that says only what differs."""
    fields: dict[str, Any] = {
        name: (
            (Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation) | None,
            Field(None, description=info.description),
        )
        for name, info in model.model_fields.items()
    }
    return create_model(f"{model.__name__}Override", __config__=ConfigDict(extra="forbid"), **fields)


LoraOverride = _partial(LoraConfig)
TrainOverride = _partial(TrainConfig)
EvalOverride = _partial(EvalConfig)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterSpec(_Strict):
    name: str
    data: DataConfig
    parent: str | None = Field(
        default=None,
        description="Adapter whose trained weights start this one: a name in this job, "
        "a name in this project, or project/name.",
    )
    lora: LoraOverride | None = None  # type: ignore[valid-type]
    train: TrainOverride | None = None  # type: ignore[valid-type]
    eval: EvalOverride | None = None  # type: ignore[valid-type]
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000, description="Higher runs first.")] = 0

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "adapter name")

    @field_validator("parent")
    @classmethod
    def _parent(cls, value: str | None) -> str | None:
        return None if value is None else check_parent(value)


def check_parent(value: str) -> str:
    """A parent reference is `name` or `project/name`, each part a valid name: anything else could never
    name an adapter, and is refused before it reaches a query."""
    project, _, name = value.rpartition("/")
    if project:
        check_name(project, "parent's project")
    check_name(name, "parent adapter name")
    return value


# MLflow's alias rules: letters, digits, '_' and '-'; not `latest`, not `v<digits>` (version references).
ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"


def check_alias(value: str) -> str:
    if len(value) > 63 or not re.fullmatch(ALIAS_PATTERN, value):
        raise ValueError(
            f"alias {value[:80]!r} is invalid: use at most 63 letters, digits, '_' or '-', starting with a "
            "letter or '_'"
        )
    if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        raise ValueError(f"alias {value!r} is reserved by MLflow (`latest`, `v<number>`); choose another")
    return value


LOSS_METRICS = ("eval_loss", "perplexity")
ALWAYS_MEASURED = (*LOSS_METRICS, "eval_token_accuracy")


def lower_is_better(metric: str) -> bool:
    """A loss or a perplexity improves downwards; every other metric (task scores, accuracy) upwards."""
    return metric.endswith(("loss", "perplexity"))


def measured_metrics(config: EvalConfig) -> list[str]:
    """The metrics an adapter judged by `config` reports: the loss family at every eval, and each
    scorer's `eval_<scorer>` when its final eval generates (`max_examples` > 0)."""
    scores = [scorer_metric(s) for s in config.scorers] if config.max_examples > 0 else []
    return [*ALWAYS_MEASURED, *scores]


class PromotionPolicy(_Strict):
    metric: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200)] = Field(
        default="eval_loss",
        description="Any metric the adapters record: `eval_loss`, `perplexity` (lower is better), "
        "`eval_token_accuracy` or a scorer's `eval_<scorer>` such as `eval_exact_match` (higher is better).",
    )
    max: float | None = Field(default=None, description="Promote only if the metric is <= max.")
    min: float | None = Field(default=None, description="Promote only if the metric is >= min.")
    better_than_parent: bool | None = Field(
        default=None,
        description="Also beat the parent on the child's eval data (the parent is measured on it, "
        "`parent_<metric>`). Unset: on for a branched adapter, so a child is never promoted for merely "
        "existing; `false` turns it off.",
    )
    alias: str = "champion"
    auto: bool = Field(default=False, description="Promote when training ends, if the gate passes.")

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        return check_alias(value)


class Resources(_Strict):
    workers: Annotated[int, Field(gt=0, description="Ray Train workers per pack (data parallel).")] = 1
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1
    max_adapters_per_worker: Annotated[int, Field(gt=0)] = 8
    memory_gb_per_worker: Annotated[float | None, Field(gt=0)] = None
    max_failures: Annotated[int, Field(ge=0, description="Worker restarts Ray Train may do per pack.")] = 2
    activation_checkpointing: Checkpointing = Field(
        default="auto",
        description="Recompute each decoder layer in backward: `on`, `off`, or `auto` (on when the "
        "pack's estimated peak memory would not fit the worker's budget without it).",
    )
    max_tokens_per_pass: Annotated[int | None, Field(gt=0, le=10_000_000)] = Field(
        default=None,
        description="At most this many tokens per forward/backward: a pack step over more runs as several "
        "passes of whole adapters (the same gradients, less activation memory). Default: 1024 on CPU "
        "(as fast, half the memory), one pass on GPU.",
    )


class BranchSpec(_Strict):
    """A child adapter started from an existing adapter's final weights: what `lorafleet branch`,
    `Client.branch` and `POST /v1/adapters/{project}/{name}/branch` carry, one type through all layers.
    It becomes a one-adapter job, validated (and its files checked) like any job spec."""

    name: str
    data: dict[str, Any] = Field(description="The child's data config: path, eval_path, eval_fraction...")
    lora: dict[str, Any] | None = Field(default=None, description="LoRA overrides (rank must match).")
    train: dict[str, Any] | None = Field(default=None, description="Train overrides, e.g. steps.")
    eval: dict[str, Any] | None = Field(
        default=None, description="Eval overrides (scorers...); default: the parent's eval config."
    )


class JobSpec(_Strict):
    """What a user submits: adapters + defaults + promotion policy + resources."""

    name: str
    project: str = "default"
    base_model: str
    tokenizer: str | None = None
    quantization: Quantization = "none"
    dtype: DType = "float32"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(
        default_factory=EvalConfig,
        description="How adapters are judged by generation at their final eval; an adapter's `eval` "
        "overrides it field by field.",
    )
    adapters: Annotated[list[AdapterSpec], Field(min_length=1)]
    promotion: PromotionPolicy = Field(default_factory=PromotionPolicy)
    resources: Resources = Field(default_factory=Resources)

    @field_validator("name", "project")
    @classmethod
    def _names(cls, value: str, info: Any) -> str:
        return check_name(value, f"job {info.field_name}")

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        problems: list[tuple[str, str]] = []
        names = [a.name for a in self.adapters]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append(
                    (f"adapters.{i}.name", f"{name!r} is used twice in this job; names are unique")
                )
        problems += _cycle_problems(self.adapters)
        for i, _ in enumerate(self.adapters):
            for merge in (self.adapter_lora, self.adapter_train, self.adapter_eval):
                try:
                    merge(i)
                except ValidationError as exc:
                    problems += [
                        (_loc(i, exc, e), e["msg"].removeprefix("Value error, ")) for e in exc.errors()
                    ]
        if not problems:
            problems += self._promotion_problems()  # scorer settings: `EvalConfig` checks them
        if problems:
            raise SpecError(problems)  # pydantic wraps it; `_problems` unwraps the individual fields
        return self

    def adapter_lora(self, index: int) -> LoraConfig:
        override = self.adapters[index].lora
        merged = {**self.lora.model_dump(), **(override.model_dump(exclude_none=True) if override else {})}
        return LoraConfig.model_validate(merged)

    def adapter_train(self, index: int) -> TrainConfig:
        override = self.adapters[index].train
        merged = {**self.train.model_dump(), **(override.model_dump(exclude_none=True) if override else {})}
        return TrainConfig.model_validate(merged)

    def adapter_eval(self, index: int) -> EvalConfig:
        override = self.adapters[index].eval
        merged = {**self.eval.model_dump(), **(override.model_dump(exclude_none=True) if override else {})}
        return EvalConfig.model_validate(merged)

    def eval_of(self, name: str) -> EvalConfig:
        """The merged eval config of the adapter called `name` in this job (the job's if none is)."""
        for i, adapter in enumerate(self.adapters):
            if adapter.name == name:
                return self.adapter_eval(i)
        return self.eval

    def eval_field(self, index: int, key: str) -> str:
        """Where adapter `index`'s merged eval `key` came from: its override, else the job's default (so a
        job-wide problem is reported once, at the job's field)."""
        override = self.adapters[index].eval
        if override is not None and getattr(override, key) is not None:
            return f"adapters.{index}.eval.{key}"
        return f"eval.{key}"

    def _promotion_problems(self) -> list[tuple[str, str]]:
        """The gate's metric must be one every adapter of the job records: a gate on a score nobody
        measures would reject every adapter after hours of training, for a typo."""
        metric = self.promotion.metric
        for i, adapter in enumerate(self.adapters):
            config = self.adapter_eval(i)
            measured = measured_metrics(config)
            if metric not in measured:
                scorer = metric.removeprefix("eval_")
                if metric in (scorer_metric(s) for s in config.scorers):
                    fix = "set `eval.max_examples` above 0 so its final eval generates"
                elif scorer in SCORERS and metric != scorer:
                    fix = f"add `{scorer}` to `eval.scorers`"
                else:
                    fix = "choose one it records"
                return [
                    (
                        "promotion.metric",
                        f"{metric!r} is not recorded for adapter {adapter.name!r} (it records "
                        f"{measured}); {fix}",
                    )
                ]
        return []

    # ---- loading ----

    @classmethod
    def parse(cls, source: dict[str, Any] | str | Path, base_dir: Path | None = None) -> JobSpec:
        """Validate a dict, YAML text or YAML file; relative paths resolve against the file's directory."""
        raw = load_source(source, base_dir)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise SpecError(_problems(exc)) from None


@dataclass(frozen=True)
class ScoreOrder:
    """Which metrics lead an adapter's task scores: its job's gate metric, then its scorers in the order
    it gave them (its own override, else the job's). Read from a stored spec (a validated dump) without
    validating it again, as views list many adapters; a spec never changes, so it can be kept."""

    gate: str
    scorers: tuple[str, ...]
    own: Mapping[str, tuple[str, ...]]  # adapters whose `eval.scorers` override the job's

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> ScoreOrder:
        own = {
            spec["name"]: tuple(spec["eval"]["scorers"])
            for spec in raw.get("adapters") or []
            if (spec.get("eval") or {}).get("scorers") is not None
        }
        scorers = (raw.get("eval") or {}).get("scorers")
        return cls(
            gate=(raw.get("promotion") or {}).get("metric") or "eval_loss",
            scorers=tuple(EvalConfig().scorers if scorers is None else scorers),
            own=own,
        )

    def __call__(self, adapter: str) -> list[str]:
        return [self.gate, *map(scorer_metric, self.own.get(adapter, self.scorers))]


def load_source(source: dict[str, Any] | str | Path, base_dir: Path | None = None) -> dict[str, Any]:
    """A spec as a plain mapping, from a dict, YAML text or a YAML file, with relative paths made absolute.

    Paths are resolved here, before validation, so a spec means the same thing wherever it is checked
    (the client's directory is not the service's), and so a spec with schema errors can still have its
    files checked: every problem is reported at once.
    """
    if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml", ".json"))
    ):
        path = Path(source)
        if not path.is_file():
            raise SpecError([("spec", f"file {str(path)[:300]!r} not found")])
        base_dir = base_dir or path.parent.resolve()
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError([("spec", f"cannot read {str(path)[:300]!r}: {exc}")]) from exc
    if isinstance(source, str):
        try:
            source = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise SpecError([("spec", f"not valid YAML: {exc}")]) from exc
        except (ValueError, RecursionError) as exc:  # a date like 2001-13-45, a 5000-digit number, [[[[...
            raise SpecError([("spec", f"not valid YAML: {str(exc)[:300] or type(exc).__name__}")]) from exc
    if not isinstance(source, dict):
        raise SpecError([("spec", f"expected a mapping of fields, got {type(source).__name__}")])
    return resolve_paths(source, base_dir or Path.cwd())


def resolve_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make data paths (and a local base model dir or .gguf file) absolute, so the job does not depend on
    a cwd."""

    def absolute(value: Any) -> Any:
        if not isinstance(value, str | Path) or not str(value):
            return value
        try:
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else (base_dir / path).resolve())
        except (RuntimeError, ValueError, OSError):  # `~nobody`, a NUL, a name too long: preflight says so
            return str(value)

    out = dict(raw)
    adapters = raw.get("adapters")
    if isinstance(adapters, list):
        out["adapters"] = []
        for adapter in adapters:
            if isinstance(adapter, dict) and isinstance(adapter.get("data"), dict):
                data = dict(adapter["data"])
                for key in ("path", "eval_path"):
                    if key in data:
                        data[key] = absolute(data[key])
                adapter = {**adapter, "data": data}
            out["adapters"].append(adapter)
    base = raw.get("base_model")
    local = isinstance(base, str) and (
        base.startswith((".", "~")) or base.lower().endswith(".gguf") or _is_dir(base_dir / base)
    )
    if local and not Path(base).is_absolute():
        out["base_model"] = absolute(base)
    return out


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long or not encodable is no directory
        return False


def _cycle_problems(adapters: list[AdapterSpec]) -> list[tuple[str, str]]:
    parents = {a.name: a.parent for a in adapters}
    problems = []
    for i, adapter in enumerate(adapters):
        seen, node = {adapter.name}, adapter.parent
        while node in parents:
            if node in seen:
                problems.append((f"adapters.{i}.parent", f"{adapter.name!r} is its own ancestor"))
                break
            seen.add(node)
            node = parents[node]
    return problems


def _loc(index: int, exc: ValidationError, error: Any) -> str:
    model = exc.title.replace("Config", "").lower()
    return ".".join(["adapters", str(index), model, *(str(p) for p in error["loc"])])


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for error in exc.errors():
        inner = error.get("ctx", {}).get("error")
        if isinstance(inner, SpecError):
            out += inner.problems
            continue
        loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-after"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against `lorafleet schema`"
        elif error["type"] == "missing":
            message = "required field is missing"
        if "input" in error and error["type"] not in ("missing", "extra_forbidden", "value_error"):
            message += f" (got {_shown(error['input'])})"
        out.append((loc or "spec", message))
    return out


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 120, 120


def _shown(value: Any) -> str:
    """What the user gave, for a message: bounded, whatever it is (deeply nested, a 5000-digit number)."""
    try:
        return _REPR.repr(value)[:300]
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
