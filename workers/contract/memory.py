"""How much memory a pack step takes: the engine's model of itself, in plain numbers (no torch).

Two callers share it: the engine (`activation_checkpointing: auto` turns checkpointing on for a pass that
would not fit the worker's budget without it) and the scheduler (`orchestrator/scheduling/scheduler.py` places
adapters on workers by the same numbers). Both read a base's shape with `model_info_from_config` and an
adapter's with its `LoraConfig`, so there is one parser, one set of defaults and one table of bytes.

- **The base**: frozen weights in their stored precision (unquantized: `n_params` x dtype bytes; 8bit /
  4bit, bitsandbytes: the decoder-layer linears at `QUANT_BYTES` a weight, the rest in the dtype), the
  runtime (below) and one head chunk.
- **An adapter**: `LORA_STATE_BYTES_PER_PARAM` a LoRA parameter (more on CPU, below) and the activations
  of its tokens. Attention uses SDPA's fused kernels, which save no seq x seq matrix.

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

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from workers.contract.plan import LoraConfig

CPU_PASS_TOKENS = 1024
"""Default pass size on CPU (`workers.training.trainer.adapter_passes`): a CPU's matmuls are as fast at 1,024
rows as at 8,192, while activations (and the freed temporaries glibc keeps resident) grow with the pass:
measured on SmolLM2-135M, a pack of 8 (~2,400 tokens a step) took 3.3 GB instead of 6.9 GB, and was no slower
(benchmarks/results/multilora-cpu*.md). So a CPU pack's activations are one pass's, whatever its K."""

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes bytes per quantized weight: int8 + fp32 row statistics (4 / in_features, <= 1/64 for
# in_features >= 256); nf4 + 8-bit absmax per 64-block + fp32 second-level absmax per 256 blocks.
QUANT_BYTES: Mapping[str, float] = {"8bit": 1.0 + 1 / 64, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
# Framework, allocator slack and (on a GPU) the CUDA context: present once per worker whatever the model.
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
class BaseModelInfo:
    """The shape of a base model, as far as memory is concerned (see `model_info_from_config`).

    `linear_shapes` has one entry per kind of linear in a decoder layer: `(name, in_features,
    out_features)`, where `name` is the module's path inside the layer (`"self_attn.q_proj"`) or its bare
    name (`"q_proj"`). Every one of the `num_layers` layers is assumed to hold each kind once. The output
    head is not listed: like PEFT's 'all-linear', LoRA never targets it.
    """

    n_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    linear_shapes: tuple[tuple[str, int, int], ...]


def model_info_from_config(config: Mapping[str, Any]) -> BaseModelInfo:
    """A `BaseModelInfo` from a LLaMA/Mistral/Qwen-style `config.json` dict (dense decoder models).

    Reads `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`,
    `num_key_value_heads` (default: the attention heads), `head_dim` (default: hidden / heads),
    `vocab_size`, `tie_word_embeddings` (default false, as in LLaMA, Mistral and Qwen2), `attention_bias`
    and `mlp_bias`. A multimodal config's `text_config` is used when the top level has no `hidden_size`.
    """
    cfg: Mapping[str, Any] = config
    if cfg.get("hidden_size") is None and isinstance(cfg.get("text_config"), Mapping):
        cfg = cfg["text_config"]
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if cfg.get(key) is None]
    if missing:
        raise ValueError(
            f"model config lacks {missing}: lorafleet's memory model reads LLaMA/Mistral/Qwen-style configs "
            f"with {list(required)}; got keys {sorted(cfg)[:25]}"
        )
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 1
    if experts > 1:
        raise ValueError(
            f"model config has {experts} experts (mixture of experts); lorafleet's memory model covers dense "
            "decoder models only, and would underestimate this one"
        )
    h, inter, layers = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    heads, vocab = int(cfg["num_attention_heads"]), int(cfg["vocab_size"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    shapes = (
        ("self_attn.q_proj", h, q_out),
        ("self_attn.k_proj", h, kv_out),
        ("self_attn.v_proj", h, kv_out),
        ("self_attn.o_proj", q_out, h),
        ("mlp.gate_proj", h, inter),
        ("mlp.up_proj", h, inter),
        ("mlp.down_proj", inter, h),
    )
    biases = 0
    if cfg.get("model_type") == "qwen2" and "attention_bias" not in cfg:  # Qwen2: q/k/v biases, always
        biases += q_out + 2 * kv_out
    elif cfg.get("attention_bias"):  # LLaMA's flag: q/k/v/o biases
        biases += q_out + 2 * kv_out + h
    if cfg.get("mlp_bias"):
        biases += 2 * inter + h
    per_layer = sum(i * o for _, i, o in shapes) + biases + 2 * h  # + the two RMSNorm weights
    tied = bool(cfg.get("tie_word_embeddings", False))
    n_params = layers * per_layer + vocab * h * (1 if tied else 2) + h  # + the final norm
    return BaseModelInfo(n_params, h, inter, layers, vocab, shapes)


def _matches(name: str, target: str) -> bool:
    # PEFT's dotted-suffix match; a target naming one layer's module ("layers.0.self_attn.q_proj") is
    # counted for every layer, which overestimates and so stays safe.
    return name == target or name.endswith("." + target) or target.endswith("." + name)


def lora_params_per_rank(info: BaseModelInfo, target_modules: Iterable[str] | str) -> int:
    """LoRA parameters over all layers at rank 1: `in + out` per targeted linear (A is r x in, B out x r)."""
    if target_modules == "all-linear":
        shapes = info.linear_shapes
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        shapes = tuple(s for s in info.linear_shapes if any(_matches(s[0], t) for t in targets))
    return info.num_layers * sum(i + o for _, i, o in shapes)


def lora_param_count(info: BaseModelInfo, lora: LoraConfig) -> int:
    """The LoRA parameters an adapter of `lora` has on a base of `info`."""
    return lora.r * lora_params_per_rank(info, lora.target_modules)


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


def layer_bytes_per_token(info: BaseModelInfo, dtype: str, lora: LoraInputs = LoraInputs()) -> float:
    """What one decoder layer keeps for backward, per token, without checkpointing."""
    act = DTYPE_BYTES[dtype]
    hidden = (SAVED_HIDDEN + lora.attention_output) * act + SAVED_HIDDEN_FP32 * 4
    intermediate = (SAVED_INTERMEDIATE + lora.mlp_product) * act
    return hidden * info.hidden_size + intermediate * info.intermediate_size


def activation_bytes_per_token(
    info: BaseModelInfo,
    dtype: str,
    *,
    width: int,
    checkpointing: bool,
    lora: LoraInputs = LoraInputs(),
    cpu: bool = False,
) -> float:
    """Peak activation bytes per token of a training pass (padding included) in rows of `width`."""
    layer = layer_bytes_per_token(info, dtype, lora)
    # Checkpointed, each layer keeps its input, and while a layer is recomputed its set lives beside what
    # is left of the one just back-propagated: two layers' sets (with one, a CI run peaked 1.2% over).
    inputs = info.num_layers * info.hidden_size * DTYPE_BYTES[dtype]
    kept = inputs + 2 * layer if checkpointing else info.num_layers * layer
    backward = layer  # one layer's gradients at a time
    outside = SAVED_OUTSIDE_FP32 * info.hidden_size * 4 + width  # final norm, head input; the attention mask
    fragmentation = CPU_FRAGMENTATION * info.num_layers * layer if cpu else 0.0
    return kept + backward + outside + fragmentation


def head_bytes(dtype: str) -> int:
    """One head chunk: fp32 logits, logsumexp's fp32 temporary, and (below fp32) the head-dtype matmul
    output they were upcast from."""
    act = DTYPE_BYTES[dtype]
    return HEAD_CHUNK_BYTES * 2 + (HEAD_CHUNK_BYTES * act // 4 if act != 4 else 0)


def pass_bytes(
    info: BaseModelInfo,
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
        info, dtype, width=width, checkpointing=checkpointing, lora=lora, cpu=cpu
    )
    return int(LORA_STATE_BYTES_PER_PARAM * lora_params + tokens * per_token + head_bytes(dtype))


def activation_bytes(
    info: BaseModelInfo,
    dtype: str,
    *,
    tokens: int,
    width: int,
    checkpointing: bool,
    targets: Iterable[str] | str,
    cpu: bool,
) -> int:
    """Activations of `tokens` tokens in rows of `width`, for adapters targeting `targets`."""
    per_token = activation_bytes_per_token(
        info, dtype, width=width, checkpointing=checkpointing, lora=LoraInputs.of(targets), cpu=cpu
    )
    return math.ceil(tokens * per_token)


def base_bytes(info: BaseModelInfo, quantization: str, dtype: str) -> int:
    """A loaded base: frozen weights in their stored precision, the per-worker runtime, one head chunk."""
    return base_weight_bytes(info, quantization, dtype) + RUNTIME_OVERHEAD_BYTES + head_bytes(dtype)


def base_weight_bytes(info: BaseModelInfo, quantization: str, dtype: str) -> int:
    """The frozen weights: `n_params` x dtype bytes, or (8bit / 4bit) the decoder-layer linears at
    `QUANT_BYTES` a weight and the rest (embeddings, norms, output head) in `dtype`."""
    dtype_bytes = DTYPE_BYTES[dtype]
    if quantization == "none":
        return info.n_params * dtype_bytes
    quantized = info.num_layers * sum(i * o for _, i, o in info.linear_shapes)
    rest = max(0, info.n_params - quantized)
    return math.ceil(quantized * QUANT_BYTES[quantization]) + rest * dtype_bytes


def lora_bytes_per_param(dtype: str, cpu: bool) -> int:
    """LoRA state, and on CPU what the allocator keeps of each adapter's per-step temporaries."""
    if not cpu:
        return LORA_STATE_BYTES_PER_PARAM
    if DTYPE_BYTES.get(dtype, 4) < 4:
        return CPU_LORA_BYTES_PER_PARAM_BELOW_FP32
    return CPU_LORA_BYTES_PER_PARAM


def default_pass_tokens(needs_gpu: bool, max_tokens_per_pass: int | None, step_tokens: int) -> int | None:
    """The engine's pass size for a pack: the spec's `resources.max_tokens_per_pass`, else
    `CPU_PASS_TOKENS` on CPU, else one pass per step (GPU); never more than `step_tokens`, the most a pack
    step can hold (max adapters x batch x max_seq_len), which is what a pass cap above it amounts to."""
    cap = max_tokens_per_pass or (None if needs_gpu else CPU_PASS_TOKENS)
    return None if cap is None else min(cap, step_tokens)


def pass_token_budget(
    info: BaseModelInfo,
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
    per_token = activation_bytes_per_token(info, dtype, width=0, checkpointing=False, lora=lora, cpu=cpu)
    if varlen:
        return int(free // per_token)
    # tokens * (per_token + tokens) <= free
    return int((-per_token + (per_token * per_token + 4 * free) ** 0.5) / 2)
