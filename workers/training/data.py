"""Load an adapter's training data as token ids + loss labels, and order it deterministically.

Every adapter in a pack reads its own file, so loading must be fast, must fail early with a message a user
can act on (file, line or row, field, what was there, the fix), and must give each adapter the same
examples in the same order whatever else trains beside it: a rerun, a resume or a re-pack reproduces it.
Files are read with pyarrow's readers (the fastest here, and no cache written to disk); only when one
fails do we re-read the file line by line to say exactly where and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from workers.contract.plan import DataConfig
from workers.engine.examples import IGNORE_INDEX, Example

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

# The largest record (a JSON line, a CSV row) a file may hold by default; `LORAFLEET_MAX_RECORD_BYTES`
# on a server. Readers hold a record whole, so this bounds what one bad line costs in memory.
MAX_RECORD_BYTES = 1 << 20
_MEASURE_BEYOND = 64 << 20  # how far past the limit an oversized record is read to say its size
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant", "tool")
# Record kinds, in the order we look for them when a file has several sets of fields.
KINDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file cannot be used; the message names the file, the place, the field and the fix."""


@dataclass(frozen=True)
class EvalRecord:
    """One eval record as generation judges it: the prompt's token ids formatted exactly as training
    formatted them (so the adapter is asked the way it learnt), a readable prompt, and the reference."""

    prompt_ids: tuple[int, ...]
    prompt: str
    reference: str


@dataclass(frozen=True)
class AdapterData:
    train: list[Example]
    eval: list[Example]
    fingerprint: str
    kind: str  # the training file's record kind (a key of KINDS): how its prompts were formatted
    # The first eval records that have a prompt and a reference (`prompt_completion`, `messages`), in
    # eval order and a subset of `eval`'s records; `text` records have none.
    eval_records: list[EvalRecord] = field(default_factory=list)


# ---- reading ----


@dataclass
class _Table:
    """The fields of one record kind, column-wise, as Python values."""

    path: Path
    kind: str
    columns: dict[str, list[Any]]
    lines: list[int] | None = None  # JSON: physical line of each record, when already known

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def where(self, i: int) -> str:
        if SUFFIXES[self.path.suffix.lower()] != "json":
            return f"row {i + 1}"
        if self.lines is None:  # only on an error: find the (i+1)-th non-blank line
            with self.path.open(encoding="utf-8", errors="replace") as f:
                self.lines = [n for n, line in enumerate(f, 1) if line.strip()]
        return f"line {self.lines[i]}"


def _format_of(path: Path, missing_hint: str = "") -> str:
    """The file's format from its suffix, once it is known to be a non-empty file; else why not."""
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)} "
            "(JSON Lines, Parquet or CSV)"
        )
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"{path}: data file {what}{missing_hint}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; it needs at least one record")
    return fmt


def _read(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> _Table:
    path = Path(path)
    fmt = _format_of(path, f" (relative paths are from {Path.cwd()})")
    if fmt == "json":
        arrow = _read_json(path, max_record_bytes)
    elif fmt == "csv":
        arrow = _read_csv(path, max_record_bytes)
    else:
        import pyarrow.parquet as pq

        try:
            arrow = pq.read_table(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    if arrow.num_rows == 0:
        raise DataError(f"{path}: no records; the file needs at least one")
    kind = _kind(path, arrow.column_names)
    if fmt == "csv" and kind == "messages":
        raise DataError(f"{path}: CSV cannot hold `messages` (a list of objects); use JSON Lines or Parquet")
    table = _Table(path, kind, {field: arrow.column(field).to_pylist() for field in KINDS[kind]})
    _validate(table)
    return table


def _block_size(max_record_bytes: int) -> int:
    """pyarrow's block: a record and its newline must fit in one."""
    return max_record_bytes + 1


def _read_json(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> pa.Table:
    import pyarrow.json as pj

    try:
        table = pj.read_json(path, read_options=pj.ReadOptions(block_size=_block_size(max_record_bytes)))
    except ValueError as e:  # ArrowInvalid: bad JSON, a record too large, or a field that changes type
        arrow_error = e
    else:
        # pyarrow's block bounds a record only loosely (one may straddle into the next block), so
        # measure the lines (at C speed, each already bounded by the block) to hold the limit exactly.
        with path.open("rb") as f:
            if max(map(len, f), default=0) > max_record_bytes:
                _validate_json_lines(path, max_record_bytes=max_record_bytes)  # names the line
        return table
    _validate_json_lines(path, max_record_bytes=max_record_bytes)  # raises with the exact line and field
    raise DataError(
        f"{path}: pyarrow cannot read it ({arrow_error}); the fields lorafleet uses are fine, so another "
        "field changes type between lines: make it consistent or remove it"
    )


def _read_csv(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pc

    # Text stays text even when it looks like a number; an empty cell is a missing value.
    convert = pc.ConvertOptions(
        column_types={field: pa.string() for field in ("text", "prompt", "completion", "messages")},
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    parse = pc.ParseOptions(newlines_in_values=True)
    read = pc.ReadOptions(block_size=_block_size(max_record_bytes))
    try:
        return pc.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except ValueError as e:
        arrow_error = e
    if _STRADDLING in str(arrow_error):
        raise _csv_row_too_large(path, max_record_bytes) from arrow_error
    bad: list[Any] = []  # re-read serially: only then does pyarrow number the offending row

    def keep(row: Any) -> str:
        bad.append(row)
        return "error"

    parse = pc.ParseOptions(newlines_in_values=True, invalid_row_handler=keep)
    with contextlib.suppress(ValueError):
        serial = pc.ReadOptions(use_threads=False)
        pc.read_csv(path, read_options=serial, parse_options=parse, convert_options=convert)
    if bad and bad[0].number is not None:
        row = bad[0]
        raise DataError(
            f"{path}: row {row.number - 1}: expected {row.expected_columns} columns like the header, got "
            f"{row.actual_columns} ({row.text[:80]!r}); fix: quote fields that contain commas"
        ) from arrow_error
    raise DataError(f"{path}: not a readable CSV file: {arrow_error}") from arrow_error


_STRADDLING = "straddles two block boundaries"  # pyarrow: a record larger than a block


def _csv_row_too_large(path: Path, max_record_bytes: int) -> DataError:
    return DataError(
        f"{path}: a row is larger than {max_record_bytes} bytes, the largest record this server reads; "
        "split it, or ask the admin to raise LORAFLEET_MAX_RECORD_BYTES"
    )


def _record_too_large(path: Path, line: int, size: str, max_record_bytes: int) -> DataError:
    return DataError(
        f"{path}: line {line}: a record of {size} bytes is larger than {max_record_bytes} bytes, the "
        "largest record this server reads; split it, or ask the admin to raise LORAFLEET_MAX_RECORD_BYTES"
    )


def _kind(path: Path, columns: Sequence[str]) -> str:
    for kind, fields in KINDS.items():
        if all(field in columns for field in fields):
            return kind
    raise DataError(
        f"{path}: no known fields; expected `text`, or `prompt` + `completion`, or `messages`, "
        f"found columns {list(columns)}"
    )


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _validate(table: _Table) -> None:
    """Check every record's fields; clean `messages` in place (pyarrow fills absent keys with null)."""
    path = table.path

    def fail(i: int, field: str, problem: str, value: Any, fix: str) -> DataError:
        got = "nothing (missing or null)" if value is None else f"{_type(value)} {_preview(value)}"
        return DataError(f"{path}: {table.where(i)}: field `{field}` {problem}, got {got}; fix: {fix}")

    if table.kind != "messages":
        for field in KINDS[table.kind]:
            for i, value in enumerate(table.columns[field]):
                if not isinstance(value, str):
                    raise fail(i, field, "must be a string", value, f"give every record a string `{field}`")
        return
    column = table.columns["messages"]
    list_fix = 'a list like [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    for i, messages in enumerate(column):
        if not isinstance(messages, list) or not messages:
            raise fail(i, "messages", "must be a non-empty list of messages", messages, f"write {list_fix}")
        cleaned = []
        for j, message in enumerate(messages):
            if not isinstance(message, dict):
                raise fail(i, f"messages[{j}]", "must be an object", message, f"write {list_fix}")
            message = {key: value for key, value in message.items() if value is not None}
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise fail(
                    i, f"messages[{j}].role", f"must be one of {list(ROLES)}", role, "use a known role"
                )
            if not isinstance(content, str):
                raise fail(
                    i,
                    f"messages[{j}].content",
                    "must be a string",
                    content,
                    "give every message a string `content`",
                )
            cleaned.append(message)
        if not any(message["role"] == "assistant" for message in cleaned):
            raise fail(
                i,
                "messages",
                "has no assistant turn to learn from",
                [m["role"] for m in cleaned],
                "add an assistant message or drop the conversation",
            )
        column[i] = cleaned


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- tokenizing ----


def _tokenize(table: _Table, rows: Sequence[int], tokenizer: Any, max_seq_len: int) -> list[Example]:
    """Examples for `rows` of `table`, truncated to max_seq_len; those left with no target are dropped."""
    return [example for _, example in _tokenize_rows(table, rows, tokenizer, max_seq_len)]


def _tokenize_rows(
    table: _Table, rows: Sequence[int], tokenizer: Any, max_seq_len: int
) -> list[tuple[int, Example]]:
    """(row, Example) for the rows of `rows` kept by `_tokenize`."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return out["input_ids"]

    pairs: list[tuple[list[int], list[int]]] = []
    if table.kind == "text":
        for ids in encode([table.columns["text"][r] for r in rows]):
            pairs.append((bos + ids + eos, [IGNORE_INDEX] * len(bos) + ids + eos))
    elif table.kind == "prompt_completion":
        prompts = encode([table.columns["prompt"][r] for r in rows])
        completions = encode([table.columns["completion"][r] for r in rows])
        for prompt, completion in zip(prompts, completions, strict=True):
            pairs.append(
                (
                    bos + prompt + completion + eos,
                    [IGNORE_INDEX] * (len(bos) + len(prompt)) + completion + eos,
                )
            )
    else:
        render = _chat_renderer(table.path, tokenizer)
        for r in rows:
            ids, mask = render(table.columns["messages"][r])
            pairs.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]))

    examples = [Example(tuple(ids[:max_seq_len]), tuple(labels[:max_seq_len])) for ids, labels in pairs]
    kept = [(row, example) for row, example in zip(rows, examples, strict=True) if example.n_targets > 0]
    if examples and not kept:
        raise DataError(
            f"{table.path}: max_seq_len={max_seq_len} is too small: in all {len(examples)} selected examples "
            "the prompt fills the window and no target token is left; raise `train.max_seq_len` or shorten "
            "the prompts"
        )
    if len(kept) < len(examples):
        log.warning(
            "%s: dropped %d of %d examples with no target token within max_seq_len=%d",
            table.path,
            len(examples) - len(kept),
            len(examples),
            max_seq_len,
        )
    return kept


def _eval_records(table: _Table, rows: Sequence[int], tokenizer: Any) -> list[EvalRecord]:
    """Generation records of `rows`: for `prompt` + `completion`, BOS + prompt (as `_tokenize` formats
    it) and the completion; for `messages`, the conversation before its last assistant turn rendered
    with the chat template and the generation prompt (as serving asks a chat adapter), and that turn's
    content. `text` records have no reference to judge an answer against: none."""
    if table.kind == "prompt_completion":
        prompts = [table.columns["prompt"][r] for r in rows]
        completions = [table.columns["completion"][r] for r in rows]
        return [
            EvalRecord(tuple(prompt_ids(p, "prompt_completion", tokenizer)), p, c)
            for p, c in zip(prompts, completions, strict=True)
        ]
    if table.kind != "messages":
        return []
    records = []
    for r in rows:
        messages = table.columns["messages"][r]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = messages[:last]
        out = tokenizer.apply_chat_template(
            context, tokenize=True, return_dict=True, add_generation_prompt=True
        )
        if len(context) == 1:
            readable = context[0]["content"]
        else:
            readable = "\n".join(f"{m['role']}: {m['content']}" for m in context)
        records.append(EvalRecord(tuple(out["input_ids"]), readable, messages[last]["content"]))
    return records


def _chat_renderer(path: Path, tokenizer: Any) -> Callable[[list[dict]], tuple[list[int], list[int]]]:
    """(input_ids, assistant mask) for one conversation, rendered with the tokenizer's chat template."""
    template = tokenizer.chat_template
    if not template:
        raise DataError(f"{path}: `messages` records need a tokenizer with a chat template; it has none")

    def ids_of(messages: list[dict], generation_prompt: bool = False) -> list[int]:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return list(out["input_ids"])

    if _GENERATION_TAG.search(str(template)):

        def render(messages: list[dict]) -> tuple[list[int], list[int]]:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(out["input_ids"]), list(out["assistant_masks"])

        return render

    def render_by_prefix(messages: list[dict]) -> tuple[list[int], list[int]]:
        # Assistant turn i: from the end of messages[:i] + generation prompt to the end of messages[:i+1].
        ids = ids_of(messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(ids_of(messages[:i], generation_prompt=True)) if i else 0
                end = len(ids_of(messages[: i + 1]))
                for t in range(start, min(end, len(ids))):
                    mask[t] = 1
        return ids, mask

    return render_by_prefix


def prompt_ids(prompt: str, kind: str | None, tokenizer: Any, raw: bool = False) -> list[int]:
    """The token ids to generate from, formatted exactly as training formatted the prompts of `kind`.

    An adapter answers well only to the prompts it learnt from: a `messages` adapter saw each user turn
    inside the chat template, followed by the assistant header; a `prompt` + `completion` or `text`
    adapter saw BOS and the bare text, which is also what an adapter of unknown kind (`None`: trained
    elsewhere) gets. `raw` feeds the prompt's own tokens with nothing added: the caller formats it all.
    """
    if raw:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if kind == "messages":
        if not tokenizer.chat_template:
            raise DataError("the adapter was trained on `messages`, but the tokenizer has no chat template")
        messages = [{"role": "user", "content": prompt}]
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=True
        )
        return list(out["input_ids"])
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {list(KINDS)}")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


# ---- public entry points ----


def load_examples(
    path: Path, tokenizer: Any, max_seq_len: int, max_record_bytes: int = MAX_RECORD_BYTES
) -> list[Example]:
    """Every record of one file as an Example (in file order)."""
    table = _read(Path(path), max_record_bytes)
    return _tokenize(table, range(len(table)), tokenizer, max_seq_len)


def load_adapter_data(
    cfg: DataConfig,
    tokenizer: Any,
    max_seq_len: int,
    seed: int,
    adapter_name: str,
    max_record_bytes: int = MAX_RECORD_BYTES,
    eval_records: int = 0,
) -> AdapterData:
    """Shard `cfg.path`, split off the eval set, tokenize both, and fingerprint what determined them;
    prepare the first `eval_records` eval records for judging by generation (`EvalRecord`)."""
    table = _read(cfg.path, max_record_bytes)
    n = len(table)
    count, index = cfg.shard.count, cfg.shard.index
    # Contiguous blocks of nearly equal size, as datasets' shard(count, index, contiguous=True).
    start = (n // count) * index + min(index, n % count)
    rows = list(range(start, start + n // count + (index < n % count)))
    if not rows:
        raise DataError(
            f"{cfg.path}: shard {index} of {count} is empty: the file has only {n} rows; use fewer shards"
        )
    eval_table, eval_rows = table, []
    if cfg.eval_path is not None:
        eval_table = _read(Path(cfg.eval_path), max_record_bytes)
        eval_rows = list(range(len(eval_table)))
        train_rows = rows
    elif cfg.eval_fraction > 0:
        n_eval = max(1, math.ceil(cfg.eval_fraction * len(rows) - 1e-9))
        if n_eval >= len(rows):
            raise DataError(
                f"{cfg.path}: eval_fraction={cfg.eval_fraction} of {len(rows)} rows leaves no training row; "
                "lower `eval_fraction` or give more data"
            )
        order = _rng(f"{seed}:{adapter_name}:eval-split").permutation(len(rows))
        eval_rows = sorted(rows[k] for k in order[len(rows) - n_eval :])
        train_rows = sorted(rows[k] for k in order[: len(rows) - n_eval])
    else:
        train_rows = rows
    kept = _tokenize_rows(eval_table, eval_rows, tokenizer, max_seq_len) if eval_rows else []
    judged = [row for row, _ in kept[:eval_records]]
    train = _tokenize(table, train_rows, tokenizer, max_seq_len)
    return AdapterData(
        train,
        [example for _, example in kept],
        fingerprint(cfg, seed, adapter_name),
        table.kind,
        _eval_records(eval_table, judged, tokenizer) if judged else [],
    )


def fingerprint(cfg: DataConfig, seed: int, adapter_name: str) -> str:
    """sha256 over the file bytes and the settings that choose rows (not the paths: files may move).
    The orchestrator computes it too, when a person retries an adapter: a changed one means the data
    was fixed, and the adapter starts again rather than resume weights trained on the old data."""
    digest = hashlib.sha256()
    for path in (cfg.path, cfg.eval_path):
        if path is not None:
            with Path(path).open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    settings: dict[str, Any] = {
        "shard": [cfg.shard.count, cfg.shard.index],
        "eval_path": cfg.eval_path is not None,
        "eval_fraction": cfg.eval_fraction,
    }
    if cfg.eval_fraction > 0:  # the split is drawn from these
        settings.update(seed=seed, adapter=adapter_name)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest(), "big"))


class SampleStream:
    """Endless deterministic order over n examples, from (seed, adapter_name) only.

    Each epoch is a fresh permutation seeded by sha256(f"{seed}:{adapter_name}:{epoch}"), so the order
    never depends on which other adapters train beside this one; (epoch, cursor) is the whole state.
    """

    def __init__(self, n_examples: int, seed: int, adapter_name: str, epoch: int = 0, cursor: int = 0):
        if n_examples <= 0:
            raise ValueError(f"SampleStream needs at least one example; got n_examples={n_examples}")
        self.n_examples, self.seed, self.adapter_name = n_examples, seed, adapter_name
        self._order: tuple[int, np.ndarray] | None = None
        self.load_state_dict({"epoch": epoch, "cursor": cursor})

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            rng = _rng(f"{self.seed}:{self.adapter_name}:{self.epoch}")
            self._order = (self.epoch, rng.permutation(self.n_examples))
        return self._order[1]

    def next_indices(self, k: int) -> list[int]:
        """The next k example indices, continuing into the next epoch as needed."""
        out: list[int] = []
        while len(out) < k:
            take = min(k - len(out), self.n_examples - self.cursor)
            out.extend(self._permutation()[self.cursor : self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.n_examples:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.n_examples:
            raise ValueError(
                f"SampleStream state {state} is out of range for {self.n_examples} examples "
                "(the data changed since the checkpoint?)"
            )
        self.epoch, self.cursor = epoch, cursor


def collate(rows: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels (IGNORE_INDEX in padding), attention_mask: long [N, T], right-padded."""
    import torch

    if not rows:
        raise ValueError("collate needs at least one example")
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row.input_ids)
        input_ids[i, :length] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[i, :length] = torch.tensor(row.labels, dtype=torch.long)
        attention_mask[i, :length] = 1
    return input_ids, labels, attention_mask


# ---- checking at submit time ----


def check_head(path: Path, records: int = 100, max_record_bytes: int = MAX_RECORD_BYTES) -> str:
    """Read and validate the first `records` records of a data file; returns the record kind.

    What a job submission checks before anything is stored: the file exists, has a known type and
    fields, and its first records parse and are no larger than `max_record_bytes` (never reading much
    past that: a 200 MB line is refused after a bounded read). A bad record further in can only be found
    by reading it all, which is the worker's job; it then fails that adapter with the same kind of message.
    """
    path = Path(path)
    fmt = _format_of(path)
    if fmt == "json":
        return _validate_json_lines(path, records, max_record_bytes)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=records), None)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
        arrow = pa.Table.from_batches([batch]) if batch is not None else None
    else:
        import pyarrow as pa
        import pyarrow.csv as pc

        convert = pc.ConvertOptions(
            column_types={f: pa.string() for f in ("text", "prompt", "completion", "messages")},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        )
        try:
            reader = pc.open_csv(
                path,
                read_options=pc.ReadOptions(block_size=_block_size(max_record_bytes)),
                parse_options=pc.ParseOptions(newlines_in_values=True),
                convert_options=convert,
            )
            batches, rows = [], 0
            for batch in reader:  # blocks of about the record limit: read until `records` rows
                batches.append(batch)
                rows += batch.num_rows
                if rows >= records:
                    break
        except (OSError, ValueError, StopIteration) as e:
            if _STRADDLING in str(e):
                raise _csv_row_too_large(path, max_record_bytes) from e
            _read_csv(path, max_record_bytes)  # the whole-file reader names the offending row
            raise
        arrow = pa.Table.from_batches(batches).slice(0, records) if batches else None
    if arrow is None or arrow.num_rows == 0:
        raise DataError(f"{path}: no records; the file needs at least one")
    kind = _kind(path, arrow.column_names)
    if fmt == "csv" and kind == "messages":
        raise DataError(f"{path}: CSV cannot hold `messages` (a list of objects); use JSON Lines or Parquet")
    _validate(_Table(path, kind, {field: arrow.column(field).to_pylist() for field in KINDS[kind]}))
    return kind


def _lines(path: Path, max_record_bytes: int) -> Iterator[tuple[int, str]]:
    """(number, text) of each line, never holding more than `max_record_bytes` (+ its line end) of one:
    a longer line raises `DataError` with its size, measured without keeping it."""
    with path.open("rb") as f:
        for n in itertools.count(1):
            raw = f.readline(max_record_bytes + 1)
            if not raw:
                return
            if len(raw.rstrip(b"\r\n")) > max_record_bytes:
                raise _record_too_large(path, n, _line_size(f, len(raw), max_record_bytes), max_record_bytes)
            yield n, raw.decode("utf-8", errors="replace")


def _line_size(f: BinaryIO, read: int, max_record_bytes: int) -> str:
    """The size of the line being read (`read` bytes of it so far), read on in bounded chunks and at
    most `_MEASURE_BEYOND` past the limit: past that, only a lower bound."""
    size = read
    while size <= max_record_bytes + _MEASURE_BEYOND:
        chunk = f.readline(1 << 16)
        if not chunk:
            return str(size)
        if chunk.endswith(b"\n"):
            return str(size + len(chunk.rstrip(b"\r\n")))
        size += len(chunk)
    return f"more than {size}"


def _validate_json_lines(
    path: Path, limit: int | None = None, max_record_bytes: int = MAX_RECORD_BYTES
) -> str:
    """Parse JSON Lines record by record (the first `limit`, or all) and validate the fields lorafleet
    uses; a problem raises `DataError` with its line. Returns the record kind."""
    records, lines = [], []
    for n, line in _lines(path, max_record_bytes):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {n}: invalid JSON ({e.msg}, column {e.colno}); "
                "fix: write one complete JSON object per line (JSON Lines)"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: line {n}: expected a JSON object, got {_type(record)}; "
                "fix: write one JSON object per line (JSON Lines), not a JSON array"
            )
        records.append(record)
        lines.append(n)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{path}: no records; the file needs at least one")
    kind = _kind(path, sorted({key for record in records for key in record}))
    columns = {field: [record.get(field) for record in records] for field in KINDS[kind]}
    _validate(_Table(path, kind, columns, lines))
    return kind
