"""What a submission must pass before anything is stored: the checks that need the outside world.

They run on the raw spec (a mapping), not on a validated `JobSpec`, so that a spec with schema errors
still has its files and base model checked, and the user gets every problem in one answer instead of
fixing them in rounds. Each check returns (field, message) problems; none raises.

What cannot be known here fails later, once, for that job alone: a hub id that does not resolve, a bad
record deep in a large file, running out of memory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from workers.data import DataError, check_head

# A hub id: `name` or `owner/name` (letters, digits, '.', '_', '-'), as the Hugging Face Hub allows.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
Problems = list[tuple[str, str]]


def outside_world_problems(raw: dict[str, Any]) -> Problems:
    """The base model (and tokenizer) and every data file of a raw spec whose paths are absolute."""
    return [
        *model_problems("base_model", raw.get("base_model")),
        *model_problems("tokenizer", raw.get("tokenizer")),
        *data_problems(raw.get("adapters")),
    ]


def model_problems(field: str, value: Any) -> Problems:
    """A local directory must hold a loadable config; anything else must look like a hub id."""
    if not isinstance(value, str) or not value:
        return []  # missing or mistyped: the schema reports it
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith((".", "~")):
        if not path.is_dir():
            return [
                (
                    field,
                    f"local model directory {value!r} does not exist; give a directory holding "
                    "config.json (as `save_pretrained` writes it) or a hub id like 'Qwen/Qwen2.5-0.5B'",
                )
            ]
        if field == "base_model":
            return _config_problems(field, path)
        return []
    if not HUB_ID.match(value):
        return [
            (
                field,
                f"{value!r} is neither an existing local directory nor a hub id like 'Qwen/Qwen2.5-0.5B'",
            )
        ]
    return []


def _config_problems(field: str, path: Path) -> Problems:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # whatever transformers raises, the user needs its first line and a fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [
            (
                field,
                f"cannot load the model config in {str(path)!r}: {first[:300]}; point `{field}` at a "
                "directory written by `save_pretrained`",
            )
        ]
    return []


def data_problems(adapters: Any) -> Problems:
    """Each data file exists and its first records parse (type, fields, values)."""
    if not isinstance(adapters, list):
        return []
    problems: Problems = []
    for i, adapter in enumerate(adapters):
        data = adapter.get("data") if isinstance(adapter, dict) else None
        if not isinstance(data, dict):
            continue
        for key in ("path", "eval_path"):
            value = data.get(key)
            if not isinstance(value, str) or not value:
                continue
            try:
                check_head(Path(value))
            except DataError as exc:
                problems.append((f"adapters.{i}.data.{key}", str(exc)))
    return problems
