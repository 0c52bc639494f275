"""bitsandbytes k-bit bases: a real run on CUDA; skipped, with the reason, where there is no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.conftest import TaskFactory
from workers.pack import run_pack
from workers.plan import PackPlan, StepEvent

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="bitsandbytes 8-bit/4-bit bases need a CUDA GPU; none is visible on this machine",
    ),
]


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_kbit_base_trains_a_pack_and_exports_a_peft_adapter(
    tiny_base: Path, make_task: TaskFactory, quantization: str
) -> None:
    pytest.importorskip("bitsandbytes", reason="install the CUDA extra: pip install 'lorafleet[cuda]'")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tasks = [
        make_task(skill, steps=30, batch_size=8, learning_rate=1e-2, lora={"target_modules": "all-linear"})
        for skill in ("counting", "colors")
    ]
    plan = PackPlan(
        base_model=str(tiny_base), quantization=quantization, dtype="bfloat16", device="cuda", adapters=tasks
    )
    events: list = []
    result = run_pack(plan, emit=events.append)
    assert {d.status for d in result.adapters.values()} == {"trained"}
    for task in tasks:
        losses = [e.loss for e in events if isinstance(e, StepEvent) and e.adapter == task.name]
        assert len(losses) == 30 and sum(losses[-5:]) < 0.7 * sum(losses[:5])

    bnb = (
        BitsAndBytesConfig(load_in_8bit=True)
        if quantization == "8bit"
        else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    )
    base = AutoModelForCausalLM.from_pretrained(
        tiny_base, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0}
    )
    peft_model = PeftModel.from_pretrained(base, Path(tasks[0].output_dir) / "final")
    ids = torch.randint(10, 500, (2, 16), device="cuda")
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
