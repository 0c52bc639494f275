"""Build base models and local tokenizers from configs, with no download.

Tests, benchmarks and `lorafleet quickstart` need a real transformers checkpoint but may not fetch weights,
so we make one from a config (random init), save it with `save_pretrained`, and every caller loads it back
through the same `from_pretrained` path a user's checkpoint takes. Small LLaMA-style sizes come with a BPE
trained on the shipped corpus; a real model's config (`build_base`, e.g. `benchmarks/configs/*.json`)
comes with a word-level tokenizer of exactly the config's vocabulary, whose word `t<i>` is token id i, so
data can be written with token ids drawn anywhere in the vocabulary and lengths known exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
FIRST_WORD_ID = len(SPECIAL_TOKENS)  # word-level tokenizers: ids below are special tokens

# `{% generation %}` marks assistant text so `apply_chat_template(return_assistant_tokens_mask=True)`
# can tell us which tokens carry the loss.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSize:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


# Named sizes used by tests ("tiny") and benchmarks; parameter counts include a 512-token vocab.
SIZES: dict[str, TinyModelSize] = {
    "tiny": TinyModelSize(64, 128, 2, 4, 2),
    "20m": TinyModelSize(384, 1024, 10, 6, 2),
    "100m": TinyModelSize(768, 2048, 12, 12, 4),
}


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Train a byte-level BPE on the shipped corpus; every byte stays encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("workers.assets").joinpath("corpus.txt").read_text(encoding="utf-8")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return _save_tokenizer(bpe, out_dir)


def build_tiny_base(out_dir: str | Path, size: str = "tiny", vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a random-init LLaMA causal LM + tokenizer to `out_dir` (idempotent: reuses a finished dir)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    if size not in SIZES:
        raise ValueError(f"unknown tiny model `size` {size!r}; choose one of {sorted(SIZES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, vocab_size)
    dims = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # After the final RMSNorm the hidden state has norm ~sqrt(d); with the default 0.02 init the head could
    # only reach logits of about ±1, so no adapter could ever fit anything. A pretrained head is much wider.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.5 / dims.hidden_size**0.5)
    model.save_pretrained(out_dir)
    return out_dir


def word_text(ids: list[int] | tuple[int, ...]) -> str:
    """The text `build_word_tokenizer`'s tokenizer encodes to exactly `ids` (no special tokens added)."""
    return " ".join(f"t{i}" for i in ids)


def build_word_tokenizer(out_dir: Path, vocab_size: int):
    """A tokenizer of exactly `vocab_size` ids: the special tokens first, then word `t<i>` = id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    word = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _save_tokenizer(word, out_dir)


def _save_tokenizer(tokenizer_object: Any, out_dir: str | Path) -> Any:
    """Both test tokenizers alike: our special tokens and chat template, saved where a base loads them."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


TOKENIZER_DIR = "tokenizer"
"""The word-level tokenizer again, alone in a subdirectory: beside a `config.json`, transformers 5 loads the
tokenizer class of the model type (Qwen2's rebuilds a BPE pipeline and encodes our words to nothing), so
tokenizer and benchmark load it from here (`PackPlan.tokenizer`)."""


def build_base(
    out_dir: str | Path, config: Mapping[str, Any], seed: int = 0, save_dtype: str = "bfloat16"
) -> Path:
    """Write a random-init causal LM of `config` (a `config.json` dict) + a word-level tokenizer of its
    vocabulary to `out_dir`; idempotent. Weights are stored in `save_dtype` (bf16 halves the disk and the
    load; `from_pretrained(dtype=...)` casts on load)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / TOKENIZER_DIR / "tokenizer.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(out_dir, int(config["vocab_size"]))
    build_word_tokenizer(out_dir / TOKENIZER_DIR, int(config["vocab_size"]))
    skip = ("model_type", "architectures", "torch_dtype")
    fields = {k: v for k, v in config.items() if k not in skip and not k.startswith("_")}
    fields.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_config = AutoConfig.for_model(config["model_type"], **fields)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, save_dtype))
    model.save_pretrained(out_dir)
    (out_dir / "lorafleet-source.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    return out_dir
