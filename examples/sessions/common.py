"""What the session examples share: connecting to a server, the base's tokenizer, chat datums.

Every example takes `--url` / `--token` (default: `LORAFLEET_URL` / `LORAFLEET_TOKEN`; neither: this
home's local service, started if needed), `--project`, `--base` and `--seed`. The base defaults to
`smollm2-135m-instruct`, the catalogued SmolLM2-135M-Instruct the quickstart trains (`lorafleet models
pull smollm2-135m-instruct` once, on the server's home), in float32: on a CPU without native bf16 a 16-bit
base is ~30x slower (README, "bf16 bases").

The client tokenizes: a session takes token ids (as Tinker's does), so this machine needs the base's
tokenizer too. For a catalogued base it is read from this home's pulled copy (the same pull); `--tokenizer`
names any directory `AutoTokenizer.from_pretrained` reads, for a server whose base is not pulled here.

Each example ends by printing one line `RESULT {json}`: the numbers it measured, for a person and for
`tests/orchestrator/test_cookbook.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator import Client
from workers.contract.sessions import Datum, LossFnInputs

DEFAULT_BASE = "smollm2-135m-instruct"


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every example takes; each adds its own."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--url", default=os.environ.get("LORAFLEET_URL"), help="server URL (env LORAFLEET_URL)")
    p.add_argument(
        "--token", default=os.environ.get("LORAFLEET_TOKEN"), help="API token (env LORAFLEET_TOKEN)"
    )
    p.add_argument("--project", default="default", help="the project the sessions belong to")
    p.add_argument("--base", default=DEFAULT_BASE, help="base model: a catalog name, a directory, a .gguf")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the base's, pulled here)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank, all linear layers)")
    p.add_argument("--seed", type=int, default=0, help="LoRA init, data order and sampling seeds")
    return p


def connect(args: argparse.Namespace) -> Client:
    """A `Client` of the server `--url` names, or of this home's local service."""
    if args.url:
        return Client(args.url, args.token, project=args.project)
    return Client(project=args.project)


def load_tokenizer(args: argparse.Namespace) -> Any:
    """The base's tokenizer, from `--tokenizer` or this home's copy of the base (never downloaded)."""
    from transformers import AutoTokenizer

    from workers.bases.catalog import BaseModelError, resolve_base

    where = args.tokenizer
    if where is None:
        try:
            where = resolve_base(args.base, convert=False)
        except BaseModelError as exc:
            sys.exit(
                f"cannot read the tokenizer of `--base` {args.base!r} here: {exc} (or give `--tokenizer DIR`)"
            )
    return AutoTokenizer.from_pretrained(where)


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    """A user turn in the chat template, then the assistant header: what the model answers after."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def chat_datum(tokenizer: Any, question: str, answer: str) -> tuple[Datum, int]:
    """A next-token datum of the whole exchange with weight 1 on the answer's tokens and the end-of-turn
    token after them (so the model learns to stop), 0 on the prompt and what follows; and the number of
    weighted tokens. The loss is a sum (Tinker's convention): divide the weights by a batch's weighted
    tokens for a mean."""
    prompt = chat_prompt(tokenizer, question)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
    )
    full = tokenizer.encode(text, add_special_tokens=False)
    if full[: len(prompt)] != prompt:  # a template that rewrites earlier turns: weights would be misaligned
        raise ValueError(f"the chat template does not render {question!r} as a prefix of its answered form")
    end_of_turn = (
        tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    )
    answer_end = len(full)
    for i in range(len(prompt), len(full)):
        if full[i] in (end_of_turn, tokenizer.eos_token_id):
            answer_end = i + 1  # the end-of-turn token is trained too
            break
    # position i of model_input predicts full[i + 1]: weight it when full[i + 1] is an answer token
    weights = [1.0 if len(prompt) <= i + 1 < answer_end else 0.0 for i in range(len(full) - 1)]
    datum = Datum(model_input=full[:-1], loss_fn_inputs=LossFnInputs(target_tokens=full[1:], weights=weights))
    return datum, int(sum(weights))


def mean_weighted(datums: list[tuple[Datum, int]]) -> list[Datum]:
    """The datums with weights divided by their total: the call's loss is then the mean per answer token."""
    total = sum(n for _, n in datums) or 1
    out = []
    for datum, _ in datums:
        weights = [w / total for w in datum.loss_fn_inputs.weights or []]
        out.append(
            datum.model_copy(
                update={"loss_fn_inputs": datum.loss_fn_inputs.model_copy(update={"weights": weights})}
            )
        )
    return out


def run_session(args: argparse.Namespace, train: Callable[[Any, Any, Any], dict[str, Any]]) -> dict[str, Any]:
    """One training client on `args.base` for `train(tc, tokenizer, args)`, closed whatever happens; its
    results with the wall time (`wall_s`), printed."""
    tokenizer = load_tokenizer(args)
    started = time.monotonic()
    with connect(args) as client:
        tc = client.create_lora_training_client(args.base, rank=args.rank, seed=args.seed)
        try:
            results = train(tc, tokenizer, args)
        finally:
            tc.close()
    results["wall_s"] = round(time.monotonic() - started, 1)
    print(f"{args.steps} steps in {results['wall_s']:.0f} s")
    return results


def report(results: dict[str, Any]) -> None:
    """The last line of every example: what it measured, as JSON."""
    print("RESULT " + json.dumps(results, sort_keys=True), flush=True)


def here() -> Path:
    return Path(__file__).resolve().parent
