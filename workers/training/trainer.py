"""Train K adapters in one batched forward/backward over a shared frozen base.

The recipe, per pack step:
  1. every active adapter contributes one micro-batch (its own rows, its own data order);
  2. one forward over all rows: the base GEMMs run once, each row segment goes through its adapter's A, B;
  3. each adapter's loss is the mean over *its own* target tokens (of its whole accumulation window), and
     the pack loss is their sum, so each adapter's gradient is exactly what it would get training alone;
  4. adapters whose window is complete take an optimizer step: their own clipping, AdamW state and LR
     schedule; then eval, checkpoint and finish on their own schedule. A finished adapter leaves the model
     and its slot can be refilled.

With several workers (torch.distributed, e.g. from Ray Train) each worker takes a strided share of every
adapter's rows and the LoRA gradients are summed with one coalesced all-reduce per step. We do not wrap the
model in DDP because DDP fixes its parameter set at construction and our adapters come and go between steps;
the math is the same (loss normalised by the global token count, gradients summed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from workers import storage
from workers.contract import memory
from workers.contract.plan import (
    AdapterDone,
    AdapterTask,
    CheckpointEvent,
    Checkpointing,
    EvalEvent,
    EvalSample,
    Event,
    Outcome,
    StartEvent,
    StepEvent,
    TrainConfig,
    branch_problems,
    perplexity,
)
from workers.engine.adapters import Adapter, LoraKernel
from workers.engine.layout import Batch, Part, attention_weight_of, build_batch
from workers.engine.model import LoadedBase
from workers.engine.multilora import MultiLoraModel, linear_module_names, resolve_target_modules
from workers.engine.varlen import use_varlen_attention
from workers.evaluation.generation import GenerationRequest, generate_greedy
from workers.evaluation.scoring import score
from workers.training import checkpoint as ckpt
from workers.training.data import AdapterData, EvalRecord, Example, SampleStream, load_adapter_data

EmitFn = Callable[[Event], None]
EVAL_TOKENS_PER_FORWARD = 16_384
SAMPLE_CHARS = 2_000  # a judged sample's prompt, reference and outputs are cut to this many characters


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine/linear decay to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def length_groups(parts: list[list[Example]], min_saving: float = 0.10) -> list[list[list[Example]]]:
    """Unpacked mode: split a pack's rows into a short and a long forward pass when that saves padding.

    One padded forward pads every row to the longest of the whole pack, which wastes more the more
    adapters share it. Two passes (rows up to a length threshold, then the rest; each adapter keeps its
    rows in order) are used when they compute at least `min_saving` fewer padded tokens. The gradients are the
    same sums either way.
    """
    lengths = sorted(len(ex.input_ids) for part in parts for ex in part)
    if len(lengths) < 2:
        return [parts]
    single = len(lengths) * lengths[-1]
    best_cost, threshold = single, None
    for i in range(1, len(lengths)):
        if lengths[i] != lengths[i - 1]:
            cost = i * lengths[i - 1] + (len(lengths) - i) * lengths[-1]
            if cost < best_cost:
                best_cost, threshold = cost, lengths[i - 1]
    if threshold is None or best_cost > (1.0 - min_saving) * single:
        return [parts]
    short = [[ex for ex in part if len(ex.input_ids) <= threshold] for part in parts]
    long = [[ex for ex in part if len(ex.input_ids) > threshold] for part in parts]
    return [short, long]


def adapter_passes(parts: list[list[Example]], max_tokens: int | None) -> list[list[list[Example]]]:
    """Packed mode: the step's parts in passes of at most `max_tokens` tokens (one pass if None).

    A pass takes whole adapters, in order, so an adapter's documents are laid out, dropped out and summed
    exactly as in one pass: its gradients (and result) do not depend on how the step is split. An adapter
    whose own micro-batch is over the limit gets a pass of its own.
    """
    sizes = [sum(len(ex.input_ids) for ex in part) for part in parts]
    if max_tokens is None or sum(sizes) <= max_tokens:
        return [parts]
    passes: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if size == 0:
            continue
        if passes[-1] and used + size > max_tokens:
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += size
    return [[part if i in members else [] for i, part in enumerate(parts)] for members in passes]


def new_optimizer(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """One adapter's own AdamW (decoupled weight decay, the multi-tensor path); training sessions
    (`workers.sessions`) use the same, so a session and a pack train an adapter identically."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def clip_and_step(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float | None
) -> float:
    """Clip the adapter's gradients to `max_norm` (None: no clipping), step, clear them; the norm before
    clipping."""
    limit = max_norm if max_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit, foreach=True))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass
class AdapterRun:
    """One adapter's training state inside a pack; nothing here is shared with its neighbours."""

    task: AdapterTask
    adapter: Adapter
    data: AdapterData
    stream: SampleStream
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    step: int = 0
    tokens: int = 0
    micro: int = 0
    window: list[list[Example]] = field(default_factory=list)
    window_targets: int = 0
    window_loss: torch.Tensor | None = None
    session_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_eval_loss: float | None = None
    parent_eval_loss: float | None = None  # `baseline_from`'s loss on the same eval data (final eval)
    checkpointed_step: int | None = None  # the step of its latest checkpoint written in this pack
    yielding: bool = False  # asked to make room: it leaves at its next optimizer-step boundary

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def cfg(self) -> TrainConfig:
        return self.task.train

    def begin_window(self) -> None:
        """Draw the whole accumulation window up front, so the loss can be normalised by its token count."""
        cfg = self.cfg
        self.window = [
            [self.data.train[i] for i in self.stream.next_indices(cfg.batch_size)]
            for _ in range(cfg.grad_accum_steps)
        ]
        self.window_targets = sum(ex.n_targets for batch in self.window for ex in batch)
        self.window_loss = None

    def training_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "stream": self.stream.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "dropout_rng": self.adapter.dropout_generator.get_state(),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.stream.load_state_dict(state["stream"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.adapter.dropout_generator.set_state(state["dropout_rng"])


def _token_chunks(items: list[tuple[int, Example]], tokens: int) -> list[list[tuple[int, Example]]]:
    """Consecutive runs of `items` with at most `tokens` tokens each (at least one item per run)."""
    chunks: list[list[tuple[int, Example]]] = []
    size = tokens
    for item in items:
        n = len(item[1].input_ids)
        if size + n > tokens:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


class EvalResult(NamedTuple):
    """One model's (an adapter's, the base's) eval on a list of examples; NaN where no token counted."""

    loss: float
    tokens: int
    token_accuracy: float  # share of target tokens whose argmax prediction is the target


def _clip(text: str, limit: int = SAMPLE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PackTrainer:
    """Owns the shared base and the per-adapter runs; `step()` advances every active adapter once."""

    def __init__(
        self,
        base: LoadedBase,
        base_model: str,
        emit: EmitFn,
        pack_id: str,
        kernel: LoraKernel = "auto",
        checkpointing: Checkpointing = "auto",
        memory_budget_bytes: int | None = None,
        max_tokens_per_pass: int | None = None,
        allow_user_scorers: bool = True,
    ):
        self.model = MultiLoraModel(base.model, kernel=kernel)
        self.tokenizer = base.tokenizer
        self.device = base.device
        self.base_model = base_model
        self.emit = emit
        self.pack_id = pack_id
        self.runs: dict[str, AdapterRun] = {}
        self.done: dict[str, AdapterDone] = {}
        self.rank, self.world = _world()
        self._all_linear = linear_module_names(base.model)
        self.checkpointing = checkpointing
        self.memory_budget_bytes = memory_budget_bytes
        self.allow_user_scorers = allow_user_scorers
        cpu = self.device.type == "cpu"
        self.max_tokens_per_pass = max_tokens_per_pass or (memory.CPU_PASS_TOKENS if cpu else None)
        config = base.model.config
        self._config = config.to_dict()
        if checkpointing == "auto" and memory_budget_bytes is not None:
            _ = self._info  # a base the memory model cannot size fails here, not at the first step
        self._dtype = str(base.model.dtype).removeprefix("torch.")
        self._varlen = use_varlen_attention(base.model)
        self._attention_weight = attention_weight_of(config, self._varlen)
        self.last_batch: Batch | None = None  # the last training pass's layout (benchmarks read it)

    @cached_property
    def _info(self) -> memory.BaseModelInfo:
        """The base's shape for the memory model (`model_info_from_config`, as the scheduler reads it)."""
        try:
            return memory.model_info_from_config(self._config)
        except ValueError as exc:
            raise ValueError(
                f"{exc}; `activation_checkpointing: auto` under a memory budget needs the memory model: set "
                "it to `on` or `off` for this base"
            ) from None

    # ---- setup ----

    def add(self, task: AdapterTask) -> None:
        """Attach an adapter (fresh, branched from `init_from`, or resumed); a bad task fails alone."""
        try:
            self._add(task)
        except (ValueError, OSError) as exc:  # DataError, CheckpointError, bad targets, missing files
            self._finish_failed(task, f"{type(exc).__name__}: {exc}")

    def _check_branch(self, task: AdapterTask, files: ckpt.AdapterFiles, source: str) -> None:
        """`branch_problems` on what the weights are: the saved module paths against the paths the
        task's targets select on this base (names, suffixes or 'all-linear' alike)."""
        paths = sorted(resolve_target_modules(self.model.base, task.lora.target_modules))
        problems = branch_problems(
            files.lora.model_copy(update={"target_modules": sorted(files.weights)}),
            task.lora.model_copy(update={"target_modules": paths}),
        )
        if problems:
            raise ValueError(f"adapter {task.name!r} cannot start from {source!r}: " + "; ".join(problems))

    def _add(self, task: AdapterTask) -> None:
        final_dir = storage.join(task.output_dir, ckpt.FINAL_DIR)
        if task.resume_from is None and ckpt.is_complete(final_dir):
            meta = ckpt.read_meta(final_dir)  # finished by an earlier attempt of this pack: nothing to redo
            self._record_done(
                task,
                AdapterDone(
                    pack_id=self.pack_id,
                    adapter=task.name,
                    step=meta.get("step", task.train.steps),
                    status=Outcome.TRAINED,
                    final_dir=final_dir,
                    eval_loss=meta.get("eval_loss"),
                ),
            )
            return
        # An earlier attempt's checkpoint wins over `init_from`: that is how a restarted worker resumes.
        resume_from = task.resume_from or ckpt.latest_checkpoint(task.output_dir)
        source = resume_from or task.init_from
        files = ckpt.read_adapter(source) if source is not None else None
        if files is not None:
            self._check_branch(task, files, str(source))
        data = load_adapter_data(
            task.data,
            self.tokenizer,
            task.train.max_seq_len,
            task.train.seed,
            task.name,
            max_record_bytes=task.max_record_bytes,
            eval_records=task.eval.max_examples,
        )
        if resume_from is not None:
            _check_same_data(task.name, resume_from, data.fingerprint)
        adapter = self.model.add_adapter(
            task.name,
            task.lora,
            seed=task.train.seed,
            rank=self.rank,
            init=files.weights if files is not None else None,
        )
        optimizer = new_optimizer(adapter.parameters(), task.train.learning_rate, task.train.weight_decay)
        scheduler = LambdaLR(optimizer, lambda s, cfg=task.train: lr_factor(s, cfg))
        stream = SampleStream(len(data.train), task.train.seed, task.name)
        run = AdapterRun(task, adapter, data, stream, optimizer, scheduler)
        if resume_from is not None:
            run.load_training_state(ckpt.read_training_state(resume_from))
            run.checkpointed_step = run.step
        self.runs[task.name] = run
        self._emit(
            StartEvent(
                pack_id=self.pack_id,
                adapter=task.name,
                step=run.step,
                data_fingerprint=data.fingerprint,
                train_examples=len(data.train),
                eval_examples=len(data.eval),
                resumed=resume_from is not None,
            )
        )
        if run.step >= task.train.steps:  # e.g. `steps: 0`: the branch is its parent's weights, evaluated
            self._eval_and_report([run] if run.data.eval else [])
            self._finish(run)

    @property
    def active(self) -> list[AdapterRun]:
        return list(self.runs.values())

    # ---- one pack step ----

    def step(self) -> None:
        active = self.active
        if not active:
            return
        parts: list[list[Example]] = []
        for run in active:
            if run.micro == 0:
                run.begin_window()
            parts.append(run.window[run.micro][self.rank :: self.world])
            window_tokens = sum(len(ex.input_ids) for ex in run.window[run.micro])
            run.tokens += window_tokens
            run.session_tokens += window_tokens
        if any(run.cfg.packing for run in active):
            groups = adapter_passes(parts, self.max_tokens_per_pass)
        else:  # unpacked: padded rows, regrouped by length only when no adapter draws dropout masks
            splittable = not any(run.adapter.dropout > 0 for run in active)
            groups = length_groups(parts) if splittable else [parts]
        for group in groups:
            self._forward_backward(active, group)
        for run in active:
            run.micro += 1
        completing = [run for run in active if run.micro == run.cfg.grad_accum_steps]
        self._sync_gradients(completing)
        stepped = [run for run in completing if self._optimizer_step(run)]
        self._after_steps(stepped)
        self.leave_yielding()

    def _forward_backward(self, active: list[AdapterRun], parts: list[list[Example]]) -> None:
        """One batched forward/backward; each adapter's loss is normalised by its own window's targets."""
        if not any(parts):
            return
        layout = [Part(run.name, mine, run.cfg.packing) for run, mine in zip(active, parts, strict=True)]
        batch = self._batch(layout)
        self.last_batch = batch
        self.model.set_checkpointing(self._checkpoint_this(batch, active))
        sums = self.model.segment_losses(batch.to(self.device), training=True)
        total = sums.new_zeros(())
        for i, run in enumerate(active):
            total = total + sums[i] / run.window_targets
            seg = sums[i].detach()
            run.window_loss = seg if run.window_loss is None else run.window_loss + seg
        total.backward()

    def _batch(self, parts: list[Part]) -> Batch:
        return build_batch(parts, self.tokenizer.pad_token_id, self._attention_weight)

    def _checkpoint_this(self, batch: Batch, active: list[AdapterRun]) -> bool:
        """Checkpointing for this pass: forced on/off, or (auto) on when the memory model says the pass
        would not fit `memory_budget_bytes` without it."""
        if self.checkpointing != "auto":
            return self.checkpointing == "on"
        if self.memory_budget_bytes is None:
            return False
        adapters = [run.adapter for run in active]
        need = self._static_bytes() + self.pass_estimate(adapters, batch.padded_tokens, batch.width)
        return need > self.memory_budget_bytes

    def pass_estimate(self, adapters: list[Adapter], tokens: int, width: int) -> int:
        """What a pass of `adapters` over `tokens` in rows of `width` adds to the loaded base, without
        checkpointing (`memory.pass_bytes`), from what the engine holds: the adapters' real parameters
        and module paths. The scheduler's numbers for the same configs are the same (test_memory)."""
        lora = memory.LoraInputs()
        for adapter in adapters:
            lora = lora | memory.LoraInputs.of(list(adapter.modules))
        return memory.pass_bytes(
            self._info,
            self._dtype,
            tokens=tokens,
            width=0 if self._varlen else width,  # variable-length attention builds no mask
            checkpointing=False,
            lora=lora,
            lora_params=sum(p.numel() for adapter in adapters for p in adapter.parameters()),
            cpu=self.device.type == "cpu",
        )

    def _static_bytes(self) -> int:
        """The base and the runtime: measured on CUDA (torch's live allocations), estimated elsewhere
        (a CPU process's resident set keeps freed memory, so it would count the last pass twice)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        base = self.model.base
        weights = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers()))
        return weights + memory.RUNTIME_OVERHEAD_BYTES

    def _sync_gradients(self, runs: list[AdapterRun]) -> None:
        """Sum LoRA gradients and window losses over workers with one flat all-reduce."""
        if self.world == 1 or not runs:
            return
        params = [p for run in runs for p in run.adapter.parameters()]
        for p in params:
            if p.grad is None:  # this worker had no rows of that adapter this window
                p.grad = torch.zeros_like(p)
        zero = torch.zeros((), device=self.device)
        losses = torch.stack([run.window_loss if run.window_loss is not None else zero for run in runs])
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [losses.to(params[0].dtype)])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        for run, loss in zip(runs, flat[offset:], strict=True):
            run.window_loss = loss

    def _optimizer_step(self, run: AdapterRun) -> bool:
        """Clip, step and report one adapter; False (and the adapter leaves) if its loss diverged."""
        loss = float(run.window_loss) / run.window_targets if run.window_loss is not None else float("nan")
        run.micro = 0
        if not math.isfinite(loss):
            run.optimizer.zero_grad(set_to_none=True)
            self._finish_failed(
                run.task,
                f"loss is not finite at step {run.step + 1}; lower "
                "`train.learning_rate` or set `train.max_grad_norm`",
                step=run.step,
            )
            return False
        lr = run.optimizer.param_groups[0]["lr"]
        grad_norm = clip_and_step(run.optimizer, run.adapter.parameters(), run.cfg.max_grad_norm)
        run.scheduler.step()
        run.step += 1
        elapsed = max(1e-9, time.perf_counter() - run.started)
        self._emit(
            StepEvent(
                pack_id=self.pack_id,
                adapter=run.name,
                step=run.step,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens=run.tokens,
                tokens_per_s=run.session_tokens / elapsed,
            )
        )
        return True

    def _after_steps(self, runs: list[AdapterRun]) -> None:
        due_eval = [
            r
            for r in runs
            if r.data.eval
            and (r.step >= r.cfg.steps or (r.cfg.eval_every and r.step % r.cfg.eval_every == 0))
        ]
        self._eval_and_report(due_eval)
        for run in runs:
            cfg = run.cfg
            if run.step >= cfg.steps:
                self._finish(run)
            elif cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
                self._checkpoint(run, ckpt.checkpoint_dir(run.task.output_dir, run.step), final=False)
                if self.rank == 0:
                    ckpt.prune_checkpoints(run.task.output_dir, cfg.keep_checkpoints)

    # ---- eval ----

    @torch.no_grad()
    def evaluate(self, requests: Sequence[tuple[str | None, Sequence[Example]]]) -> list[EvalResult]:
        """Mean next-token loss, target-token count and token accuracy per (adapter or None for the base,
        examples) pair.

        Examples are packed (exact: attention never crosses documents), `EVAL_TOKENS_PER_FORWARD` tokens
        at a time.
        """
        owned = [(i, ex) for i, (_, examples) in enumerate(requests) for ex in examples]
        mine = owned[self.rank :: self.world]
        # loss sums, target counts, argmax hits per request
        totals = torch.zeros((3, len(requests)), dtype=torch.float64, device=self.device)
        for chunk in _token_chunks(mine, EVAL_TOKENS_PER_FORWARD):
            runs: list[tuple[int, list[Example]]] = []  # consecutive examples of one request
            for owner, example in chunk:
                if not runs or runs[-1][0] != owner:
                    runs.append((owner, []))
                runs[-1][1].append(example)
            owners = [owner for owner, _ in runs]
            parts = [Part(requests[owner][0], examples) for owner, examples in runs]
            batch = self._batch(parts)
            self.model.set_checkpointing(False)
            losses, hits = self.model.segment_eval(batch.to(self.device))
            for owner, part, loss, hit in zip(owners, parts, losses, hits, strict=True):
                totals[0, owner] += loss.double()
                totals[1, owner] += sum(ex.n_targets for ex in part.examples)
                totals[2, owner] += hit.double()
        if self.world > 1:
            dist.all_reduce(totals)
        return [
            EvalResult(float(s / c), int(c), float(h / c)) if c > 0 else EvalResult(math.nan, 0, math.nan)
            for s, c, h in totals.T.tolist()
        ]

    def _eval_and_report(self, runs: list[AdapterRun]) -> None:
        """Eval loss and token accuracy of `runs` on their eval splits, in one pass. For those at their
        last step (`final`), the same for the base and for a child's parent (`baseline_from`, attached
        for the occasion) on the same records, and every eval record with a prompt judged by generation
        through the adapter, the base and the parent, all finishing adapters in one batched `generate`."""
        if not runs:
            return
        finals = [run for run in runs if run.step >= run.cfg.steps]
        parents = self._attach_parents(finals)
        try:
            references = [(run, "base_", None) for run in finals]
            references += [(run, "parent_", parents[run.name]) for run in finals if run.name in parents]
            requests = [(run.name, self._eval_examples(run)) for run in runs]
            requests += [(route, self._eval_examples(run)) for run, _, route in references]
            results = self.evaluate(requests)
            judged = self._generate(finals, parents)
        finally:
            for name in parents.values():
                self.model.remove_adapter(name)
        extra: dict[str, dict[str, float]] = {run.name: {} for run in runs}
        for (run, prefix, _), result in zip(references, results[len(runs) :], strict=True):
            extra[run.name].update(
                {f"{prefix}eval_loss": result.loss, f"{prefix}eval_token_accuracy": result.token_accuracy}
            )
            if prefix == "parent_":
                run.parent_eval_loss = result.loss
        for run, result in zip(runs, results[: len(runs)], strict=True):
            run.last_eval_loss = result.loss
            if self.rank != 0:
                continue
            metrics = {"eval_token_accuracy": result.token_accuracy, **extra[run.name]}
            samples: list[EvalSample] = []
            errors: dict[str, str] = {}
            if run.name in judged:
                scored, samples, errors = self._score(run, *judged[run.name])
                metrics.update(scored)
            self._emit(
                EvalEvent(
                    pack_id=self.pack_id,
                    adapter=run.name,
                    step=run.step,
                    eval_loss=result.loss,
                    perplexity=perplexity(result.loss),
                    eval_tokens=result.tokens,
                    final=run.step >= run.cfg.steps,
                    metrics=metrics,
                    samples=samples,
                    errors=errors,
                )
            )

    def _attach_parents(self, runs: list[AdapterRun]) -> dict[str, str]:
        """Attach each run's `baseline_from` adapter under a name of its own; {run name: that name}."""
        parents: dict[str, str] = {}
        try:
            for run in runs:
                source = run.task.baseline_from
                if source is None:
                    continue
                files = ckpt.read_adapter(source)
                name = f"{run.name}@baseline"  # not a valid adapter name, so it cannot clash with a real one
                ckpt.attach_frozen(self.model, name, files)
                parents[run.name] = name
        except BaseException:
            for name in parents.values():
                self.model.remove_adapter(name)
            raise
        return parents

    def _generate(
        self, runs: list[AdapterRun], parents: dict[str, str]
    ) -> dict[str, tuple[list[EvalRecord], dict[str, list[str]]]]:
        """Greedy answers to each run's judged eval records through the adapter ("" prefix), the base
        ("base_") and the parent ("parent_"), in one batched generation for all runs. With several
        workers each generates a strided share of the rows and rank 0 gathers them (answers do not
        depend on their neighbours, so the split changes nothing)."""
        plan: list[tuple[AdapterRun, list[EvalRecord], list[tuple[str, str | None]]]] = []
        requests: list[GenerationRequest] = []
        for run in runs:
            cfg = run.task.eval
            records = run.data.eval_records[: cfg.max_examples]
            if not records or not (cfg.scorers or cfg.samples):
                continue
            routes: list[tuple[str, str | None]] = [("", run.name), ("base_", None)]
            if run.name in parents:
                routes.append(("parent_", parents[run.name]))
            plan.append((run, records, routes))
            for _, route in routes:
                requests += [GenerationRequest(route, r.prompt_ids, cfg.max_new_tokens) for r in records]
        if not plan:
            return {}
        mine = generate_greedy(self.model, self.tokenizer, requests[self.rank :: self.world], self.device)
        if self.world > 1:
            shares: list[list[str] | None] = [None] * self.world
            dist.all_gather_object(shares, mine)
            answers = [""] * len(requests)
            for rank, share in enumerate(shares):
                answers[rank :: self.world] = share or []
        else:
            answers = mine
        out: dict[str, tuple[list[EvalRecord], dict[str, list[str]]]] = {}
        at = 0
        for run, records, routes in plan:
            by_prefix: dict[str, list[str]] = {}
            for prefix, _ in routes:
                by_prefix[prefix] = answers[at : at + len(records)]
                at += len(records)
            out[run.name] = (records, by_prefix)
        return out

    def _score(
        self, run: AdapterRun, records: list[EvalRecord], answers: dict[str, list[str]]
    ) -> tuple[dict[str, float], list[EvalSample], dict[str, str]]:
        """The run's scorers over each model's answers (`eval_*`, `base_eval_*`, `parent_eval_*`), the
        first `eval.samples` records as samples with the adapter's scores, and the metrics that failed."""
        cfg = run.task.eval
        references = [record.reference for record in records]
        metrics: dict[str, float] = {}
        errors: dict[str, str] = {}
        adapter_scores = None
        for prefix, outputs in answers.items():
            scores = score(cfg, outputs, references, self.allow_user_scorers)
            metrics.update(scores.means(prefix))
            errors.update({prefix + metric: why for metric, why in scores.errors.items()})
            if prefix == "":
                adapter_scores = scores
        assert adapter_scores is not None
        samples = [
            EvalSample(
                prompt=_clip(record.prompt),
                reference=_clip(record.reference),
                output=_clip(answers[""][k]),
                base_output=_clip(answers["base_"][k]),
                parent_output=_clip(answers["parent_"][k]) if "parent_" in answers else None,
                scores={metric: values[k] for metric, values in adapter_scores.per_record.items()},
            )
            for k, record in enumerate(records[: cfg.samples])
        ]
        return metrics, samples, errors

    @staticmethod
    def _eval_examples(run: AdapterRun) -> list[Example]:
        limit = run.cfg.eval_max_examples
        return run.data.eval[:limit] if limit else run.data.eval

    # ---- checkpoints and finishing ----

    def _checkpoint(self, run: AdapterRun, dest: str, final: bool) -> None:
        run.checkpointed_step = run.step
        if self.rank == 0:
            ckpt.write_checkpoint(
                dest,
                run.adapter,
                base_model=self.base_model,
                all_linear_paths=self._all_linear,
                training_state=run.training_state(),
                meta={
                    "step": run.step,
                    "final": final,
                    "data_fingerprint": run.data.fingerprint,
                    "data_format": run.data.kind,  # how serving formats prompts (`data.prompt_ids`)
                    "eval_loss": run.last_eval_loss,
                    "lora": run.task.lora.model_dump(mode="json"),
                    "train": run.task.train.model_dump(mode="json"),
                },
            )
            self._emit(
                CheckpointEvent(pack_id=self.pack_id, adapter=run.name, step=run.step, path=dest, final=final)
            )
        if self.world > 1:
            dist.barrier()

    def _finish(self, run: AdapterRun) -> None:
        final_dir = storage.join(run.task.output_dir, ckpt.FINAL_DIR)
        self._checkpoint(run, final_dir, final=True)
        self._detach(run)
        self._record_done(
            run.task,
            AdapterDone(
                pack_id=self.pack_id,
                adapter=run.name,
                step=run.step,
                status=Outcome.TRAINED,
                final_dir=final_dir,
                eval_loss=run.last_eval_loss,
                baseline_eval_loss=run.parent_eval_loss,  # the parent's loss, from the final eval
            ),
        )

    def request_yield(self, name: str) -> None:
        """Ask an adapter to make room for other work: it leaves at its next optimizer-step boundary (now,
        if it is at one), right after a checkpoint of that step, and reports `yielded`. Resumed from that
        checkpoint it continues exactly where it left off: yielding costs a checkpoint, never a step.
        A name not training here (finished meanwhile, or never taken) is ignored."""
        run = self.runs.get(name)
        if run is not None:
            run.yielding = True
        self.leave_yielding()

    def leave_yielding(self) -> None:
        """Adapters asked to yield that are at an optimizer-step boundary (no accumulation window open)
        leave now. Between pack steps, so the pack's other adapters never notice."""
        for run in [r for r in self.active if r.yielding and r.micro == 0]:
            if run.checkpointed_step != run.step:
                self._checkpoint(run, ckpt.checkpoint_dir(run.task.output_dir, run.step), final=False)
                if self.rank == 0:
                    ckpt.prune_checkpoints(run.task.output_dir, run.cfg.keep_checkpoints)
            self._detach(run)
            self._record_done(
                run.task,
                AdapterDone(pack_id=self.pack_id, adapter=run.name, step=run.step, status=Outcome.YIELDED),
            )

    def cancel(self, name: str) -> None:
        """Drop an adapter between steps; its latest checkpoint stays on disk."""
        run = self.runs.get(name)
        if run is not None:
            self._detach(run)
            self._record_done(
                run.task,
                AdapterDone(pack_id=self.pack_id, adapter=name, step=run.step, status=Outcome.CANCELLED),
            )

    def _finish_failed(self, task: AdapterTask, error: str, step: int = 0) -> None:
        if task.name in self.runs:
            self._detach(self.runs[task.name])
        self._record_done(
            task,
            AdapterDone(
                pack_id=self.pack_id, adapter=task.name, step=step, status=Outcome.FAILED, error=error
            ),
        )

    def _detach(self, run: AdapterRun) -> None:
        self.runs.pop(run.name, None)
        if run.name in self.model.adapters:
            self.model.remove_adapter(run.name)

    def _record_done(self, task: AdapterTask, event: AdapterDone) -> None:
        self.done[task.name] = event
        self._emit(event)

    def _emit(self, event: Event) -> None:
        if self.rank == 0:
            self.emit(event)


def _check_same_data(name: str, checkpoint: str, fingerprint: str) -> None:
    """Refuse to resume a checkpoint written on other data (the file was fixed or replaced while the
    adapter waited or trained): its weights, optimizer moments and position in the sample order all
    belong to the old rows, and going on would mix two data sets in one adapter. The adapter fails with
    the reason; a person's `lorafleet retry` then starts it over on the new data (the orchestrator sees
    the same change in the fingerprint and drops the old checkpoints)."""
    meta = ckpt.read_meta(checkpoint)
    written_on = meta.get("data_fingerprint")
    if written_on is not None and written_on != fingerprint:
        raise ValueError(
            f"adapter {name!r}: its data changed since its checkpoint at step {meta.get('step')} "
            f"({checkpoint}); resuming would mix the old rows with the new ones. "
            f"`lorafleet retry {name}` starts it over on the new data"
        )
