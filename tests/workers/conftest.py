"""Engine test helpers: synthetic per-skill data and a small task factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from workers import storage
from workers.contract.plan import AdapterTask, DataConfig, EvalConfig, LoraConfig, PackPlan, TrainConfig
from workers.training.checkpoint import read_adapter
from workers.training.synthetic import SKILLS, write_skill_data


@pytest.fixture(scope="session")
def skill_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("skills")
    return {skill: write_skill_data(root / f"{skill}.jsonl", skill, 120) for skill in SKILLS}


TaskFactory = Callable[..., AdapterTask]


@pytest.fixture
def make_task(tmp_path: Path, skill_files: dict[str, Path]) -> TaskFactory:
    def make(
        name: str,
        skill: str | None = None,
        out: str = "out",
        lora: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        eval: dict[str, Any] | None = None,
        **train: Any,
    ) -> AdapterTask:
        train_cfg = {
            "steps": 20,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "max_seq_len": 48,
            "eval_every": 0,
            "checkpoint_every": 0,
            **train,
        }
        data_cfg = {"path": skill_files[skill or name], "eval_fraction": 0.1, **(data or {})}
        return AdapterTask(
            name=name,
            lora=LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **(lora or {})}),
            train=TrainConfig(**train_cfg),
            data=DataConfig(**data_cfg),
            # Short answers: every final eval generates, and a tiny random base never stops on its own.
            eval=EvalConfig(**{"max_new_tokens": 8, "max_examples": 4, **(eval or {})}),
            output_dir=tmp_path / out / name,
        )

    return make


def plan_of(base: Path, *tasks: AdapterTask) -> PackPlan:
    return PackPlan(base_model=str(base), device="cpu", adapters=list(tasks))


def final_weights(task: AdapterTask) -> dict[str, torch.Tensor]:
    files = read_adapter(storage.join(task.output_dir, "final"))  # a directory or an object store
    return {f"{p}.{m}": getattr(w, m) for p, w in files.weights.items() for m in ("lora_A", "lora_B")}


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
