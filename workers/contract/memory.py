"""How much memory a pack step takes: the engine's model of itself, in plain numbers (no torch).

Two callers share it: the engine (`activation_checkpointing: auto` turns checkpointing on for a pass that
would not fit the worker's budget without it) and the scheduler (`orchestrator/scheduling/scheduler.py` places
adapters on workers by the same numbers).

Per token, measured on the engine (saved-tensor bytes of a real forward, `tests/workers/test_memory.py`
checks the total against a real run's peak RSS):

- **A decoder layer keeps** `SAVED_HIDDEN` x hidden values in the compute dtype (q, the repeated k/v of
  grouped-query attention, the attention output, norm outputs), `SAVED_HIDDEN_FP32` x hidden in fp32 (the
  RMSNorms' upcast inputs) and `SAVED_INTERMEDIATE` x intermediate in the compute dtype (the MLP's gate,
  up and activation). LoRA on `o_proj` / `down_proj` also keeps those layers' inputs (one hidden / one
  intermediate more); LoRA on q/k/v/gate/up reuses the norm output that is kept anyway.
- **With activation checkpointing** a layer keeps only its input (hidden values), and two layers' full sets
  exist at a time: the one being recomputed and what is left of the one just back-propagated.
- **Backward** holds one layer's gradients at a time: about one layer's kept set.
- **Outside the layers**: the final norm and the head's input (`SAVED_OUTSIDE_FP32` x hidden, fp32), and
  the block-diagonal attention mask of packed rows (one byte per query-key pair: `width` per token).
- **The head** runs in chunks of target tokens (`workers.engine.head`), so logits cost one chunk (fp32 logits,
  logsumexp's temporary, the head-dtype matmul output), never tokens x vocabulary.
- **On CPU**, glibc's malloc keeps freed temporaries resident (its mmap threshold grows as large blocks
  are freed), which measured as about `CPU_FRAGMENTATION` x one layer's kept set per layer and token,
  with activation checkpointing as without (we once halved it there: a 4-layer pack then peaked 1.2% over
  its estimate, and a 30-layer pack of 1 at exactly its estimate).
- **Once per worker**, `RUNTIME_OVERHEAD_BYTES`: Python, torch, transformers and the tokenizer loaded
  (390 MiB resident on CPU), data and allocator slack; on a GPU it covers the CUDA context instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CPU_PASS_TOKENS = 1024
"""Default pass size on CPU (`workers.training.trainer.adapter_passes`): a CPU's matmuls are as fast at 1,024
rows as at 8,192, while activations (and the freed temporaries glibc keeps resident) grow with the pass:
measured on SmolLM2-135M, a pack of 8 (~2,400 tokens a step) took 3.3 GB instead of 6.9 GB, and was no slower
(benchmarks/results/multilora-cpu*.md). So a CPU pack's activations are one pass's, whatever its K."""

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_OVERHEAD_BYTES = 512 * 2**20
SAVED_HIDDEN = 4
SAVED_HIDDEN_FP32 = 2.25
SAVED_INTERMEDIATE = 3
SAVED_OUTSIDE_FP32 = 2
CPU_FRAGMENTATION = 0.5
HEAD_CHUNK_BYTES = 128 * 2**20  # fp32 logits per head chunk; workers.engine.head uses the same number
LORA_STATE_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq
# On CPU each adapter costs more resident memory than its state: measured on SmolLM2-135M packs of 1 to 16
# (r=16 on q/k/v/o, 1.84M parameters an adapter; benchmarks/results/multilora-cpu.md), peak RSS grew by
# 62 MB (fp32) and 111 MB (bf16) an adapter, 34 and 60 bytes a parameter: glibc keeps the parameter-sized
# temporaries of each adapter's gradient and foreach AdamW step resident. The estimate takes the larger.
CPU_LORA_BYTES_PER_PARAM = 64
# Below fp32 the casts between the base's dtype and the fp32 LoRA math add mixed-size temporaries, and
# glibc's heap fragments further with every step that brings longer documents: re-measured over 8 steps
# (2 warm-up), bf16 packs of 8 and 16 peaked 20-24% above the 64-byte estimate, and a pack of 8 traced
# over 14 steps kept growing (2.2 -> 4.1 GB, ~30 MB a step at the end; `malloc_trim` after each step
# halves the resident set between steps but not the peak). 160 bytes a parameter covers 14 steps of a
# pack of 8; longer runs on CPU in bf16 are the open question (docs/reliability.md).
CPU_LORA_BYTES_PER_PARAM_BELOW_FP32 = 160
# Linears whose input nothing else keeps: LoRA on them keeps it (name suffix -> which width).
_OWN_INPUT = {"o_proj": "hidden", "down_proj": "intermediate"}


@dataclass(frozen=True)
class ModelDims:
    """What activations depend on: hidden and MLP widths, depth, vocabulary."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelDims:
        """From a LLaMA/Mistral/Qwen-style `config.json` dict (or a multimodal one's `text_config`)."""
        cfg = config
        if cfg.get("hidden_size") is None and isinstance(cfg.get("text_config"), Mapping):
            cfg = cfg["text_config"]
        hidden = int(cfg["hidden_size"])
        return cls(
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
            layers=int(cfg["num_hidden_layers"]),
            vocab=int(cfg["vocab_size"]),
        )


@dataclass(frozen=True)
class LoraInputs:
    """Which extra layer inputs LoRA keeps in a pass: those of `o_proj` and of `down_proj`."""

    attention_output: bool = False
    mlp_product: bool = False

    @classmethod
    def of(cls, targets: Iterable[str] | str) -> LoraInputs:
        """From target module names (dotted suffixes) or 'all-linear'; union over a pack's adapters."""
        if isinstance(targets, str):
            return cls(True, True) if targets == "all-linear" else cls.of([targets])
        kinds = {_OWN_INPUT.get(t.rsplit(".", 1)[-1]) for t in targets}
        return cls("hidden" in kinds, "intermediate" in kinds)

    def __or__(self, other: LoraInputs) -> LoraInputs:
        return LoraInputs(
            self.attention_output or other.attention_output, self.mlp_product or other.mlp_product
        )


def layer_bytes_per_token(dims: ModelDims, dtype: str, lora: LoraInputs = LoraInputs()) -> float:
    """What one decoder layer keeps for backward, per token, without checkpointing."""
    act = DTYPE_BYTES[dtype]
    hidden = (SAVED_HIDDEN + lora.attention_output) * act + SAVED_HIDDEN_FP32 * 4
    intermediate = (SAVED_INTERMEDIATE + lora.mlp_product) * act
    return hidden * dims.hidden + intermediate * dims.intermediate


def activation_bytes_per_token(
    dims: ModelDims,
    dtype: str,
    *,
    width: int,
    checkpointing: bool,
    lora: LoraInputs = LoraInputs(),
    cpu: bool = False,
) -> float:
    """Peak activation bytes per token of a training pass (padding included) in rows of `width`."""
    layer = layer_bytes_per_token(dims, dtype, lora)
    # Checkpointed, each layer keeps its input, and while a layer is recomputed its set lives beside what
    # is left of the one just back-propagated: two layers' sets (with one, a CI run peaked 1.2% over).
    inputs = dims.layers * dims.hidden * DTYPE_BYTES[dtype]
    kept = inputs + 2 * layer if checkpointing else dims.layers * layer
    backward = layer  # one layer's gradients at a time
    outside = SAVED_OUTSIDE_FP32 * dims.hidden * 4 + width  # final norm, head input; the attention mask
    fragmentation = CPU_FRAGMENTATION * dims.layers * layer if cpu else 0.0
    return kept + backward + outside + fragmentation


def head_bytes(dtype: str) -> int:
    """One head chunk: fp32 logits, logsumexp's fp32 temporary, and (below fp32) the head-dtype matmul
    output they were upcast from."""
    act = DTYPE_BYTES[dtype]
    return HEAD_CHUNK_BYTES * 2 + (HEAD_CHUNK_BYTES * act // 4 if act != 4 else 0)


def pass_bytes(
    dims: ModelDims,
    dtype: str,
    *,
    tokens: int,
    width: int,
    checkpointing: bool,
    lora: LoraInputs = LoraInputs(),
    lora_params: int = 0,
    cpu: bool = False,
) -> int:
    """What a training pass adds on top of the loaded base: LoRA state, activations, one head chunk."""
    per_token = activation_bytes_per_token(
        dims, dtype, width=width, checkpointing=checkpointing, lora=lora, cpu=cpu
    )
    return int(LORA_STATE_BYTES_PER_PARAM * lora_params + tokens * per_token + head_bytes(dtype))


def pass_token_budget(
    dims: ModelDims,
    dtype: str,
    *,
    budget_bytes: int,
    static_bytes: int,
    lora_params: int = 0,
    lora: LoraInputs = LoraInputs(),
    varlen: bool = False,
    cpu: bool = False,
) -> int:
    """The most tokens one training pass may hold to stay within `budget_bytes` (`pass_bytes` solved for
    tokens), with the base and runtime (`static_bytes`) and the LoRA state already resident.

    Without a variable-length attention kernel a packed row's mask costs `width` bytes a token, and a
    pass of T tokens may be one row of width T, so the mask term is taken at its worst (T x T)."""
    free = budget_bytes - static_bytes - LORA_STATE_BYTES_PER_PARAM * lora_params - head_bytes(dtype)
    if free <= 0:
        return 0
    per_token = activation_bytes_per_token(dims, dtype, width=0, checkpointing=False, lora=lora, cpu=cpu)
    if varlen:
        return int(free // per_token)
    # tokens * (per_token + tokens) <= free
    return int((-per_token + (per_token * per_token + 4 * free) ** 0.5) / 2)
