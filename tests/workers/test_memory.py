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
    default_pass_tokens,
    model_info_from_config,
    pass_memory_bytes,
)
from workers.bases.tiny import FIRST_WORD_ID, build_base, word_text

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
    from workers.contract.plan import AdapterTask, DataConfig, LoraConfig, PackPlan, TrainConfig

    base, data = smol4
    targets = ["q_proj", "v_proj"]
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
                lora=LoraConfig(r=16, alpha=16, target_modules=targets),
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
    demand = AdapterDemand("a", "p", key, 0, 0, 16, tuple(targets), BATCH, SEQ, False, pass_tokens=passes)
    pack = base_memory_bytes(key, info) + pass_memory_bytes(demand, info, checkpointing)
    estimate = pack + K * adapter_memory_bytes(demand, info, checkpointing)
    ratio = estimate / measured
    mib = f"estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
    print(f"checkpointing={checkpointing}: {mib}, ratio {ratio:.3f}")
    assert 1.0 <= ratio <= TOLERANCE, f"estimate / measured peak RSS = {ratio:.3f} ({mib})"
