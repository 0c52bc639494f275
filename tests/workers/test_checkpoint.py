"""Our checkpoints are PEFT adapters, both ways, and writes are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from workers.contract import plan
from workers.engine.multilora import MultiLoraModel, linear_module_names
from workers.training import checkpoint as ckpt


def _base(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _ids() -> torch.Tensor:
    return torch.randint(10, 500, (3, 16), generator=torch.Generator().manual_seed(7))


def _trained_looking(model: MultiLoraModel, name: str, **kw) -> None:
    model.add_adapter(name, plan.LoraConfig(dropout=0.0, **kw), seed=0)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for weights in model.adapters[name].modules.values():
            weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * 0.05)


def _write(model: MultiLoraModel, name: str, dest: Path | str, base: Path, **kw) -> Path:
    return Path(
        ckpt.write_checkpoint(
            dest,
            model.adapters[name],
            base_model=str(base),
            all_linear_paths=linear_module_names(model.base),
            **kw,
        )
    )


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_export_loads_in_peft_with_the_same_logits(tiny_base: Path, tmp_path: Path, targets) -> None:
    ours = MultiLoraModel(_base(tiny_base))
    _trained_looking(ours, "billing", r=4, alpha=8.0, target_modules=targets)
    out = _write(ours, "billing", tmp_path / "billing", tiny_base)
    expected = ours(_ids(), None, [("billing", 0, 3)])

    config = json.loads((out / ckpt.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    peft_model = PeftModel.from_pretrained(_base(tiny_base), out)
    peft_model.eval()
    got = peft_model(input_ids=_ids()).logits
    assert float((got - expected).abs().max()) <= 1e-5


def test_peft_made_adapter_loads_into_our_model(tiny_base: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(_base(tiny_base), config)
    peft_model.eval()
    expected = peft_model(input_ids=_ids()).logits
    peft_model.save_pretrained(tmp_path / "made-by-peft")

    files = ckpt.read_adapter(tmp_path / "made-by-peft")
    assert files.lora == plan.LoraConfig(r=8, alpha=32.0, dropout=0.0, target_modules=["k_proj", "up_proj"])
    ours = MultiLoraModel(_base(tiny_base))
    ckpt.attach_frozen(ours, "imported", files)
    got = ours(_ids(), None, [("imported", 0, 3)])
    assert float((got - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    "lora",
    [
        plan.LoraConfig(),
        plan.LoraConfig(r=16, alpha=12.5, dropout=0.1, target_modules=["k_proj", "o_proj", "q_proj"]),
        plan.LoraConfig(r=3, alpha=1.0, target_modules="all-linear"),
    ],
)
def test_our_lora_config_round_trips_through_peft(lora: plan.LoraConfig, tmp_path: Path) -> None:
    """Ours -> PEFT's -> ours, every field, in memory and through PEFT's own `adapter_config.json`."""
    assert ckpt.lora_config(ckpt.peft_config(lora)) == lora
    ckpt.peft_config(lora, base_model="models/tiny").save_pretrained(str(tmp_path))
    saved = LoraConfig.from_pretrained(str(tmp_path))
    assert ckpt.lora_config(saved) == lora
    assert (saved.base_model_name_or_path, saved.task_type, saved.bias) == (
        "models/tiny",
        "CAUSAL_LM",
        "none",
    )


def test_peft_targets_come_back_sorted_or_named_by_the_saved_modules() -> None:
    """PEFT keeps list targets as a set; a regular expression comes back as the saved modules' names."""
    unordered = plan.LoraConfig(target_modules=["v_proj", "q_proj"])
    assert ckpt.lora_config(ckpt.peft_config(unordered)).target_modules == ["q_proj", "v_proj"]
    regex = LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj")
    saved = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert ckpt.lora_config(regex, saved) == plan.LoraConfig(
        r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]
    )
    with pytest.raises(ckpt.CheckpointError, match=r"rank_pattern"):
        ckpt.lora_config(LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 8}))


def test_unsupported_peft_options_are_a_clear_error(tiny_base: Path, tmp_path: Path) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    get_peft_model(_base(tiny_base), config).save_pretrained(tmp_path / "dora")
    with pytest.raises(ckpt.CheckpointError, match=r"use_dora"):
        ckpt.read_adapter(tmp_path / "dora")
    with pytest.raises(ckpt.CheckpointError, match=r"has no adapter_config.json"):
        ckpt.read_adapter(tmp_path)


def test_crash_mid_write_keeps_the_previous_checkpoint(tiny_base: Path, tmp_path: Path, monkeypatch) -> None:
    model = MultiLoraModel(_base(tiny_base))
    _trained_looking(model, "a", r=4, alpha=8.0, target_modules=["q_proj"])
    dest = tmp_path / "run" / "final"
    _write(model, "a", dest, tiny_base, training_state={"step": 1}, meta={"step": 1})
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    with torch.no_grad():
        for t in model.adapters["a"].parameters():
            t.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)  # dies after the adapter files, before the state
    with pytest.raises(OSError, match="disk full"):
        _write(model, "a", dest, tiny_base, training_state={"step": 2}, meta={"step": 2})
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["final"]  # no temp dir left behind


def test_checkpoint_listing_and_pruning(tiny_base: Path, tmp_path: Path) -> None:
    model = MultiLoraModel(_base(tiny_base))
    _trained_looking(model, "a", r=2, alpha=2.0, target_modules=["q_proj"])
    for step in (5, 10, 15):
        _write(model, "a", ckpt.checkpoint_dir(tmp_path, step), tiny_base, training_state={"step": step})
    (tmp_path / ".tmp-checkpoint-00000020-dead").mkdir()  # a crashed writer's leftovers are never listed
    assert [Path(p).name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-00000005",
        "checkpoint-00000010",
        "checkpoint-00000015",
    ]
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_dir(tmp_path, 15)
    assert len(ckpt.list_checkpoints(tmp_path)) == 2
    assert ckpt.read_training_state(ckpt.latest_checkpoint(tmp_path))["step"] == 15
