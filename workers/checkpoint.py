"""Adapter checkpoints in PEFT's own layout, written atomically, plus the state needed to resume exactly.

A checkpoint directory holds:
  adapter_config.json          written by `peft.LoraConfig.save_pretrained`
  adapter_model.safetensors    keys `base_model.model.<module path>.lora_{A,B}.weight` (no adapter name)
  training_state.pt            optimizer, scheduler, data position, dropout RNG (absent for exports)
  lorafleet.json               who wrote it: adapter name, step, base model, data fingerprint

`peft.PeftModel.from_pretrained(base, dir)` loads it as is. `peft_key`/`parse_peft_key` are the one key
mapping, so saving and loading are symmetric by construction.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from workers.multilora import Adapter, LoraWeights

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_STATE = "training_state.pt"
META = "lorafleet.json"
FINAL_DIR = "final"
_PREFIX = "base_model.model."
_CHECKPOINT_PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, or uses PEFT features we cannot load."""


def peft_key(module_path: str, matrix: str) -> str:
    return f"{_PREFIX}{module_path}.{matrix}.weight"


def parse_peft_key(key: str) -> tuple[str, str]:
    """`base_model.model.<path>.lora_A.weight` -> (path, 'lora_A')."""
    if not key.startswith(_PREFIX) or not key.endswith(".weight"):
        raise CheckpointError(f"unexpected tensor key {key!r} in a PEFT LoRA adapter")
    path, _, matrix = key[len(_PREFIX) : -len(".weight")].rpartition(".")
    if matrix not in ("lora_A", "lora_B"):
        raise CheckpointError(f"unsupported tensor {key!r}: only LoRA A/B matrices of linears are supported")
    return path, matrix


@dataclass(frozen=True)
class AdapterFiles:
    """What `read_adapter` found: the hyper-parameters and the weights per module path."""

    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | str
    base_model: str | None
    weights: dict[str, LoraWeights]


def _target_names(paths: list[str]) -> list[str]:
    """The shortest `target_modules` that PEFT will resolve back to exactly `paths`."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def _write_adapter_files(
    directory: Path, adapter: Adapter, base_model: str, all_linear_paths: list[str]
) -> None:
    from peft import LoraConfig

    paths = sorted(adapter.modules)
    names = _target_names(paths)
    # Suffix names are what people write; fall back to full paths where names would catch more modules.
    caught = [p for p in all_linear_paths if p.rsplit(".", 1)[-1] in names]
    targets = names if sorted(caught) == paths else paths
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(directory))
    tensors = {}
    for path, weights in adapter.modules.items():
        tensors[peft_key(path, "lora_A")] = weights.lora_A.detach().to("cpu").contiguous()
        tensors[peft_key(path, "lora_B")] = weights.lora_B.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _fsync_tree(directory: Path) -> None:
    for item in directory.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def write_checkpoint(
    dest: Path,
    adapter: Adapter,
    *,
    base_model: str,
    all_linear_paths: list[str],
    training_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a full checkpoint at `dest` atomically: readers see the old one or the new one, never half."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_adapter_files(tmp, adapter, base_model, all_linear_paths)
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE)
        (tmp / META).write_text(json.dumps({"adapter": adapter.name, **(meta or {})}, indent=2, default=str))
        _fsync_tree(tmp)
        if dest.exists():
            old = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_adapter(directory: Path) -> AdapterFiles:
    """Load a PEFT LoRA adapter directory (ours or made by PEFT) into per-module A/B weights."""
    from peft import LoraConfig

    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise CheckpointError(f"adapter directory {str(directory)!r} has no {name}")
    config = LoraConfig.from_pretrained(str(directory))
    unsupported = {
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
        "rank_pattern": bool(config.rank_pattern),
        "alpha_pattern": bool(config.alpha_pattern),
        "modules_to_save": bool(config.modules_to_save),
        "fan_in_fan_out": config.fan_in_fan_out,
        "bias": config.bias != "none",
    }
    used = [field for field, on in unsupported.items() if on]
    if used:
        raise CheckpointError(
            f"adapter {str(directory)!r} uses PEFT options lorafleet does not train: {used}; "
            "re-export it as a plain LoRA (uniform r/alpha, no DoRA/rsLoRA, bias 'none')"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(directory / ADAPTER_WEIGHTS)).items():
        path, matrix = parse_peft_key(key)
        pairs.setdefault(path, {})[matrix] = tensor
    incomplete = [p for p, m in pairs.items() if set(m) != {"lora_A", "lora_B"}]
    if incomplete:
        raise CheckpointError(f"adapter {str(directory)!r} lacks A or B for modules {incomplete[:3]}")
    targets = config.target_modules
    return AdapterFiles(
        r=config.r,
        alpha=float(config.lora_alpha),
        dropout=float(config.lora_dropout),
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        base_model=config.base_model_name_or_path,
        weights={p: LoraWeights(m["lora_A"], m["lora_B"]) for p, m in pairs.items()},
    )


def read_training_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{str(directory)!r} has no {TRAINING_STATE}: it is an export, not a resumable checkpoint"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / META
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{_CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete intermediate checkpoints, oldest first (temp dirs are dot-prefixed and never listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(_CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for stale in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
