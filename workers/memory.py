"""How much memory a pack step takes: the engine's own model of its activations, in plain numbers.

One source for two callers: the engine (`activation_checkpointing: auto` turns checkpointing on for a
step that would not fit the worker's budget without it) and the scheduler (`orchestrator/scheduler.py`,
which places adapters on workers by the same numbers). No torch here, so the control plane can import it.

The coefficients are the engine's, measured (see `tests/workers/test_memory.py`): per token and decoder
layer the backward keeps `SAVED_HIDDEN` x hidden_size + `SAVED_INTERMEDIATE` x intermediate_size values
in the compute dtype (norm inputs and outputs, q/k/v and the repeated k/v of grouped-query attention, the
attention output, the MLP's gate, up, activation and product). With activation checkpointing a layer
keeps only its input, and one layer's full set exists at a time while it is recomputed. The output head
runs in chunks of target tokens (`workers.head`), so logits cost one chunk, never tokens x vocabulary.
Rows of a packed pass attend within one block-diagonal mask of width x width bytes per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
SAVED_HIDDEN = 12
SAVED_INTERMEDIATE = 4
# Values per token kept outside the decoder layers: embeddings, final norm, the head's input, in fp32.
SAVED_OUTSIDE_HIDDEN = 4
# fp32 logits of one head chunk (workers.head.HEAD_CHUNK_BYTES) and their softmax in backward, plus the
# head-dtype logits the matmul writes first.
HEAD_CHUNK_BYTES = 128 * 2**20
LORA_STATE_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class ModelDims:
    """What activations depend on: hidden and MLP widths, depth, vocabulary."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelDims:
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


def layer_activation_bytes_per_token(dims: ModelDims, dtype: str) -> int:
    """What one decoder layer keeps for backward per token, without checkpointing."""
    return (SAVED_HIDDEN * dims.hidden + SAVED_INTERMEDIATE * dims.intermediate) * DTYPE_BYTES[dtype]


def activation_bytes(dims: ModelDims, dtype: str, tokens: int, width: int, checkpointing: bool) -> int:
    """Activations of a forward over `tokens` tokens (padding included) in rows of `width`."""
    act = DTYPE_BYTES[dtype]
    layer = layer_activation_bytes_per_token(dims, dtype)
    # Checkpointed: each layer keeps its input, and one layer's full set lives while it is recomputed.
    per_token = dims.layers * dims.hidden * act + layer if checkpointing else dims.layers * layer
    outside = SAVED_OUTSIDE_HIDDEN * dims.hidden * 4
    mask = width  # one bool per query-key pair of the row
    return tokens * (per_token + outside + mask)


def head_bytes(dims: ModelDims, dtype: str) -> int:
    """One head chunk at a time: its fp32 logits/softmax and the head-dtype logits before the upcast."""
    return HEAD_CHUNK_BYTES * (4 + DTYPE_BYTES[dtype]) // 4


def pack_peak_bytes(
    dims: ModelDims,
    dtype: str,
    *,
    tokens: int,
    width: int,
    lora_params: int,
    checkpointing: bool,
    static_bytes: int = 0,
) -> int:
    """Peak of one pass: `static_bytes` (base and runtime, measured or estimated), LoRA state,
    activations and one head chunk."""
    return (
        static_bytes
        + LORA_STATE_BYTES_PER_PARAM * lora_params
        + activation_bytes(dims, dtype, tokens, width, checkpointing)
        + head_bytes(dims, dtype)
    )
