"""What a submission must pass before anything is stored: the checks that need the outside world.

They run on the raw spec (a mapping), not on a validated `JobSpec`, so that a spec with schema errors
still has its files and base model checked, and the user gets every problem in one answer instead of
fixing them in rounds. Each check returns (field, message) problems; none raises.

What cannot be known here fails later, once, for that job alone: a hub id that does not resolve, a bad
record deep in a large file, running out of memory.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.bases.catalog import CATALOG, BaseModelError, base_config, catalog_dir, is_gguf_reference
from workers.training.data import MAX_RECORD_BYTES, DataError, check_head

if TYPE_CHECKING:
    from orchestrator.spec.job import JobSpec

# A hub id: `name` or `owner/name` (letters, digits, '.', '_', '-'), as the Hugging Face Hub allows.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class Allowed:
    """What a server lets a spec read. None everywhere (the local default): anything this user can."""

    data_roots: Sequence[Path] | None = None
    model_roots: Sequence[Path] | None = None
    models: Sequence[str] | None = None  # hub id patterns


ANYTHING = Allowed()


@dataclass(frozen=True)
class Limits:
    """How big a job may be on this server: the admin's policy (`Settings.max_*`), not the schema's.

    Submitting, showing and cancelling a job cost time in proportion to its adapters, and a worker's
    memory grows with a record's size; a bound keeps one careless (or hostile) spec from slowing every
    other tenant. Each refusal names the setting that raises it.
    """

    max_adapters: int = 1000
    max_steps: int = 1_000_000
    max_tokens: int = 10_000_000_000
    max_record_bytes: int = MAX_RECORD_BYTES


def adapter_count_problems(raw: dict[str, Any], limits: Limits) -> Problems:
    """Too many adapters, judged on the raw spec before anything else is checked: validating each
    adapter and reading each data file is the very cost the limit bounds."""
    adapters = raw.get("adapters")
    if not isinstance(adapters, list) or len(adapters) <= limits.max_adapters:
        return []
    return [
        (
            "adapters",
            f"{len(adapters)} adapters is over this server's limit of {limits.max_adapters} per job; split "
            "the job, or ask the admin to raise LORAFLEET_MAX_ADAPTERS_PER_JOB",
        )
    ]


def user_scorer_problems(spec: JobSpec, allowed: bool) -> Problems:
    """A `module:function` scorer runs the submitter's code inside the workers, next to every other
    tenant's data and weights: where the server does not allow it (`allowed` is false), each field that
    names one is refused, with the built-in scorers as the fix."""
    from workers.contract.plan import SCORERS

    if allowed:
        return []
    problems: Problems = []
    for i in range(len(spec.adapters)):
        for scorer in spec.adapter_eval(i).scorers:
            if scorer not in SCORERS:
                problems.append(
                    (
                        spec.eval_field(i, "scorers"),
                        f"scorer {scorer!r} would run your own code on this server's workers, which this "
                        f"server does not allow (LORAFLEET_ALLOW_USER_SCORERS); use built-in scorers "
                        f"({', '.join(SCORERS)}), or ask the admin",
                    )
                )
    return list(dict.fromkeys(problems))


def size_problems(spec: JobSpec, limits: Limits) -> Problems:
    """Each adapter's steps and token budget (steps x batch_size x grad_accum_steps x max_seq_len)
    within the server's limits. A problem names the adapter's own `train` override when it has one,
    else the job's `train`, so a job-wide value is reported once."""
    problems: Problems = []
    for i, adapter in enumerate(spec.adapters):
        train = spec.adapter_train(i)
        own = adapter.train.model_dump(exclude_none=True) if adapter.train else {}
        tokens = train.steps * train.batch_size * train.grad_accum_steps * train.max_seq_len
        if train.steps > limits.max_steps:
            field = f"adapters.{i}.train.steps" if "steps" in own else "train.steps"
            problems.append(
                (
                    field,
                    f"{train.steps} steps is over this server's limit of {limits.max_steps}; train fewer "
                    "steps, or ask the admin to raise LORAFLEET_MAX_TRAIN_STEPS",
                )
            )
        elif tokens > limits.max_tokens:
            budget = ("steps", "batch_size", "grad_accum_steps", "max_seq_len")
            field = f"adapters.{i}.train" if own.keys() & set(budget) else "train"
            problems.append(
                (
                    field,
                    f"{tokens} tokens (steps {train.steps} x batch_size {train.batch_size} x "
                    f"grad_accum_steps {train.grad_accum_steps} x max_seq_len {train.max_seq_len}) is over "
                    f"this server's limit of {limits.max_tokens} per adapter; lower one of them, or ask "
                    "the admin to raise LORAFLEET_MAX_TOKENS_PER_ADAPTER",
                )
            )
    return list(dict.fromkeys(problems))


def within(path: Path, roots: Sequence[Path]) -> bool:
    """Whether `path`, with every symlink followed, lies inside one of `roots`."""
    real = path.expanduser().resolve()
    return any(real == root or root in real.parents for root in (r.resolve() for r in roots))


def outside_world_problems(
    raw: dict[str, Any],
    allowed: Allowed = ANYTHING,
    max_record_bytes: int = MAX_RECORD_BYTES,
    home: Path | None = None,
) -> Problems:
    """The base model (and tokenizer) and every data file of a raw spec whose paths are absolute. `home`
    holds the converted bases (catalogued names, GGUF files); default: `LORAFLEET_HOME`."""
    return [
        *model_problems("base_model", raw.get("base_model"), allowed, home),
        *model_problems("tokenizer", raw.get("tokenizer"), allowed, home),
        *data_problems(raw.get("adapters"), allowed, max_record_bytes),
    ]


def model_problems(field: str, value: Any, allowed: Allowed = ANYTHING, home: Path | None = None) -> Problems:
    """A catalogued base must be pulled; a local directory or .gguf file must hold a loadable config;
    anything else must look like a hub id."""
    if not isinstance(value, str) or not value:
        return []  # missing or mistyped: the schema reports it
    try:
        return _model_problems(field, value, allowed, home)
    except (RuntimeError, OSError, ValueError) as exc:  # `~nobody`, a NUL, a name too long or not encodable
        return [(field, unusable(value, exc))]


def _model_problems(field: str, value: str, allowed: Allowed, home: Path | None) -> Problems:
    path = Path(value).expanduser()
    if value in CATALOG:
        if allowed.models is not None and not any(fnmatch.fnmatchcase(value, p) for p in allowed.models):
            return [(field, f"base {value!r} is not among the models this server allows")]
        try:
            catalog_dir(CATALOG[value], home)
        except BaseModelError as exc:
            return [(field, str(exc))]
        return []
    if path.is_absolute() or value.startswith((".", "~")) or is_gguf_reference(value):
        if allowed.model_roots is not None and not within(path, allowed.model_roots):
            return [
                (
                    field,
                    f"local models must be inside the server's model roots ({_roots(allowed.model_roots)})",
                )
            ]
        if is_gguf_reference(value):
            if not path.is_file():
                return [(field, f"GGUF file {value!r} does not exist; give the path of a .gguf file")]
            return _config_problems(field, str(path), home)
        if not path.is_dir():
            return [
                (
                    field,
                    f"local model directory {value!r} does not exist; give a directory holding "
                    "config.json (as `save_pretrained` writes it) or a hub id like 'Qwen/Qwen2.5-0.5B'",
                )
            ]
        if field == "base_model":
            return _config_problems(field, str(path), home)
        return []
    if not HUB_ID.match(value):
        return [
            (
                field,
                f"{value[:200]!r} is neither an existing local directory nor a hub id like "
                "'Qwen/Qwen2.5-0.5B'",
            )
        ]
    if allowed.models is not None and not any(fnmatch.fnmatchcase(value, p) for p in allowed.models):
        return [
            (
                field,
                f"hub id {value!r} is not among the models this server allows ({', '.join(allowed.models)})",
            )
        ]
    return []


def _roots(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "none"


def _config_problems(field: str, path: str, home: Path | None) -> Problems:
    try:
        base_config(path, home)
    except Exception as exc:  # whatever transformers raises, the user needs its first line and a fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [
            (
                field,
                f"cannot load the model config in {path!r}: {first[:300]}; point `{field}` at a "
                "directory written by `save_pretrained` or a .gguf file",
            )
        ]
    return []


def data_problems(
    adapters: Any, allowed: Allowed = ANYTHING, max_record_bytes: int = MAX_RECORD_BYTES
) -> Problems:
    """Each data file exists and its first records parse (type, fields, values, size). On a server with
    data roots, a path outside them is refused before anything is read, with the same answer whether or
    not the file exists: a token must not be a way to probe the server's disk. A file many adapters
    share is read once."""
    if not isinstance(adapters, list):
        return []
    problems: Problems = []
    verdicts: dict[str, str | None] = {}  # path -> why it cannot be used (None: it can)
    for i, adapter in enumerate(adapters):
        data = adapter.get("data") if isinstance(adapter, dict) else None
        if not isinstance(data, dict):
            continue
        for key in ("path", "eval_path"):
            value = data.get(key)
            if not isinstance(value, str) or not value:
                continue
            try:
                if allowed.data_roots is not None and not within(Path(value), allowed.data_roots):
                    problems.append(
                        (
                            f"adapters.{i}.data.{key}",
                            "data files must be inside the server's data roots "
                            f"({_roots(allowed.data_roots)})",
                        )
                    )
                    continue
                if value not in verdicts:
                    verdicts[value] = _head_problem(value, max_record_bytes)
            except (RuntimeError, OSError, ValueError) as exc:  # as for models: a path that cannot be used
                verdicts[value] = unusable(value, exc)
            if verdicts[value] is not None:
                problems.append((f"adapters.{i}.data.{key}", str(verdicts[value])))
    return problems


def _head_problem(value: str, max_record_bytes: int) -> str | None:
    try:
        check_head(Path(value), max_record_bytes=max_record_bytes)
    except DataError as exc:
        return str(exc)
    except (RuntimeError, OSError, ValueError) as exc:
        return unusable(value, exc)
    return None


def unusable(value: str, exc: BaseException) -> str:
    """Why a path the user gave cannot be used at all, without echoing anything but the path itself."""
    if "\x00" in value:
        reason = "it contains a NUL character"
    elif isinstance(exc, RuntimeError):
        reason = "'~' names a user with no home directory here"
    else:
        reason = (getattr(exc, "strerror", None) or str(exc))[:200]
    return f"{value[:200]!r} is not a usable path: {reason}"
