"""Load the frozen base once per worker: any transformers causal LM (a `save_pretrained` directory, a hub
id, a GGUF file or a catalogued base, see `workers.bases.catalog`), full precision or bitsandbytes k-bit."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.bases.catalog import BaseModelError, resolve_base
from workers.contract.plan import Device, DType, Quantization

log = logging.getLogger(__name__)
# CPU flags under which torch runs 16-bit matmuls natively; without them it emulates, ~100-300x slower.
NATIVE_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

__all__ = ["BaseModelError", "LoadedBase", "load_base", "quantization_config", "resolve_device"]


@dataclass
class LoadedBase:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    device: torch.device


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("`device` is 'cuda' but no CUDA GPU is visible; use device: cpu or auto")
    if device == "cuda" and torch.distributed.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def quantization_config(quantization: Quantization, dtype: DType, device: torch.device) -> Any | None:
    """The `BitsAndBytesConfig` for a k-bit base, or a clear error where bitsandbytes is missing.

    bitsandbytes runs on CUDA and, since 0.49, on CPU too (nf4 and int8 kernels, forward and backward), so a
    k-bit base needs no GPU: it trades speed for a 4-8x smaller frozen base."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise BaseModelError(
            f"`quantization` {quantization!r} needs bitsandbytes: pip install 'bitsandbytes>=0.49'"
        ) from exc
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=TORCH_DTYPES[dtype],
        bnb_4bit_use_double_quant=True,
    )


def attention_implementation(device: torch.device, dtype: DType) -> str | None:
    """`flash_attention_2` on CUDA for half-precision bases when flash-attn is installed, else None
    (transformers' default, SDPA). Packed rows then take flash-attn's variable-length path: attention
    costs per document, not per row (transformers reads the restarting position ids)."""
    import importlib.util

    if device.type == "cuda" and dtype != "float32" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def load_base(
    base_model: str,
    *,
    tokenizer: str | None = None,
    quantization: Quantization = "none",
    dtype: DType = "float32",
    device: Device = "auto",
    home: Path | None = None,
) -> LoadedBase:
    """`from_pretrained` the base and its tokenizer; all base parameters frozen, eval mode. `home` holds
    converted bases (default: `LORAFLEET_HOME`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    warning = slow_cpu_dtype(dtype, target.type, cpu_flags())
    if warning:
        log.warning(warning)
    bnb_config = quantization_config(quantization, dtype, target)
    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[dtype]}
    attention = attention_implementation(target, dtype)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
        kwargs["device_map"] = {"": target}
    source = resolve_base(base_model, home)  # a catalogued name or a GGUF file: its converted directory
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(resolve_base(tokenizer, home) if tokenizer else source)
    except OSError as exc:
        raise BaseModelError(
            f"cannot load `base_model` {base_model!r}: {exc}. Give a local directory written by "
            "save_pretrained, a .gguf file, a catalogued base or a hub id that is cached locally"
        ) from exc
    if bnb_config is None:
        model.to(target)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding rows are masked out of the loss, any id will do
    model.requires_grad_(False)
    model.eval()
    return LoadedBase(model=model, tokenizer=tok, device=target)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (Linux `/proc/cpuinfo`; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def slow_cpu_dtype(dtype: str, device_type: str, flags: frozenset[str]) -> str | None:
    """Why a 16-bit base will crawl here, or None. Measured on an AVX2-only EPYC: a SmolLM2-135M pack step
    took 110 s in bf16 against 3.8 s in fp32, since torch emulates bf16 matmuls without native support."""
    native = NATIVE_CPU_FLAGS.get(dtype)
    if device_type != "cpu" or native is None or not flags or any(flag in flags for flag in native):
        return None
    return (
        f"dtype {dtype} on a CPU without {' or '.join(native)}: torch emulates its matmuls, ~100-300x "
        "slower than float32 here; use dtype float32 on this machine (bf16 pays off on GPUs and on CPUs "
        "with AVX512-BF16 or AMX)"
    )
