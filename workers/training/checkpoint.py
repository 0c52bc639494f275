"""Adapter checkpoints in PEFT's own layout, written atomically, plus the state needed to resume exactly.

A checkpoint directory holds:
  adapter_config.json          written by `peft.LoraConfig.save_pretrained`
  adapter_model.safetensors    keys `base_model.model.<module path>.lora_{A,B}.weight` (no adapter name)
  training_state.pt            optimizer, scheduler, data position, dropout RNG (absent for exports)
  lorafleet.json               who wrote it: adapter name, step, base model, data fingerprint

`peft.PeftModel.from_pretrained(base, dir)` loads it as is. A checkpoint lives in a directory or under an
object-store prefix (`workers.storage`); its `lorafleet.json` is written last and marks it complete.
`peft_key`/`parse_peft_key` are the one key mapping, so saving and loading are symmetric by construction.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from workers import storage
from workers.contract.plan import LoraConfig
from workers.engine.adapters import Adapter, LoraWeights
from workers.engine.multilora import MultiLoraModel

if TYPE_CHECKING:
    import peft

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
    """What `read_adapter` found: the adapter's `LoraConfig` (read back from PEFT's by `lora_config`),
    the base it names and the weights per module path."""

    lora: LoraConfig
    base_model: str | None
    weights: dict[str, LoraWeights]


def attach_frozen(model: MultiLoraModel, name: str, files: AdapterFiles) -> None:
    """Attach a saved adapter to `model` under `name` for inference (no dropout): how serving, a child's
    parent at its final eval, and tests load one. Its modules are the paths it was saved with."""
    lora = files.lora.model_copy(update={"dropout": 0.0, "target_modules": sorted(files.weights)})
    model.add_adapter(name, lora, seed=0, init=files.weights)


def peft_config(lora: LoraConfig, base_model: str | None = None) -> peft.LoraConfig:
    """PEFT's `LoraConfig` for ours: the one place it is built (checkpoints write it, and with them every
    export), so that `PeftModel.from_pretrained` loads what we trained; `lora_config` reads it back."""
    import peft

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def lora_config(config: peft.LoraConfig, modules: Iterable[str] = (), where: str = "adapter") -> LoraConfig:
    """Ours from PEFT's (`peft_config`'s inverse, and the one way an adapter's rank, alpha, dropout and
    targets are read from a file), refusing PEFT features lorafleet does not train. PEFT keeps list
    targets as a set: they come back sorted. Targets PEFT matches by regular expression come back as the
    module names of `modules` (the saved weights' paths), which select the same linears."""
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
            f"{where} uses PEFT options lorafleet does not train: {used}; "
            "re-export it as a plain LoRA (uniform r/alpha, no DoRA/rsLoRA, bias 'none')"
        )
    targets = config.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = _target_names(list(modules)) or targets
    try:
        return LoraConfig(
            r=config.r,
            alpha=float(config.lora_alpha),
            dropout=float(config.lora_dropout),
            target_modules=targets if isinstance(targets, str) else sorted(targets or ()),
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"{where} has a LoRA config lorafleet cannot train: {problems}") from None


def _target_names(paths: list[str]) -> list[str]:
    """The shortest `target_modules` that PEFT will resolve back to exactly `paths`."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def _write_adapter_files(
    directory: Path, adapter: Adapter, base_model: str, all_linear_paths: list[str]
) -> None:
    paths = sorted(adapter.modules)
    names = _target_names(paths)
    # Suffix names are what people write; fall back to full paths where names would catch more modules.
    caught = [p for p in all_linear_paths if p.rsplit(".", 1)[-1] in names]
    targets = names if sorted(caught) == paths else paths
    lora = adapter.lora.model_copy(update={"target_modules": targets})
    peft_config(lora, base_model).save_pretrained(str(directory))
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
    dest: str | os.PathLike[str],
    adapter: Adapter,
    *,
    base_model: str,
    all_linear_paths: list[str],
    training_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> str:
    """Write a full checkpoint at `dest` (a path or an object-store URI) all or nothing: readers see the
    old one or the new one, never half (`storage.publish`, with `lorafleet.json` as the marker)."""
    stage = storage.staging_dir(dest)
    try:
        _write_adapter_files(stage, adapter, base_model, all_linear_paths)
        if training_state is not None:
            torch.save(training_state, stage / TRAINING_STATE)
        stamp = {"adapter": adapter.name, **(meta or {})}
        (stage / META).write_text(json.dumps(stamp, indent=2, default=str))
        if not storage.is_remote(dest):  # a local rename must not publish unwritten data; uploads are whole
            _fsync_tree(stage)
        storage.publish(stage, dest, marker=META)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return os.fspath(dest)


def is_complete(directory: str | os.PathLike[str]) -> bool:
    """A checkpoint we wrote, whole (its marker is written last)."""
    return storage.is_file(storage.join(directory, META))


def read_adapter(directory: str | os.PathLike[str]) -> AdapterFiles:
    """Load a PEFT LoRA adapter directory (ours or made by PEFT, local or in object storage) into
    per-module A/B weights."""
    with storage.local_copy(directory) as local:
        return _read_adapter(local, os.fspath(directory))


def _read_adapter(local: Path, directory: str) -> AdapterFiles:
    import peft

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (local / name).is_file():
            raise CheckpointError(f"adapter directory {directory!r} has no {name}")
    config = peft.LoraConfig.from_pretrained(str(local))
    tensors = load_file(str(local / ADAPTER_WEIGHTS))
    suffix = ".lora_A.weight"
    saved = [k[len(_PREFIX) : -len(suffix)] for k in tensors if k.startswith(_PREFIX) and k.endswith(suffix)]
    lora = lora_config(config, saved, where=f"adapter {directory!r}")  # PEFT options we refuse, first
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, matrix = parse_peft_key(key)
        pairs.setdefault(path, {})[matrix] = tensor
    incomplete = [p for p, m in pairs.items() if set(m) != {"lora_A", "lora_B"}]
    if incomplete:
        raise CheckpointError(f"adapter {directory!r} lacks A or B for modules {incomplete[:3]}")
    return AdapterFiles(
        lora=lora,
        base_model=config.base_model_name_or_path,
        weights={p: LoraWeights(m["lora_A"], m["lora_B"]) for p, m in pairs.items()},
    )


def read_training_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    location = storage.join(directory, TRAINING_STATE)
    if not storage.is_file(location):
        raise CheckpointError(
            f"{os.fspath(directory)!r} has no {TRAINING_STATE}: it is an export, not a resumable checkpoint"
        )
    return torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu", weights_only=True)


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    location = storage.join(directory, META)
    return json.loads(storage.read_bytes(location)) if storage.is_file(location) else {}


def checkpoint_dir(output_dir: str | os.PathLike[str], step: int) -> str:
    return storage.join(output_dir, f"{_CHECKPOINT_PREFIX}{step:08d}")


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[str]:
    """Complete intermediate checkpoints, oldest first: those with their marker (staging dirs are
    dot-prefixed, and an upload cut short has no marker, so neither is ever listed)."""
    steps = []
    for relative in storage.files(output_dir):
        top, _, rest = relative.partition("/")
        if rest == META and top.startswith(_CHECKPOINT_PREFIX) and top[len(_CHECKPOINT_PREFIX) :].isdigit():
            steps.append(int(top[len(_CHECKPOINT_PREFIX) :]))
    return [checkpoint_dir(output_dir, step) for step in sorted(steps)]


def stored_steps(output_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(step, directory) of each complete intermediate checkpoint, oldest first."""
    prefix = storage.join(output_dir, _CHECKPOINT_PREFIX)
    return [(int(path[len(prefix) :]), path) for path in list_checkpoints(output_dir)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(output_dir: str | os.PathLike[str], keep: int) -> None:
    for stale in list_checkpoints(output_dir)[:-keep]:
        storage.remove(stale)
