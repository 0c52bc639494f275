"""workers.training.data: formats, loss masks, truncation, sharding, eval split, sample order, collate,
errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pc
import pyarrow.parquet as pq
import pytest
import torch

from workers.contract.plan import DataConfig, ShardConfig
from workers.training.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    SampleStream,
    check_head,
    collate,
    load_adapter_data,
    load_examples,
    prompt_ids,
)

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello friend"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "see you"},
]


def write(path: Path, records: list[dict]) -> Path:
    """Write records in the format named by the suffix."""
    if path.suffix in (".jsonl", ".json"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        pc.write_csv(pa.Table.from_pylist(records), path)
    return path


def targets(example: Example) -> list[int]:
    return [t for t in example.labels[1:] if t != IGNORE_INDEX]


def texts(examples: list[Example], tok) -> list[str]:
    """The text of each `text` example (between bos and eos)."""
    return [tok.decode(ex.input_ids[1:-1]) for ex in examples]


def rows_file(tmp_path: Path, n: int) -> Path:
    return write(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(n)])


# ---- formats and loss masks ----


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_text_loss_on_every_token(tmp_path: Path, tiny_tokenizer, suffix: str) -> None:
    tok = tiny_tokenizer
    path = write(tmp_path / f"d{suffix}", [{"text": "the quick brown fox"}, {"text": "42"}])
    examples = load_examples(path, tok, 64)
    assert texts(examples, tok) == ["the quick brown fox", "42"]  # CSV keeps "42" a string
    for ex in examples:
        assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
        assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]
        assert ex.n_targets == len(ex.input_ids) - 1


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_prompt_completion_loss_on_completion_only(tmp_path: Path, tiny_tokenizer, suffix: str) -> None:
    tok = tiny_tokenizer
    path = write(tmp_path / f"d{suffix}", [{"prompt": "Q: two plus two?", "completion": " A: four"}])
    (ex,) = load_examples(path, tok, 64)
    prompt = tok("Q: two plus two?", add_special_tokens=False)["input_ids"]
    completion = tok(" A: four", add_special_tokens=False)["input_ids"]
    assert list(ex.input_ids) == [tok.bos_token_id, *prompt, *completion, tok.eos_token_id]
    assert list(ex.labels) == [IGNORE_INDEX] * (1 + len(prompt)) + completion + [tok.eos_token_id]
    assert tok.decode(targets(ex)) == " A: four<|eos|>"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_messages_loss_on_assistant_turns_only(tmp_path: Path, tiny_tokenizer, suffix: str) -> None:
    path = write(tmp_path / f"chat{suffix}", [{"messages": CONVERSATION}])
    (ex,) = load_examples(path, tiny_tokenizer, 256)
    assert tiny_tokenizer.decode(targets(ex)) == "hello friend<|end|>see you<|end|>"
    rendered = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)
    assert list(ex.input_ids) == list(rendered["input_ids"])


def test_messages_without_generation_tags_match(tmp_path: Path, tiny_base: Path, tiny_tokenizer) -> None:
    """A template without {% generation %} finds the same assistant spans by rendering prefixes."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_base)
    for tag in ("{% generation %}", "{% endgeneration %}"):
        plain.chat_template = plain.chat_template.replace(tag, "")
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    assert load_examples(path, plain, 256) == load_examples(path, tiny_tokenizer, 256)


def test_truncation_keeps_the_start_and_drops_targetless(tmp_path: Path, tiny_tokenizer) -> None:
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4
    path = write(
        tmp_path / "d.jsonl",
        [{"prompt": "hi", "completion": " there"}, {"prompt": long_prompt, "completion": " end"}],
    )
    full = load_examples(path, tiny_tokenizer, 10_000)
    (kept,) = load_examples(path, tiny_tokenizer, 8)
    assert kept.input_ids == full[0].input_ids[:8] and kept.labels == full[0].labels[:8]
    text = load_examples(write(tmp_path / "t.jsonl", [{"text": long_prompt}]), tiny_tokenizer, 5)
    assert len(text[0].input_ids) == 5 and text[0].n_targets == 4


# ---- shards, eval split, fingerprint ----


def test_shards_are_disjoint_contiguous_and_cover(tmp_path: Path, tiny_tokenizer) -> None:
    path = rows_file(tmp_path, 10)

    def shard(i: int) -> list[str]:
        cfg = DataConfig(path=path, shard=ShardConfig(count=3, index=i))
        return texts(load_adapter_data(cfg, tiny_tokenizer, 64, 0, "a").train, tiny_tokenizer)

    shards = [shard(i) for i in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert [row for shard in shards for row in shard] == [f"row {i}" for i in range(10)]
    with pytest.raises(DataError, match="shard 3 of 4 is empty"):
        cfg = DataConfig(path=rows_file(tmp_path, 3), shard=ShardConfig(count=4, index=3))
        load_adapter_data(cfg, tiny_tokenizer, 64, 0, "a")


def test_eval_fraction_split_is_deterministic_and_disjoint(tmp_path: Path, tiny_tokenizer) -> None:
    cfg = DataConfig(path=rows_file(tmp_path, 20), eval_fraction=0.25)
    first = load_adapter_data(cfg, tiny_tokenizer, 64, 0, "a")
    train, held = set(texts(first.train, tiny_tokenizer)), set(texts(first.eval, tiny_tokenizer))
    assert len(held) == 5 and len(train) == 15 and train | held == {f"row {i}" for i in range(20)}
    assert load_adapter_data(cfg, tiny_tokenizer, 64, 0, "a") == first
    other = load_adapter_data(cfg, tiny_tokenizer, 64, 0, "b")
    assert set(texts(other.eval, tiny_tokenizer)) != held and other.fingerprint != first.fingerprint
    tiny = DataConfig(path=rows_file(tmp_path, 1), eval_fraction=0.5)
    with pytest.raises(DataError, match="leaves no training row"):
        load_adapter_data(tiny, tiny_tokenizer, 64, 0, "a")


def test_eval_path_and_fingerprint(tmp_path: Path, tiny_tokenizer) -> None:
    path = rows_file(tmp_path, 4)
    eval_path = write(tmp_path / "eval.parquet", [{"text": "held out"}])
    cfg = DataConfig(path=path, eval_path=eval_path)
    data = load_adapter_data(cfg, tiny_tokenizer, 64, 0, "a")
    assert len(data.train) == 4 and texts(data.eval, tiny_tokenizer) == ["held out"]
    assert len(data.fingerprint) == 64
    assert load_adapter_data(cfg, tiny_tokenizer, 64, 7, "b").fingerprint == data.fingerprint
    write(eval_path, [{"text": "held out!"}])
    assert load_adapter_data(cfg, tiny_tokenizer, 64, 0, "a").fingerprint != data.fingerprint
    no_eval = load_adapter_data(DataConfig(path=path), tiny_tokenizer, 64, 0, "a")
    assert no_eval.eval == [] and no_eval.fingerprint != data.fingerprint


# ---- eval records judged by generation ----


def test_prompt_completion_eval_records_are_the_trained_prompts_of_the_kept_eval_records(
    tmp_path: Path, tiny_tokenizer
) -> None:
    records = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(4)]
    records.insert(1, {"prompt": "the quick brown fox jumps over the lazy dog " * 4, "completion": " x"})
    train = write(tmp_path / "train.jsonl", records[:1])
    cfg = DataConfig(path=train, eval_path=write(tmp_path / "eval.jsonl", records))
    data = load_adapter_data(cfg, tiny_tokenizer, 16, 0, "a", eval_records=2)
    assert len(data.eval) == 4  # the long prompt leaves no target within 16 tokens: not an eval record
    assert [(r.prompt, r.reference) for r in data.eval_records] == [("q0", " a0"), ("q1", " a1")]
    for record, example in zip(data.eval_records, data.eval, strict=False):
        assert record.prompt_ids == tuple(prompt_ids(record.prompt, "prompt_completion", tiny_tokenizer))
        assert example.input_ids[: len(record.prompt_ids)] == record.prompt_ids  # as training saw it
    assert load_adapter_data(cfg, tiny_tokenizer, 16, 0, "a").eval_records == []  # none asked for


def test_messages_eval_records_ask_for_the_last_assistant_turn(tmp_path: Path, tiny_tokenizer) -> None:
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    data = load_adapter_data(
        DataConfig(path=path, eval_path=path), tiny_tokenizer, 256, 0, "a", eval_records=9
    )
    long, short = data.eval_records
    assert (long.reference, short.reference) == ("see you", "hello friend")
    assert short.prompt == "hi there"
    assert long.prompt == "system: be brief\nuser: hi there\nassistant: hello friend\nuser: bye"
    assert tiny_tokenizer.decode(long.prompt_ids) == (
        "<|bos|><|system|>be brief<|end|><|user|>hi there<|end|><|assistant|>hello friend<|end|>"
        "<|user|>bye<|end|><|assistant|>"
    )
    assert data.eval[0].input_ids[: len(long.prompt_ids)] == long.prompt_ids  # the trained conversation


def test_text_records_have_nothing_to_judge_by_generation(tmp_path: Path, tiny_tokenizer) -> None:
    cfg = DataConfig(path=rows_file(tmp_path, 10), eval_fraction=0.5)
    data = load_adapter_data(cfg, tiny_tokenizer, 64, 0, "a", eval_records=10)
    assert len(data.eval) == 5 and data.eval_records == []


# ---- sample order ----


def test_sample_stream_is_deterministic_per_adapter() -> None:
    order = SampleStream(50, 0, "a").next_indices(50)
    assert sorted(order) == list(range(50))
    assert SampleStream(50, 0, "a").next_indices(50) == order
    assert SampleStream(50, 0, "b").next_indices(50) != order
    assert SampleStream(50, 1, "a").next_indices(50) != order


def test_sample_stream_crosses_epochs_and_resumes_exactly() -> None:
    stream = SampleStream(7, 3, "a")
    first = stream.next_indices(5) + stream.next_indices(5)  # crosses into epoch 1
    assert sorted(first[:7]) == list(range(7)) and stream.state_dict() == {"epoch": 1, "cursor": 3}
    state = stream.state_dict()
    continuation = stream.next_indices(20)
    resumed = SampleStream(7, 3, "a")
    resumed.load_state_dict(state)
    assert resumed.next_indices(20) == continuation
    assert SampleStream(7, 3, "a", **state).next_indices(20) == continuation
    assert SampleStream(7, 3, "a").next_indices(30) == first + continuation
    with pytest.raises(ValueError, match="out of range"):
        resumed.load_state_dict({"epoch": 0, "cursor": 7})


# ---- collate ----


def test_collate_right_pads() -> None:
    rows = [Example((1, 5, 6), (IGNORE_INDEX, 5, 6)), Example((1, 7), (IGNORE_INDEX, 7))]
    input_ids, labels, mask = collate(rows, pad_id=0)
    assert input_ids.dtype == labels.dtype == mask.dtype == torch.long
    assert input_ids.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


# ---- errors ----


def test_missing_field_names_file_line_and_field(tmp_path: Path, tiny_tokenizer) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"txt": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_examples(path, tiny_tokenizer, 64)
    message = str(err.value)
    assert "broken.jsonl" in message and "line 4" in message and "`text`" in message and "missing" in message


@pytest.mark.parametrize(
    ("records", "needle"),
    [
        ([{"text": "a"}, {"text": 5}], r"line 2: field `text` must be a string, got int"),
        ([{"messages": "hello"}], r"line 1: field `messages` must be a non-empty list.*got str"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], r"`messages\[0\]\.role`.*got str 'robot'"),
        ([{"messages": [{"role": "user", "content": 3}]}], r"`messages\[0\]\.content`.*got int"),
        ([{"messages": [{"role": "user", "content": "x"}]}], r"no assistant turn"),
    ],
)
def test_wrong_types_jsonl(tmp_path: Path, tiny_tokenizer, records: list[dict], needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        load_examples(write(tmp_path / "bad.jsonl", records), tiny_tokenizer, 64)


def test_wrong_type_and_bad_rows_in_tables(tmp_path: Path, tiny_tokenizer) -> None:
    records = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    path = write(tmp_path / "bad.parquet", records)
    with pytest.raises(DataError, match=r"bad.parquet: row 2: field `completion`.*missing"):
        load_examples(path, tiny_tokenizer, 64)
    path = write(tmp_path / "num.parquet", [{"text": 1}])
    with pytest.raises(DataError, match=r"row 1: field `text` must be a string, got int"):
        load_examples(path, tiny_tokenizer, 64)
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,completion\na,b\nc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged.csv: row 2: expected 2 columns"):
        load_examples(path, tiny_tokenizer, 64)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid JSON"):
        load_examples(path, tiny_tokenizer, 64)


def test_file_level_errors(tmp_path: Path, tiny_tokenizer) -> None:
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_examples(tmp_path / "empty.jsonl", tiny_tokenizer, 64)
    (tmp_path / "header.csv").write_text("text\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"header\.csv: no records"):
        load_examples(tmp_path / "header.csv", tiny_tokenizer, 64)
    (tmp_path / "data.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data.txt: unsupported file type '.txt'; use one of .jsonl, .json"):
        load_examples(tmp_path / "data.txt", tiny_tokenizer, 64)
    with pytest.raises(DataError, match=r"nope\.jsonl: data file does not exist"):
        load_examples(tmp_path / "nope.jsonl", tiny_tokenizer, 64)
    path = write(tmp_path / "cols.csv", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"expected `text`.*found columns \['question', 'answer'\]"):
        load_examples(path, tiny_tokenizer, 64)


def test_a_record_over_the_limit_fails_with_file_line_size_and_setting(
    tmp_path: Path, tiny_tokenizer
) -> None:
    """Issue 15, item 11: a 2.5 MB record failed its adapter with "another field changes type between
    lines" (pyarrow's block is 1 MiB). Now the worker says which line, how big, the limit and the setting."""
    big = {"text": "x" * (5 << 19)}  # 2.5 MiB of text: over the default limit of 1 MiB
    path = write(tmp_path / "big.jsonl", [{"text": "a"}, big, {"text": "b"}])
    size = len(json.dumps(big))
    with pytest.raises(DataError) as err:
        load_examples(path, tiny_tokenizer, 64)
    assert str(err.value) == (
        f"{path}: line 2: a record of {size} bytes is larger than {1 << 20} bytes, the largest record this "
        "server reads; split it, or ask the admin to raise LORAFLEET_MAX_RECORD_BYTES"
    )

    # A record exactly at the limit is read; one byte over is not (for the check at submit too).
    records = [{"text": "a"}, {"text": "y" * 3000}, {"text": "b"}]
    path = write(tmp_path / "edge.jsonl", records)
    at_limit = len(json.dumps(records[1]))
    assert len(load_examples(path, tiny_tokenizer, 64, max_record_bytes=at_limit)) == 3
    assert check_head(path, max_record_bytes=at_limit) == "text"
    for check in (
        lambda: load_examples(path, tiny_tokenizer, 64, max_record_bytes=at_limit - 1),
        lambda: check_head(path, max_record_bytes=at_limit - 1),
    ):
        with pytest.raises(DataError, match=rf"edge.jsonl: line 2: a record of {at_limit} bytes is larger"):
            check()

    path = write(tmp_path / "big.csv", [{"text": "a"}, {"text": "z" * 5000}])
    for check in (
        lambda: load_examples(path, tiny_tokenizer, 64, max_record_bytes=1000),
        lambda: check_head(path, max_record_bytes=1000),
    ):
        with pytest.raises(DataError, match=r"big.csv: a row is larger than 1000 bytes.*MAX_RECORD_BYTES"):
            check()


def test_a_huge_first_line_is_refused_after_a_bounded_read(tmp_path: Path) -> None:
    """Issue 15, item 11: a 200 MB one-line file passed the check at submit and cost the server 290 MB.
    The check reads in chunks bounded by the limit: here 8 MB of one line, refused with its size, while
    Python allocates well under the line's size (measured by tracemalloc, not by time)."""
    import tracemalloc

    path = tmp_path / "one-line.jsonl"
    line = b'{"text": "' + b"w" * (8 << 20) + b'"}'
    path.write_bytes(line)  # no newline at the end either
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"line 1: a record of {len(line)} bytes is larger than 4096"):
            check_head(path, max_record_bytes=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"checking an 8 MB line allocated {peak} bytes"


def test_all_examples_too_long(tmp_path: Path, tiny_tokenizer) -> None:
    path = write(tmp_path / "d.jsonl", [{"prompt": "a long prompt indeed", "completion": " ok"}] * 3)
    with pytest.raises(DataError, match="max_seq_len=4 is too small"):
        load_examples(path, tiny_tokenizer, 4)
