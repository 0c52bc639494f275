"""The ways of training K adapters that the benchmark compares; each runs inside one child process.

  pack         lorafleet: `run_pack` with all K adapters in one batched forward/backward (padding-free
               packing, chunked head; kernel and packing as the spec says).
  peft-padded  sequential PEFT: one base loaded once; per adapter `get_peft_model`, a plain loop (AdamW,
               mean CE over target tokens on full logits), `unload()`; each batch padded to its own
               longest document (dynamic padding, as `DataCollatorForSeq2Seq`/`pad_to_longest` do).
  peft-packed  sequential PEFT with padding-free packing, as transformers' `DataCollatorWithFlattening`:
               each batch is one row of its documents back to back, position ids restarting per document
               and no attention mask, so attention is block-diagonal.
  procs        K concurrent processes, each a one-adapter `run_pack` (see `harness.run_procs`).

All of them train the same adapters on the same token batches (the engine's own SampleStream), from the
same initial A (B = 0), with the same AdamW, clipping and LR schedule, so their final losses must agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multilora_bench.workload import FlopModel, draw_batches


@dataclass(frozen=True)
class RunSpec:
    """Everything one benchmark child needs; plain data so it crosses a spawn boundary."""

    method: str  # pack | peft-padded | peft-packed | procs
    config: str
    base_dir: str
    data_paths: tuple[str, ...]
    names: tuple[str, ...]
    steps: int
    warmup: int
    batch_size: int
    max_seq_len: int
    targets: tuple[str, ...] | str
    r: int
    alpha: float
    learning_rate: float
    seed: int
    device: str
    dtype: str
    threads: int
    out_dir: str
    flops: FlopModel
    kernel: str = "auto"
    packing: bool = True
    memory_budget_bytes: int | None = None  # the pack's budget: checkpointing turns on if it would not fit
    checkpointing: str = "auto"  # the pack's activation checkpointing: auto (by budget), on, off
    max_tokens_per_pass: int | None = None  # the pack's pass size; None: the engine's default

    @property
    def tokenizer_dir(self) -> str:
        """The base's tokenizer (`workers.bases.tiny.TOKENIZER_DIR`: its own class, whatever the model
        type)."""
        from workers.bases.tiny import TOKENIZER_DIR

        alone = Path(self.base_dir) / TOKENIZER_DIR
        return str(alone) if alone.is_dir() else self.base_dir

    @property
    def k(self) -> int:
        return len(self.names)

    def batches(self, tokenizer: Any) -> dict[str, list[list[Any]]]:
        return draw_batches(
            self.names,
            self.data_paths,
            tokenizer,
            steps=self.steps,
            batch_size=self.batch_size,
            max_seq_len=self.max_seq_len,
            seed=self.seed,
        )


@dataclass
class StepTrace:
    """Per-adapter timestamps and cumulative token counts at each optimizer step."""

    times: dict[tuple[str, int], float] = field(default_factory=dict)
    tokens: dict[tuple[str, int], int] = field(default_factory=dict)
    losses: dict[tuple[str, int], float] = field(default_factory=dict)

    def record(self, adapter: str, step: int, tokens: int, loss: float) -> None:
        key = (adapter, step)
        self.times[key], self.tokens[key], self.losses[key] = time.monotonic(), tokens, loss


def useful_work(spec: RunSpec, batches: dict[str, list[list[Any]]]) -> dict[str, float]:
    """Non-pad tokens and useful FLOPs of the steps after warm-up (the same for every method)."""
    tokens = flops = 0.0
    for name in spec.names:
        for step in range(spec.warmup, spec.steps):
            for ex in batches[name][step]:
                n = len(ex.input_ids)
                tokens += n
                flops += spec.flops.sequence_flops(n)
    return {"steady_tokens": tokens, "steady_flops": flops}


# ---- lorafleet ----


def pack_plan(spec: RunSpec) -> Any:
    from workers.contract.plan import AdapterTask, DataConfig, LoraConfig, PackPlan, TrainConfig

    targets = list(spec.targets) if isinstance(spec.targets, tuple) else spec.targets
    train = TrainConfig(
        steps=spec.steps,
        batch_size=spec.batch_size,
        max_seq_len=spec.max_seq_len,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        eval_every=0,
        checkpoint_every=0,
        packing=spec.packing,
    )
    adapters = [
        AdapterTask(
            name=name,
            lora=LoraConfig(r=spec.r, alpha=spec.alpha, target_modules=targets),
            train=train,
            data=DataConfig(path=Path(path)),
            output_dir=Path(spec.out_dir) / name,
        )
        for name, path in zip(spec.names, spec.data_paths, strict=True)
    ]
    return PackPlan(
        pack_id=f"bench-{spec.config}-k{spec.k}",
        base_model=spec.base_dir,
        tokenizer=spec.tokenizer_dir,
        device=spec.device,
        dtype=spec.dtype,
        adapters=adapters,
        activation_checkpointing=spec.checkpointing,
        memory_budget_bytes=spec.memory_budget_bytes,
        max_tokens_per_pass=spec.max_tokens_per_pass,
    )


@dataclass
class EngineProbe:
    """What the engine actually computed, counted inside a benchmark child (engine files untouched).

    Wraps, in this process only, `workers.training.trainer.build_batch` (the padded shape of every pass the
    engine forwards), `MultiLoraLinear._use_grouped` (which LoRA kernel each wrapped linear took) and
    `MultiLoraModel.set_checkpointing` (whether a pass recomputed its layers).
    """

    passes: list[tuple[float, int, int]] = field(default_factory=list)  # (time, padded, non-pad)
    rss_at_first_forward_mb: float | None = None
    kernel_calls: dict[str, int] = field(default_factory=lambda: {"grouped": 0, "loop": 0})
    checkpointed_passes: int = 0

    def install(self) -> EngineProbe:
        import workers.training.trainer as trainer
        from multilora_bench.harness import current_rss_mb
        from workers.engine.multilora import MultiLoraLinear, MultiLoraModel

        build, use_grouped = trainer.build_batch, MultiLoraLinear._use_grouped
        set_checkpointing = MultiLoraModel.set_checkpointing

        def counting_set_checkpointing(model: Any, enabled: bool) -> None:
            self.checkpointed_passes += bool(enabled)
            set_checkpointing(model, enabled)

        def counting_build(*args: Any, **kwargs: Any) -> Any:
            if self.rss_at_first_forward_mb is None:
                self.rss_at_first_forward_mb = current_rss_mb()
            batch = build(*args, **kwargs)
            self.passes.append((time.monotonic(), batch.padded_tokens, batch.real_tokens))
            return batch

        def counting_use_grouped(layer: Any, *args: Any) -> bool:
            grouped = use_grouped(layer, *args)
            self.kernel_calls["grouped" if grouped else "loop"] += 1
            return grouped

        trainer.build_batch = counting_build
        MultiLoraLinear._use_grouped = counting_use_grouped
        MultiLoraModel.set_checkpointing = counting_set_checkpointing
        return self

    def steady(self, start: float) -> dict[str, Any]:
        after = [(padded, real) for t, padded, real in self.passes if t > start]
        calls = sum(self.kernel_calls.values())
        return {
            "steady_padded_tokens": sum(p for p, _ in after) if after else None,
            "probe_tokens": sum(r for _, r in after) if after else None,
            "forward_passes": len(after) if after else None,
            "grouped_share": self.kernel_calls["grouped"] / calls if calls else None,
            "rss_at_first_forward_mb": self.rss_at_first_forward_mb,
            "checkpointed": self.checkpointed_passes > 0,
        }


def run_pack_method(spec: RunSpec, barrier: Any = None) -> dict[str, Any]:
    """lorafleet; `barrier` (procs) lines the K children up after their warm-up steps."""
    from transformers import AutoTokenizer

    from workers.contract.plan import Outcome, StepEvent
    from workers.training.pack import run_pack

    probe = EngineProbe().install()
    trace = StepTrace()
    warm: dict[str, float] = {}
    warm_at: list[float] = []

    def emit(event: Any) -> None:
        if isinstance(event, StepEvent):
            trace.record(event.adapter, event.step, event.tokens, event.loss)
            if event.step == spec.warmup:
                warm[event.adapter] = time.monotonic()
                if len(warm) == spec.k:
                    if barrier is not None:
                        barrier.wait()
                    warm_at.append(time.monotonic())

    started = time.monotonic()
    result = run_pack(pack_plan(spec), emit, kernel=spec.kernel)
    failed = {n: d.error for n, d in result.adapters.items() if d.status != Outcome.TRAINED}
    if failed:
        raise RuntimeError(f"adapters failed: {failed}")
    start = warm_at[0]
    end = max(trace.times[(n, spec.steps)] for n in spec.names)
    event_tokens = sum(trace.tokens[(n, spec.steps)] - trace.tokens[(n, spec.warmup)] for n in spec.names)
    work = useful_work(spec, spec.batches(AutoTokenizer.from_pretrained(spec.tokenizer_dir)))
    measured = probe.steady(start)
    return {
        **work,
        **measured,
        "t_start": start,
        "t_end": end,
        "steady_s": end - start,
        "tokens_match_plan": event_tokens == work["steady_tokens"]
        and measured["probe_tokens"] in (None, work["steady_tokens"]),
        "final_losses": {n: trace.losses[(n, spec.steps)] for n in spec.names},
        "wall_s": time.monotonic() - started,
    }


# ---- sequential PEFT ----


def init_like_lorafleet(peft_model: Any, name: str, seed: int) -> None:
    """Give PEFT's lora_A the initial values lorafleet draws for (seed, adapter, module); B stays zero."""
    from workers.engine.adapters import seeded_generator

    with torch.no_grad():
        for path, module in peft_model.base_model.model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            weight = module.lora_A["default"].weight
            fresh = torch.empty(weight.shape, device=weight.device, dtype=torch.float32)
            generator = seeded_generator(weight.device, seed, name, path)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            weight.copy_(fresh)


def padded_batch(rows: list[Any], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Dynamic padding: rows right-padded to the batch's longest; (inputs, shifted targets, padded)."""
    from workers.engine.layout import Part, build_batch

    batch = build_batch([Part(None, rows, packing=False)], pad_id)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    return inputs, batch.targets, batch.padded_tokens  # targets: shifted, IGNORE_INDEX in padding


def flattened_batch(rows: list[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """`DataCollatorWithFlattening`: one row of all documents, position ids restarting, no mask."""
    from workers.engine.examples import IGNORE_INDEX

    ids, positions, targets = [], [], []
    for ex in rows:
        ids += ex.input_ids
        positions += range(len(ex.input_ids))
        targets += [*ex.labels[1:], IGNORE_INDEX]
    inputs = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])}
    return inputs, torch.tensor([targets]), len(ids)


def peft_train_one(
    base: Any, spec: RunSpec, name: str, batches: list[list[Any]], pad_id: int
) -> tuple[Any, float, float, int]:
    """Train one adapter with a plain PEFT loop; (bare base, steady seconds, final loss, padded tokens)."""
    from peft import get_peft_model
    from torch.nn import functional as F
    from torch.optim.lr_scheduler import LambdaLR

    from workers.contract.plan import LoraConfig, TrainConfig
    from workers.engine.examples import IGNORE_INDEX
    from workers.training.checkpoint import peft_config
    from workers.training.trainer import lr_factor

    targets = list(spec.targets) if isinstance(spec.targets, tuple) else spec.targets
    config = peft_config(LoraConfig(r=spec.r, alpha=spec.alpha, target_modules=targets))
    model = get_peft_model(base, config)  # adapters in fp32 on a bf16 base (autocast_adapter_dtype)
    init_like_lorafleet(model, name, spec.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0, foreach=True)
    schedule = TrainConfig(steps=spec.steps, learning_rate=spec.learning_rate)
    scheduler = LambdaLR(optimizer, lambda s: lr_factor(s, schedule))
    start = loss_value = math.nan
    padded = 0
    for step, rows in enumerate(batches, start=1):
        if spec.method == "peft-packed":
            inputs, targets_t, width = flattened_batch(rows)
        else:
            inputs, targets_t, width = padded_batch(rows, pad_id)
        inputs = {k: v.to(spec.device) for k, v in inputs.items()}
        logits = model(**inputs, use_cache=False).logits
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets_t.to(spec.device).flatten(), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)  # synchronises, as the engine does when it reports a step
        if step == spec.warmup:
            start = time.monotonic()
        elif step > spec.warmup:
            padded += width
    return model.unload(), time.monotonic() - start, loss_value, padded


def run_peft_method(spec: RunSpec, barrier: Any = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir)
    batches = spec.batches(tokenizer)
    dtype = getattr(torch, spec.dtype)
    base = AutoModelForCausalLM.from_pretrained(spec.base_dir, dtype=dtype).to(spec.device)
    steady = 0.0
    padded = 0
    losses: dict[str, float] = {}
    wall_start = time.monotonic()
    for name in spec.names:
        base, seconds, losses[name], width = peft_train_one(
            base, spec, name, batches[name], tokenizer.pad_token_id
        )
        steady += seconds
        padded += width
    return {
        **useful_work(spec, batches),
        "steady_padded_tokens": padded,
        "steady_s": steady,
        "final_losses": losses,
        "wall_s": time.monotonic() - wall_start,
    }


METHODS: dict[str, Callable[..., dict[str, Any]]] = {
    "pack": run_pack_method,
    "peft-padded": run_peft_method,
    "peft-packed": run_peft_method,
    "procs": run_pack_method,
}
