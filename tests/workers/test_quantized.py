"""bitsandbytes k-bit bases (nf4 4-bit, int8 8-bit): on CPU everywhere, and the same run on CUDA where a GPU
is visible. The multi-LoRA layer wraps bitsandbytes' Linear4bit/Linear8bitLt like any nn.Linear; these
tests hold it to what the full-precision engine promises: adapters learn, a pack changes nothing about an
adapter's result, and the exported adapter loads with PEFT on a k-bit base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.conftest import TaskFactory, final_weights, max_weight_diff
from workers.contract.plan import LoraConfig, PackPlan, StepEvent
from workers.engine.model import load_base
from workers.engine.multilora import MultiLoraModel
from workers.training.pack import run_pack

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dependency: pip install -e .")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")  # its bf16->fp16 cast, per call

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible on this machine"),
    ],
)


def _plan(base: Path, quantization: str, device: str, *tasks) -> PackPlan:
    return PackPlan(
        base_model=str(base), quantization=quantization, dtype="bfloat16", device=device, adapters=list(tasks)
    )


def _bnb_config(quantization: str):
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_kbit_base_trains_a_pack_and_exports_a_peft_adapter(
    tiny_base: Path, make_task: TaskFactory, quantization: str, device: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    steps = 16
    tasks = [
        make_task(skill, steps=steps, batch_size=8, learning_rate=2e-2, lora={"target_modules": "all-linear"})
        for skill in ("counting", "colors")
    ]
    events: list = []
    result = run_pack(_plan(tiny_base, quantization, device, *tasks), emit=events.append)
    assert {d.status for d in result.adapters.values()} == {"trained"}
    for task in tasks:
        losses = [e.loss for e in events if isinstance(e, StepEvent) and e.adapter == task.name]
        assert len(losses) == steps and sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses

    base = AutoModelForCausalLM.from_pretrained(
        tiny_base,
        quantization_config=_bnb_config(quantization),
        dtype=torch.bfloat16,
        device_map={"": device},
    )
    ids = torch.randint(10, 500, (2, 16), device=device)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, Path(tasks[0].output_dir) / "final")
        after = peft_model(input_ids=ids).logits
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-2  # the adapter is applied


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_on_a_kbit_base_each_segment_computes_as_if_alone(tiny_base: Path, quantization: str) -> None:
    """Forward: bitsandbytes quantises activations per row (8-bit) or dequantises weights (4-bit), so rows
    do not see each other; packed logits equal each adapter's alone exactly."""
    model = MultiLoraModel(
        load_base(str(tiny_base), quantization=quantization, dtype="bfloat16", device="cpu").model
    )
    for seed, name in enumerate("ab"):
        model.add_adapter(name, LoraConfig(r=4, alpha=8.0, target_modules="all-linear"), seed=0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weights in model.adapters[name].modules.values():
                weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * 0.05)
    ids = torch.randint(10, 500, (6, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model(ids, None, [("a", 0, 2), ("b", 2, 4), (None, 4, 6)])
        alone = [
            model(ids[0:2], None, [("a", 0, 2)]),
            model(ids[2:4], None, [("b", 0, 2)]),
            model(ids[4:6], None, []),
        ]
    assert torch.equal(packed, torch.cat(alone))
    assert (alone[0] - model(ids[0:2], None, [])).abs().max() > 1e-2


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_kbit_pack_trains_each_adapter_as_it_trains_alone(
    tiny_base: Path, make_task: TaskFactory, quantization: str
) -> None:
    """Training: the same weights whether an adapter trains alone or beside another of another rank."""
    alone = make_task("counting", out="alone", steps=6, lora={"dropout": 0.1})
    run_pack(_plan(tiny_base, quantization, "cpu", alone))
    pack = [
        make_task("counting", out="pack", steps=6, lora={"dropout": 0.1}),
        make_task("colors", out="pack", steps=6, lora={"r": 8, "alpha": 8}),
    ]
    run_pack(_plan(tiny_base, quantization, "cpu", *pack))
    assert max_weight_diff(final_weights(alone), final_weights(pack[0])) <= 1e-5  # measured: 0.0 on CPU
