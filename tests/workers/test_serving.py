"""Serving feeds each adapter its prompts the way its training data formatted them (or raw, if asked)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.workers.conftest import TaskFactory, plan_of
from workers import storage
from workers.serving import AdapterServer
from workers.training.checkpoint import read_meta
from workers.training.data import load_examples
from workers.training.pack import run_pack
from workers.training.synthetic import skill_records


def _chat_file(path: Path, n: int) -> Path:
    """The counting skill as conversations: the prompt is the user turn, the completion the answer."""
    records = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in skill_records("counting", n)
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_a_chat_trained_adapter_is_fed_the_chat_template_and_raw_prompts_as_they_are(
    tiny_base: Path, tiny_tokenizer, make_task: TaskFactory, tmp_path: Path
) -> None:
    chat_data = _chat_file(tmp_path / "chat.jsonl", 40)
    chat = make_task("chat", skill="counting", data={"path": chat_data}, steps=1)
    plain = make_task("counting", steps=1)
    run_pack(plan_of(tiny_base, chat, plain), emit=lambda event: None)
    chat_dir, plain_dir = (storage.join(t.output_dir, "final") for t in (chat, plain))
    assert read_meta(chat_dir)["data_format"] == "messages"
    assert read_meta(plain_dir)["data_format"] == "prompt_completion"

    server = AdapterServer(str(tiny_base), device="cpu")
    fed: list[list[int]] = []

    def record(_module, _args, kwargs):
        fed.append(kwargs["input_ids"][0].tolist())

    server.model.base.register_forward_pre_hook(record, with_kwargs=True)

    def first_input(adapter: str, prompt: str, raw: bool = False) -> list[int]:
        fed.clear()
        server.generate([(adapter, prompt)], max_new_tokens=2, raw=raw)
        return fed[0]  # the first forward sees the whole prompt; later ones one new token each

    prompt = skill_records("counting", 1)[0]["prompt"]
    templated = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=True, return_dict=True, add_generation_prompt=True
    )["input_ids"]
    assert first_input(chat_dir, prompt) == list(templated)
    assert tiny_tokenizer.decode(templated) == f"<|bos|><|user|>{prompt}<|end|><|assistant|>"
    trained_on = load_examples(chat_data, tiny_tokenizer, 64)[0].input_ids  # the same text, as trained
    assert trained_on[: len(templated)] == tuple(templated)

    bare = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert first_input(chat_dir, prompt, raw=True) == bare
    # prompt + completion records: trained as BOS + prompt + completion, so generation starts BOS + prompt
    assert first_input(plain_dir, prompt) == [tiny_tokenizer.bos_token_id, *bare]
    assert first_input(plain_dir, prompt, raw=True) == bare
