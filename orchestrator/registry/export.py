"""`lorafleet export`: a trained adapter as a PEFT directory, or merged into its base as a plain model.

The adapter is read from storage (a directory or an object store, copied locally for the duration);
both are written to a temporary sibling and renamed into place, so a failed export leaves nothing behind,
and both carry a README card with the adapter's lineage, its task scores with their lifts over the base
and the parent, and a few judged sample generations. Merging uses PEFT's own `merge_and_unload`
(W + (alpha/r)·B·A), and the result loads with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

from orchestrator.lineage.tree import lineage_path
from orchestrator.spec.job import ScoreOrder
from orchestrator.spec.views import Score, scores
from orchestrator.store import AdapterRecord, EventRecord, Store
from workers import storage
from workers.training.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META, is_complete

PEFT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, META)


def _card(store: Store, adapter: AdapterRecord, merged: bool) -> str:
    path = lineage_path(store, adapter, qualified=True).split("/")
    metrics = {m.key: m.last_value for m in store.get_metrics(adapter.id)}
    task_scores = scores(metrics, ScoreOrder.of(store.get_job(adapter.job_id).spec)(adapter.name))
    kind = "the base model with this LoRA adapter merged in" if merged else "a PEFT LoRA adapter"
    base = f"AutoModelForCausalLM.from_pretrained({adapter.base_model!r})"
    load = (
        "AutoModelForCausalLM.from_pretrained(this_dir)"
        if merged
        else f"PeftModel.from_pretrained({base}, this_dir)"
    )
    lines = [
        f"# {adapter.qualified_name}",
        "",
        f"Trained with lorafleet: {kind}.",
        "",
        f"- base model: `{adapter.base_model}` ({adapter.quantization}, {adapter.dtype})",
        f"- lineage (root first): {' -> '.join(path)}",
        f"- parent checkpoint: `{adapter.parent_checkpoint or '-'}`",
        f"- job: `{adapter.job_id}`, steps: {adapter.step}",
        f"- data fingerprint: `{adapter.data_fingerprint or '-'}`",
        f"- config hash: `{adapter.config_hash}`",
        f"- metrics: {json.dumps(metrics, sort_keys=True)}",
        f"- LoRA: `{adapter.lora.model_dump_json()}`",
        f"- train: `{adapter.train.model_dump_json()}`",
        "",
        f"Load it with `{load}`.",
        "",
        *_task_section(task_scores, store.final_eval(adapter)),
    ]
    return "\n".join(lines)


CARD_SAMPLES = 3


def _task_section(task_scores: list[Score], final_eval: EventRecord | None) -> list[str]:
    """The task scores with their lifts over the base (and the parent), measured by greedy generation on
    the same eval records, and a few of the judged generations: what a reader of the card decides on."""
    if not task_scores:
        return []
    has_parent = any(score.parent is not None for score in task_scores)
    head = "| metric | adapter | base | lift over base |" + (
        " parent | lift over parent |" if has_parent else ""
    )
    lines = ["## Task scores", "", head, "|---" * (6 if has_parent else 4) + "|"]
    for score in task_scores:
        cells = [score.metric, f"{score.value:.4f}", _number(score.base), _number(score.base_lift, "+")]
        if has_parent:
            cells += [_number(score.parent), _number(score.parent_lift, "+")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    samples = (final_eval.payload.get("samples") or [])[:CARD_SAMPLES] if final_eval else []
    if samples:
        lines += ["## Sample generations", ""]
    for i, sample in enumerate(samples, 1):
        lines += [f"### Sample {i}", ""]
        for label, key in SAMPLE_FIELDS:
            if sample.get(key) is not None:
                lines += [f"{label}:", "", _fenced(str(sample[key])), ""]
        judged = ", ".join(f"{k} {v:.2f}" for k, v in (sample.get("scores") or {}).items())
        if judged:
            lines += [f"Scores of the adapter's output: {judged}", ""]
    return lines


SAMPLE_FIELDS = (
    ("Prompt", "prompt"),
    ("Reference", "reference"),
    ("Adapter", "output"),
    ("Base", "base_output"),
    ("Parent", "parent_output"),
)


def _number(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.4f}"


def _fenced(text: str) -> str:
    """`text` verbatim in a fenced block whose fence no backtick run inside it can close."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def export_adapter(
    store: Store, adapter: AdapterRecord, out_dir: Path, merged: bool = False, home: Path | None = None
) -> Path:
    """Write the adapter (or the merged model) to `out_dir`, which must not exist or be empty. `home`
    holds converted bases (a catalogued or GGUF `base_model`); default: `LORAFLEET_HOME`."""
    if not adapter.final_checkpoint or not is_complete(adapter.final_checkpoint):
        raise ValueError(
            f"adapter {adapter.qualified_name} is {adapter.state} and has no final checkpoint yet; "
            "wait for it to finish training"
        )
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"`--out` {str(out_dir)!r} exists and is not empty; choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-export-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with storage.local_copy(adapter.final_checkpoint) as source:
            _write(store, adapter, source, tmp, merged, home)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write(
    store: Store, adapter: AdapterRecord, source: Path, tmp: Path, merged: bool, home: Path | None
) -> None:
    if merged:
        _write_merged(adapter, source, tmp, home)
    else:
        for name in PEFT_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    (tmp / "README.md").write_text(_card(store, adapter, merged), encoding="utf-8")


def _write_merged(adapter: AdapterRecord, source: Path, dest: Path, home: Path | None) -> None:
    if adapter.quantization != "none":
        raise ValueError(
            f"adapter {adapter.qualified_name} was trained on a {adapter.quantization} base; "
            "merging into quantized weights loses precision: export the PEFT adapter instead"
        )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.bases.catalog import resolve_base
    from workers.engine.model import TORCH_DTYPES

    base_dir = resolve_base(adapter.base_model, home)  # a catalogued name or GGUF file: its conversion
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=TORCH_DTYPES[adapter.dtype])
    merged = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    merged.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(dest)
