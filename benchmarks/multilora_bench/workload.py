"""What the benchmark trains on: bases built from real model configs, data with real lengths, FLOPs.

Bases are random-init models of the shapes in `benchmarks/configs/*.json` (SmolLM2-135M, Qwen2.5-0.5B,
Llama-3.2-1B), saved and loaded back through `from_pretrained`, with a word-level tokenizer of exactly
the config's vocabulary (`workers.bases.tiny.build_base`): no weights are downloaded, and token ids are drawn
across the whole vocabulary, so the output head is as wide as the real model's.

Documents have log-normal lengths (median `MEDIAN_TOKENS`, sigma `SIGMA`), truncated at max_seq_len:
most are short, a long tail reaches the limit, as in instruction or chat data. That spread is what makes
padding expensive and packing worth it.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
MEDIAN_TOKENS = 150
SIGMA = 1.0
MIN_TOKENS = 8
DOCS_PER_ADAPTER = 256


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_config(name: str) -> dict[str, Any]:
    path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"unknown model config {name!r}; choose from {config_names()}")
    return json.loads(path.read_text())


def build_model(name: str, workdir: Path) -> Path:
    """The random-init base of config `name` under `workdir/models/` (built once, then reused)."""
    from workers.bases.tiny import build_base

    return build_base(workdir / "models" / name, load_config(name), save_dtype="bfloat16")


def document_lengths(n: int, max_seq_len: int, seed: int) -> list[int]:
    """`n` log-normal lengths (median MEDIAN_TOKENS), clipped to [MIN_TOKENS, max_seq_len]."""
    rng = random.Random(f"lengths:{seed}")
    mu = math.log(MEDIAN_TOKENS)
    return [min(max_seq_len, max(MIN_TOKENS, round(rng.lognormvariate(mu, SIGMA)))) for _ in range(n)]


def write_dataset(path: Path, vocab_size: int, max_seq_len: int, seed: int) -> Path:
    """Text records whose tokenization (bos + words + eos) has exactly the drawn lengths."""
    from workers.bases.tiny import FIRST_WORD_ID, word_text

    if path.exists():
        return path
    rng = random.Random(f"tokens:{seed}")
    lines = []
    for length in document_lengths(DOCS_PER_ADAPTER, max_seq_len, seed):
        ids = [rng.randrange(FIRST_WORD_ID, vocab_size) for _ in range(length - 2)]
        lines.append(json.dumps({"text": word_text(ids)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def adapter_names(k: int) -> list[str]:
    return [f"a{i:02d}" for i in range(k)]


@dataclass(frozen=True)
class FlopModel:
    """Useful FLOPs of one document of n tokens (see the report's notes)."""

    n_linear: int  # decoder linears + output head weights
    lora_rank_dims: int  # sum over targeted linears of r * (d_in + d_out)
    n_layers: int
    d_attn: int

    def sequence_flops(self, n_tokens: int) -> float:
        per_token = 4 * self.n_linear + 6 * self.lora_rank_dims
        return n_tokens * per_token + 12 * self.n_layers * self.d_attn * n_tokens**2


def flop_model(base_dir: str, targets: tuple[str, ...] | str, r: int) -> FlopModel:
    """Count linear weights and LoRA shapes on a meta-device copy of the base (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.engine.multilora import resolve_target_modules

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lora = resolve_target_modules(model, list(targets) if isinstance(targets, tuple) else targets)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopModel(
        n_linear=sum(m.weight.numel() for m in linears.values()),
        lora_rank_dims=sum(r * (linears[p].in_features + linears[p].out_features) for p in lora),
        n_layers=config.num_hidden_layers,
        d_attn=config.num_attention_heads * head_dim,
    )


def draw_batches(
    names: tuple[str, ...],
    data_paths: tuple[str, ...],
    tokenizer: Any,
    *,
    steps: int,
    batch_size: int,
    max_seq_len: int,
    seed: int,
) -> dict[str, list[list[Any]]]:
    """Each adapter's micro-batch per step, drawn exactly as the engine draws them (same SampleStream)."""
    from workers.contract.plan import DataConfig
    from workers.training.data import SampleStream, load_adapter_data

    batches: dict[str, list[list[Any]]] = {}
    for name, path in zip(names, data_paths, strict=True):
        data = load_adapter_data(DataConfig(path=Path(path)), tokenizer, max_seq_len, seed, name)
        stream = SampleStream(len(data.train), seed, name)
        batches[name] = [[data.train[i] for i in stream.next_indices(batch_size)] for _ in range(steps)]
    return batches
