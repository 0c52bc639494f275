"""The scheduler's memory model against the peak RSS of a real pack run (CPU, fresh process).

A SmolLM2-135M-shaped base cut to 4 layers (hidden 576, MLP 1536, 9 heads / 3 KV heads, the real 49,152
vocabulary, tied head) trains a pack of two adapters on 256-token documents, so each pass (the CPU
default: 1,024 tokens, one adapter's step) holds exactly the tokens the estimate assumes. The estimate
must not be below the measured peak (placement relies on it) and not more than `TOLERANCE` above it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.scheduling.scheduler import (
    AdapterDemand,
    BaseKey,
    adapter_memory_bytes,
    base_memory_bytes,
    pass_memory_bytes,
)
from workers.bases.tiny import FIRST_WORD_ID, build_base, word_text
from workers.contract import memory
from workers.contract.memory import default_pass_tokens, model_info_from_config
from workers.contract.plan import LoraConfig

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1.25
CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
}
K, BATCH, SEQ, STEPS = 2, 4, 256, 2

RUN = """
import json, sys
from pathlib import Path
import torch
from workers.training.pack import run_pack
from workers.contract.plan import PackPlan
torch.set_num_threads(2)
result = run_pack(PackPlan.model_validate_json(sys.argv[1]))
assert all(d.status == "trained" for d in result.adapters.values()), result
status = Path("/proc/self/status").read_text().splitlines()
print(json.dumps({"peak": int(next(l for l in status if l.startswith("VmHWM:")).split()[1]) * 1024}))
"""


@pytest.fixture(scope="module")
def smol4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("smol4")
    base = build_base(root / "base", CONFIG)
    rng = random.Random(0)
    lines = [
        json.dumps({"text": word_text([rng.randrange(FIRST_WORD_ID, 49152) for _ in range(SEQ - 2)])})
        for _ in range(24)
    ]
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return base, data


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_bounds_the_measured_peak_rss(
    smol4: tuple[Path, Path], tmp_path: Path, checkpointing: bool
) -> None:
    from workers.contract.plan import AdapterTask, DataConfig, PackPlan, TrainConfig

    base, data = smol4
    lora = LoraConfig(r=16, alpha=16, target_modules=["q_proj", "v_proj"])
    train = TrainConfig(
        steps=STEPS, batch_size=BATCH, max_seq_len=SEQ, eval_every=0, checkpoint_every=0, seed=0
    )
    plan = PackPlan(
        base_model=str(base),
        device="cpu",
        activation_checkpointing="on" if checkpointing else "off",
        adapters=[
            AdapterTask(
                name=f"a{k}",
                lora=lora,
                train=train,
                data=DataConfig(path=data),
                output_dir=tmp_path / f"a{k}",
            )
            for k in range(K)
        ],
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RUN, plan.model_dump_json()],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]

    key = BaseKey(str(base), "none", "float32")
    info = model_info_from_config(json.loads((base / "config.json").read_text()))
    passes = default_pass_tokens(False, None, K * BATCH * SEQ)  # the engine's CPU default
    demand = AdapterDemand("a", "p", key, 0, 0, lora, BATCH, SEQ, False, pass_tokens=passes)
    pack = base_memory_bytes(key, info) + pass_memory_bytes(demand, info, checkpointing)
    estimate = pack + K * adapter_memory_bytes(demand, info, checkpointing)
    ratio = estimate / measured
    mib = f"estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
    print(f"checkpointing={checkpointing}: {mib}, ratio {ratio:.3f}")
    assert 1.0 <= ratio <= TOLERANCE, f"estimate / measured peak RSS = {ratio:.3f} ({mib})"


# ---- one model, two callers ----

LORAS = [
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=8, alpha=8.0, target_modules="all-linear"),
    LoraConfig(r=2, target_modules=["self_attn.o_proj", "down_proj"]),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_and_the_scheduler_size_a_pack_alike(tiny_base: Path, dtype: str) -> None:
    """Same base, same `LoraConfig`s: the scheduler (from `config.json` and the configs) and the engine
    (from the loaded model and the adapters it built) read one shape, count the same LoRA parameters,
    kept inputs and base weights, and so estimate the same pass; the scheduler's byte numbers are the
    memory model's."""
    from workers.engine.model import load_base
    from workers.training.trainer import PackTrainer

    loaded = load_base(str(tiny_base), dtype=dtype, device="cpu")
    trainer = PackTrainer(loaded, str(tiny_base), emit=lambda e: None, pack_id="m", memory_budget_bytes=2**40)
    adapters = [trainer.model.add_adapter(f"a{k}", lora, seed=0) for k, lora in enumerate(LORAS)]
    info = model_info_from_config(json.loads((tiny_base / "config.json").read_text()))
    assert trainer._info == info  # one parser, one set of defaults

    for lora, adapter in zip(LORAS, adapters, strict=True):
        assert memory.lora_param_count(info, lora) == sum(p.numel() for p in adapter.parameters())
        assert memory.LoraInputs.of(lora.target_modules) == memory.LoraInputs.of(list(adapter.modules))
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert memory.base_weight_bytes(info, "none", dtype) == weights

    tokens, width = 3 * 96, 96
    kept = memory.LoraInputs()
    for lora in LORAS:
        kept = kept | memory.LoraInputs.of(lora.target_modules)
    from_configs = memory.pass_bytes(
        info,
        dtype,
        tokens=tokens,
        width=0 if trainer._varlen else width,
        checkpointing=False,
        lora=kept,
        lora_params=sum(memory.lora_param_count(info, lora) for lora in LORAS),
        cpu=True,
    )
    assert trainer.pass_estimate(adapters, tokens, width) == from_configs

    key = BaseKey(str(tiny_base), "none", dtype)
    assert base_memory_bytes(key, info) == memory.base_bytes(info, "none", dtype)
    for lora in LORAS:
        demand = AdapterDemand("a", "p", key, 0, 0, lora, 3, width, False)
        params = memory.lora_param_count(info, lora)
        activations = memory.activation_bytes(
            info,
            dtype,
            tokens=tokens,
            width=width,
            checkpointing=False,
            targets=lora.target_modules,
            cpu=True,
        )
        assert (
            adapter_memory_bytes(demand, info)
            == memory.lora_bytes_per_param(dtype, True) * params + activations
        )
