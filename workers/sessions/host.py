"""A worker's training sessions: one frozen base, many live LoRA adapters, each with its own optimizer.

`SessionHost` holds a `MultiLoraModel` over one loaded base and any number of sessions (`Session`: an
engine `Adapter`, its AdamW state, its accumulated gradients, its queue of operations). The primitives
are Tinker's (see `workers.contract.sessions`): `forward`, `forward_backward`, `forward_backward_custom`,
`optim_step`, `sample`, `compute_logprobs`, `save_state`, `load_state`, plus `create_session` and
`close_session`.

**Calls queue, cycles run.** Every primitive validates its request at once (a bad datum raises
`ValueError` in the caller, naming the datum and field, and nothing is queued), then appends an operation
to its session's queue and returns a `concurrent.futures.Future`, so a client can queue a
forward_backward and its optim_step before waiting for either. `run_cycle()` takes the next clock cycle
(`workers.sessions.cycles.plan_cycle`: from every session the operations up to and including its next
optim_step) and runs it: the forward_backward calls of all sessions in packed multi-adapter passes of at
most `pass_tokens` tokens (from the memory model), each call's future resolved as soon as its last pass
is done; then each session's optimizer step; then every sample of the cycle in one batched generation;
then saves, loads and closes. `start()` runs cycles on a background thread whenever work is queued;
without it, call `run_cycle()` / `run_until_idle()` yourself (tests do).

**Exact and isolated.** A session's loss terms touch only its own adapter's tokens (packed documents never
attend across boundaries, `workers.engine.layout`), so the packed pass's gradient for each adapter is the
one it gets alone; its optimizer, step count and dropout generator are its own. A session's weights after
N steps are the same (fp32, to rounding) whoever shared its cycles. (With LoRA dropout the masks come from
the session's own generator, but in the order its calls were laid out in passes, which its neighbours can
change: the same distribution, not the same draws.) A forward_backward of `cross_entropy` with weights
1/(target tokens) trains exactly as a pack (`workers.training`) trains the same adapter on the same
batches: same AdamW, same clipping (`trainer.clip_and_step`).

**Memory.** `pass_tokens` is fixed when the host starts (`memory.pass_token_budget` for the budget, the
base and the runtime). The sessions' own state (fp32 weights, gradients and AdamW moments:
`memory.LORA_STATE_BYTES_PER_PARAM` a parameter) comes on top of it; bounding how many sessions a worker
takes is the placement layer's decision, by the same numbers.

**Thread safety.** Every public method may be called from any thread. Queues are guarded by one lock;
the model is used by one cycle at a time (`_engine`, which `create_session` also takes, so an adapter is
never attached in the middle of a pass). A custom loss function runs on the thread that runs the cycle.
A Ray actor can hold one host, call `start()`, and turn each future into an awaitable
(`asyncio.wrap_future`); an HTTP layer sends `forward_backward_custom`'s gradient back as `cross_entropy`
weights (`workers.sessions.losses`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.contract import memory
from workers.contract.plan import LoraConfig, check_name
from workers.contract.sessions import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LossFn,
    LossFnConfig,
    OptimStepOutput,
    SampledSequence,
    SampleOutput,
    SamplingParams,
    check_data,
)
from workers.engine.adapters import Adapter, LoraKernel
from workers.engine.examples import IGNORE_INDEX, Example
from workers.engine.layout import Part, attention_weight_of, build_batch
from workers.engine.model import LoadedBase
from workers.engine.multilora import MultiLoraModel, linear_module_names
from workers.engine.varlen import use_varlen_attention
from workers.evaluation.generation import SampleRequest, generate_sampled
from workers.sessions.cycles import Cycle, OpKind, PendingOp, Slice, plan_cycle
from workers.sessions.losses import elementwise_loss, surrogate
from workers.training import checkpoint as ckpt
from workers.training.trainer import clip_and_step, new_optimizer

CustomLoss = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
"""A custom loss: (the call's datums, each datum's per-token logprobs) -> (scalar loss, metrics)."""

SESSION_INIT_NAME = "session"  # what a service's sessions seed their initial A with (`create_session`)
GPU_MEMORY_SHARE = 0.9  # of a GPU's memory the pass budget may plan for when none is given


@dataclass
class _Op:
    id: int
    session: str
    kind: OpKind
    future: Future[Any]
    data: list[Datum] = field(default_factory=list)
    loss_fn: LossFn | None = None
    loss_fn_config: LossFnConfig | None = None
    custom: CustomLoss | None = None
    adam: AdamParams | None = None
    prompt: list[int] = field(default_factory=list)
    num_samples: int = 0
    sampling: SamplingParams | None = None
    action: Callable[[], Any] | None = None  # a state operation's work
    finish: Callable[[ForwardBackwardOutput], Any] | None = None  # compute_logprobs reshapes its output
    # filled in as passes run: per datum (logprobs, elementwise loss), and the custom loss's metrics
    outputs: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    failed: bool = False

    def pending(self) -> PendingOp:
        return PendingOp(self.id, self.kind, tuple(d.length + 1 for d in self.data))


@dataclass
class Session:
    """One live adapter. Everything here is the session's own; only the host's cycle thread touches it."""

    id: str
    lora: LoraConfig
    seed: int
    adapter: Adapter
    optimizer: torch.optim.AdamW
    created: int
    step: int = 0
    queue: deque[_Op] = field(default_factory=deque)
    last_served: int = -1
    closing: bool = False


class SessionHost:
    def __init__(
        self,
        base: LoadedBase,
        base_model: str,
        *,
        pass_tokens: int | None = None,
        memory_budget_bytes: int | None = None,
        max_passes_per_cycle: int | None = 8,
        kernel: LoraKernel = "auto",
    ) -> None:
        """`pass_tokens`: the most tokens a pass holds; by default from the memory model for
        `memory_budget_bytes` (on a GPU, 90% of its memory), and on CPU `memory.CPU_PASS_TOKENS`."""
        self.model = MultiLoraModel(base.model, kernel=kernel)
        self.tokenizer = base.tokenizer
        self.device = base.device
        self.base_model = base_model
        config = base.model.config
        self.vocab_size = int(config.vocab_size)
        self._all_linear = linear_module_names(base.model)
        varlen = use_varlen_attention(base.model)
        self._attention_weight = attention_weight_of(config, varlen)
        self.pass_tokens = pass_tokens or self._pass_budget(memory_budget_bytes, varlen)
        self.max_passes_per_cycle = max_passes_per_cycle
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._engine = threading.RLock()
        self._ids = itertools.count()
        self._cycles = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        # What ran (benchmarks and tests read it): cycles, passes, the most sessions one pass held.
        self.counters = {"cycles": 0, "passes": 0, "max_sessions_per_pass": 0}

    def _pass_budget(self, budget_bytes: int | None, varlen: bool) -> int:
        if budget_bytes is None and self.device.type == "cpu":
            return memory.CPU_PASS_TOKENS
        base = self.model.base
        if self.device.type == "cuda":
            static = torch.cuda.memory_allocated(self.device)
            if budget_bytes is None:
                budget_bytes = int(
                    torch.cuda.get_device_properties(self.device).total_memory * GPU_MEMORY_SHARE
                )
        else:
            weights = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers()))
            static = weights + memory.RUNTIME_OVERHEAD_BYTES
        assert budget_bytes is not None
        tokens = memory.pass_token_budget(
            memory.model_info_from_config(base.config.to_dict()),
            str(base.dtype).removeprefix("torch."),
            budget_bytes=budget_bytes,
            static_bytes=static,
            lora=memory.LoraInputs(True, True),  # any session may target any linear
            varlen=varlen,
            cpu=self.device.type == "cpu",
        )
        if tokens < 2:
            raise ValueError(
                f"a memory budget of {budget_bytes} bytes leaves no room for a training pass on this base"
            )
        return tokens

    # ---- sessions ----

    def create_session(
        self,
        name: str | None = None,
        lora: LoraConfig | None = None,
        seed: int = 0,
        from_state: str | None = None,
        with_optimizer: bool = False,
        init_name: str | None = None,
    ) -> str:
        """A new session: a fresh adapter (`lora`, initial A from (seed, `init_name`, module) as in a
        pack, where an adapter's name takes that place) or one started from any saved adapter
        (`from_state`: its weights, and with `with_optimizer` its optimizer state and step count).
        Returns the session id (`name`, or a new one).

        `init_name` defaults to the session id. The service passes a fixed one (`SESSION_INIT_NAME`), so
        a session's starting weights depend on (lora, seed) only: recreated on another host after a
        worker is lost, under whatever id, it starts from the same weights."""
        name = check_name(name, "session `name`") if name is not None else f"session-{uuid.uuid4().hex[:12]}"
        files = ckpt.read_adapter(from_state) if from_state is not None else None
        training_state = ckpt.read_training_state(from_state) if from_state and with_optimizer else None
        if files is not None:
            lora = files.lora.model_copy(
                update={
                    "dropout": lora.dropout if lora is not None else files.lora.dropout,
                    "target_modules": sorted(files.weights),
                }
            )
        lora = lora or LoraConfig()
        with self._engine, self._lock:
            if name in self.sessions:
                raise ValueError(f"session {name!r} already exists on this worker")
            adapter = self.model.add_adapter(
                name,
                lora,
                seed=seed,
                init=files.weights if files is not None else None,
                init_name=init_name,
            )
            optimizer = new_optimizer(adapter.parameters(), AdamParams().learning_rate, 0.0)
            session = Session(name, lora, seed, adapter, optimizer, created=next(self._ids))
            if training_state is not None:
                self._restore(session, training_state)
            self.sessions[name] = session
        return name

    def session_info(self, session: str) -> tuple[int, LoraConfig] | None:
        """An open session's step count and LoRA settings; None if there is none of that id."""
        with self._lock:
            s = self.sessions.get(session)
            return None if s is None else (s.step, s.lora)

    def close_session(self, session: str) -> Future[None]:
        """Detach the session's adapter once everything it queued before has run."""
        with self._lock:
            s = self._open(session)
            s.closing = True
        return self._submit(session, "state", action=lambda: self._close(s), check_open=False)

    # ---- primitives ----

    def forward_backward(
        self,
        session: str,
        data: Sequence[Datum],
        loss_fn: LossFn = "cross_entropy",
        loss_fn_config: LossFnConfig | None = None,
    ) -> Future[ForwardBackwardOutput]:
        """Loss, per-token logprobs and gradients of `data` under `loss_fn`; the gradients add to the
        session's until its next optim_step."""
        request = self._checked(data, loss_fn, loss_fn_config)
        return self._submit(
            session, "forward_backward", data=request.data, loss_fn=loss_fn, loss_fn_config=loss_fn_config
        )

    def forward(
        self,
        session: str,
        data: Sequence[Datum],
        loss_fn: LossFn = "cross_entropy",
        loss_fn_config: LossFnConfig | None = None,
    ) -> Future[ForwardBackwardOutput]:
        """As `forward_backward`, without gradients (and without dropout)."""
        request = self._checked(data, loss_fn, loss_fn_config)
        return self._submit(
            session, "forward", data=request.data, loss_fn=loss_fn, loss_fn_config=loss_fn_config
        )

    def forward_backward_custom(
        self, session: str, data: Sequence[Datum], loss_fn: CustomLoss
    ) -> Future[ForwardBackwardOutput]:
        """Any differentiable loss of the logprobs: `loss_fn(data, logprobs)` runs on the logprobs of the
        same pass, and its gradient is back-propagated through the session's adapter
        (`workers.sessions.losses.surrogate`). The call must fit one pass (its loss sees all its datums)."""
        request = self._checked(data, "cross_entropy", None)
        tokens = sum(d.length + 1 for d in request.data)
        if tokens > self.pass_tokens:
            raise ValueError(
                f"`data` of a custom loss has {tokens} tokens, more than one pass holds "
                f"({self.pass_tokens}); send fewer datums per call"
            )
        return self._submit(session, "forward_backward", data=request.data, custom=loss_fn)

    def optim_step(self, session: str, adam_params: AdamParams | None = None) -> Future[OptimStepOutput]:
        """One AdamW step with the gradients accumulated since the last one (clipped to
        `grad_clip_norm`), then the gradients are cleared."""
        return self._submit(session, "optim_step", adam=adam_params or AdamParams())

    def sample(
        self,
        session: str,
        prompt: Sequence[int],
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
    ) -> Future[SampleOutput]:
        """`num_samples` continuations of `prompt` with the session's weights as of this point in its
        queue; all samples of a cycle (every session's) are generated in one batch."""
        self._check_tokens(prompt, "prompt", minimum=1)
        if num_samples < 1:
            raise ValueError(f"`num_samples` is {num_samples}: ask for at least 1")
        return self._submit(
            session,
            "sample",
            prompt=list(prompt),
            num_samples=num_samples,
            sampling=sampling_params or SamplingParams(),
        )

    def compute_logprobs(self, session: str, tokens: Sequence[int]) -> Future[list[float | None]]:
        """log p(tokens[i] | tokens[:i]) for every i (None for the first token), as Tinker gives them."""
        self._check_tokens(tokens, "tokens", minimum=2)
        datum = Datum.from_sequence(list(tokens))
        check_data([datum], self.vocab_size, self.pass_tokens)

        def finish(output: ForwardBackwardOutput) -> list[float | None]:
            return [None, *output.loss_fn_outputs[0]["logprobs"]]

        return self._submit(session, "forward", data=[datum], loss_fn="cross_entropy", finish=finish)

    def save_state(self, session: str, path: str) -> Future[str]:
        """Write the adapter as a PEFT checkpoint (the format packs write, so it can become a lineage
        node) with its optimizer state and step count; resolves to `path`."""
        with self._lock:
            s = self._open(session)
        return self._submit(session, "state", action=lambda: self._save(s, path))

    def load_state(self, session: str, path: str, with_optimizer: bool = True) -> Future[None]:
        """Replace the session's weights (and, with `with_optimizer`, its optimizer state and step count;
        without, a fresh optimizer) by a saved adapter's of the same rank and modules. Accumulated
        gradients are dropped."""
        with self._lock:
            s = self._open(session)
        return self._submit(session, "state", action=lambda: self._load(s, path, with_optimizer))

    # ---- running ----

    def run_cycle(self) -> bool:
        """Plan and run the next cycle; False if nothing was queued."""
        with self._lock:
            cycle, ops = self._take_cycle()
        if cycle is None:
            return False
        with self._engine:
            self._execute(cycle, ops)
        return True

    def run_until_idle(self) -> None:
        while self.run_cycle():
            pass

    def start(self) -> None:
        """Run cycles on a daemon thread whenever work is queued, until `shutdown()`."""
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="session-cycles", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stopping and not any(s.queue for s in self.sessions.values()):
                    self._work.wait()
                if self._stopping:
                    return
            self.run_cycle()

    # ---- queueing ----

    def _checked(
        self, data: Sequence[Datum], loss_fn: LossFn, loss_fn_config: LossFnConfig | None
    ) -> ForwardBackwardInput:
        request = ForwardBackwardInput(data=list(data), loss_fn=loss_fn, loss_fn_config=loss_fn_config)
        check_data(request.data, self.vocab_size, self.pass_tokens)
        return request

    def _check_tokens(self, tokens: Sequence[int], field_name: str, minimum: int) -> None:
        if len(tokens) < minimum:
            raise ValueError(f"`{field_name}` has {len(tokens)} tokens; give at least {minimum}")
        for i, t in enumerate(tokens):
            if not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"`{field_name}[{i}]` is {t!r}, not a token id of this base (0..{self.vocab_size - 1})"
                )
        if field_name == "tokens" and len(tokens) > self.pass_tokens:
            raise ValueError(
                f"`tokens` has {len(tokens)} tokens, more than one pass holds ({self.pass_tokens})"
            )

    def _open(self, session: str) -> Session:
        s = self.sessions.get(session)
        if s is None or s.closing:
            raise ValueError(f"no open session {session!r} on this worker")
        return s

    def _submit(self, session: str, kind: OpKind, check_open: bool = True, **fields: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._work:
            s = self._open(session) if check_open else self.sessions[session]
            s.queue.append(_Op(next(self._ids), session, kind, future, **fields))
            self._work.notify_all()
        return future

    def _take_cycle(self) -> tuple[Cycle | None, dict[int, _Op]]:
        """Under the lock: drop cancelled operations, plan the cycle, pop what it takes."""
        for s in self.sessions.values():
            s.queue = deque(op for op in s.queue if not op.future.cancelled())
        order = sorted(
            (s for s in self.sessions.values() if s.queue), key=lambda s: (s.last_served, s.created)
        )
        queues = [(s.id, [op.pending() for op in s.queue]) for s in order]
        cycle = plan_cycle(queues, self.pass_tokens, self.max_passes_per_cycle)
        if cycle.empty:
            return None, {}
        ops: dict[int, _Op] = {}
        for session, taken in cycle.taken.items():
            s = self.sessions[session]
            for op_id in taken:
                op = s.queue.popleft()
                assert op.id == op_id
                op.future.set_running_or_notify_cancel()
                ops[op_id] = op
            s.last_served = self._cycles
        self._cycles += 1
        self.counters["cycles"] = self._cycles
        return cycle, ops

    # ---- one cycle ----

    def _execute(self, cycle: Cycle, ops: dict[int, _Op]) -> None:
        for slices in cycle.grad_passes:
            self._run_pass(slices, ops, grad=True)
        for slices in cycle.eval_passes:
            self._run_pass(slices, ops, grad=False)
        for op_id in cycle.optim_steps:
            self._guarded(ops[op_id], self._optim_step)
        if cycle.samples:
            self._sample([ops[i] for i in cycle.samples])
        for op_id in cycle.states:
            op = ops[op_id]
            assert op.action is not None
            self._guarded(op, lambda op: op.action())  # type: ignore[misc]

    @staticmethod
    def _guarded(op: _Op, work: Callable[[_Op], Any]) -> None:
        try:
            result = work(op)
        except Exception as exc:  # the operation fails alone; its neighbours go on
            op.future.set_exception(exc)
        else:
            op.future.set_result(result)

    def _run_pass(self, slices: list[Slice], ops: dict[int, _Op], grad: bool) -> None:
        """One packed pass over `slices` (several sessions' calls), one layout part per session; each
        call's future resolves when its last datum has been through."""
        slices = [s for s in slices if not ops[s.op].failed]
        if not slices:
            return
        by_session: dict[str, list[Slice]] = {}
        for s in slices:
            by_session.setdefault(ops[s.op].session, []).append(s)
        ordered = [s for members in by_session.values() for s in members]
        parts = [
            Part(name, [_example(d) for s in members for d in ops[s.op].data[s.start : s.end]])
            for name, members in by_session.items()
        ]
        self.counters["passes"] += 1
        self.counters["max_sessions_per_pass"] = max(self.counters["max_sessions_per_pass"], len(parts))
        try:
            batch = build_batch(parts, self.tokenizer.pad_token_id, self._attention_weight).to(self.device)
            with torch.set_grad_enabled(grad):
                logprobs = self.model.target_logprobs(batch, training=grad)
                lengths = [d.length for s in ordered for d in ops[s.op].data[s.start : s.end]]
                per_datum = list(logprobs.split(lengths))
                total = logprobs.new_zeros(())
                at = 0
                for s in ordered:
                    n = s.end - s.start
                    total = total + self._slice_loss(ops[s.op], s, per_datum[at : at + n], grad)
                    at += n
                if grad and total.requires_grad:
                    total.backward()
        except Exception as exc:  # e.g. out of memory: the pass's calls fail (an oversized call's earlier
            # passes may have added part of its gradient: the client sees the failure before its step)
            for s in ordered:
                op = ops[s.op]
                if not op.failed:
                    op.failed = True
                    op.future.set_exception(exc)
            return
        for s in ordered:
            op = ops[s.op]
            if not op.failed and s.end == len(op.data) and len(op.outputs) == len(op.data):
                self._resolve_pass_op(op)

    def _slice_loss(self, op: _Op, s: Slice, logprobs: list[torch.Tensor], grad: bool) -> torch.Tensor:
        """The loss `op` adds to the pass for its datums s.start:s.end; records its per-token outputs."""
        data = op.data[s.start : s.end]
        if op.custom is not None:
            return self._custom_loss(op, data, logprobs)
        assert op.loss_fn is not None
        flat = torch.cat(logprobs)
        inputs: dict[str, torch.Tensor] = {}
        for name in ("weights", "logprobs", "advantages"):
            values = [getattr(d.loss_fn_inputs, name) for d in data]
            if name == "weights" and any(v is not None for v in values):  # absent: every token weighs 1
                values = [[1.0] * d.length if v is None else v for d, v in zip(data, values, strict=True)]
            if all(v is not None for v in values):
                inputs[name] = torch.tensor(
                    [x for v in values for x in v], dtype=torch.float32, device=flat.device
                )
        losses = elementwise_loss(op.loss_fn, flat, inputs, op.loss_fn_config)
        lp, el = flat.detach().tolist(), losses.detach().tolist()
        at = 0
        for k, d in enumerate(data):
            op.outputs[s.start + k] = (lp[at : at + d.length], el[at : at + d.length])
            at += d.length
        return losses.sum() if grad else losses.detach().sum()

    def _custom_loss(self, op: _Op, data: list[Datum], logprobs: list[torch.Tensor]) -> torch.Tensor:
        assert op.custom is not None
        leaves = [lp.detach().requires_grad_(True) for lp in logprobs]
        try:
            with torch.enable_grad():
                loss, metrics = op.custom(data, leaves)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        except Exception as exc:  # the client's function failed: its call fails, the pass goes on
            op.failed = True
            op.future.set_exception(exc)
            return logprobs[0].new_zeros(())
        op.metrics = {"loss:sum": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}
        for k, (d, leaf) in enumerate(zip(data, leaves, strict=True)):
            op.outputs[k] = (leaf.detach().tolist(), [math.nan] * d.length)
        flat = torch.cat(logprobs)
        g = torch.cat(
            [torch.zeros_like(leaf) if gr is None else gr for gr, leaf in zip(grads, leaves, strict=True)]
        )
        return surrogate(flat, g)

    @staticmethod
    def _resolve_pass_op(op: _Op) -> None:
        outputs = [op.outputs[i] for i in range(len(op.data))]
        if op.custom is not None:
            loss = op.metrics["loss:sum"]
        else:
            loss = math.fsum(x for _, el in outputs for x in el)
        result = ForwardBackwardOutput(
            loss=loss,
            loss_fn_outputs=[{"logprobs": lp, "elementwise_loss": el} for lp, el in outputs],
            metrics={"loss:sum": loss, **op.metrics},
        )
        op.future.set_result(op.finish(result) if op.finish is not None else result)

    def _optim_step(self, op: _Op) -> OptimStepOutput:
        s, p = self.sessions[op.session], op.adam
        assert p is not None
        params = s.adapter.parameters()
        grads = [q.grad for q in params if q.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        if not math.isfinite(norm):
            s.optimizer.zero_grad(set_to_none=True)
            raise ValueError(
                f"session {s.id!r}: the gradient is not finite (norm {norm}); the step was skipped and the "
                "gradients dropped. Lower `learning_rate`, set `grad_clip_norm`, or check the data"
            )
        for group in s.optimizer.param_groups:
            group.update(lr=p.learning_rate, betas=(p.beta1, p.beta2), eps=p.eps, weight_decay=p.weight_decay)
        grad_norm = clip_and_step(s.optimizer, params, p.grad_clip_norm or None)
        s.step += 1
        return OptimStepOutput(
            step=s.step, metrics={"grad_norm": grad_norm, "learning_rate": p.learning_rate}
        )

    def _sample(self, ops: list[_Op]) -> None:
        requests: list[SampleRequest] = []
        for op in ops:
            p = op.sampling
            assert p is not None
            seed = p.seed if p.seed is not None else secrets.randbits(62)
            requests += [
                SampleRequest(
                    route=op.session,
                    prompt_ids=tuple(op.prompt),
                    max_new_tokens=p.max_tokens,
                    seed=_row_seed(seed, k),
                    temperature=p.temperature,
                    top_p=p.top_p,
                    top_k=p.top_k,
                    stop=None if p.stop is None else tuple(t for t in p.stop if isinstance(t, int)),
                    stop_strings=tuple(t for t in p.stop or () if isinstance(t, str)),
                )
                for k in range(op.num_samples)
            ]
        try:
            sampled = generate_sampled(self.model, self.tokenizer, requests, self.device)
        except Exception as exc:
            for op in ops:
                op.future.set_exception(exc)
            return
        at = 0
        for op in ops:
            rows = sampled[at : at + op.num_samples]
            at += op.num_samples
            op.future.set_result(
                SampleOutput(
                    sequences=[
                        SampledSequence(tokens=r.tokens, logprobs=r.logprobs, stop_reason=r.stop_reason)  # type: ignore[arg-type]
                        for r in rows
                    ]
                )
            )

    # ---- state ----

    def _save(self, s: Session, path: str) -> str:
        return ckpt.write_checkpoint(
            path,
            s.adapter,
            base_model=self.base_model,
            all_linear_paths=self._all_linear,
            training_state={
                "step": s.step,
                "optimizer": s.optimizer.state_dict(),
                "dropout_rng": s.adapter.dropout_generator.get_state(),
            },
            meta={"step": s.step, "session": s.id, "lora": s.lora.model_dump(mode="json")},
        )

    def _load(self, s: Session, path: str, with_optimizer: bool) -> None:
        files = ckpt.read_adapter(path)
        state = ckpt.read_training_state(path) if with_optimizer else None
        if files.lora.r != s.adapter.lora.r or set(files.weights) != set(s.adapter.modules):
            raise ValueError(
                f"{path!r} holds a rank-{files.lora.r} adapter of {len(files.weights)} modules; session "
                f"{s.id!r} is rank {s.adapter.lora.r} on {len(s.adapter.modules)}: create a session from it "
                "instead"
            )
        with torch.no_grad():
            for module, weights in s.adapter.modules.items():
                weights.lora_A.copy_(files.weights[module].lora_A)
                weights.lora_B.copy_(files.weights[module].lora_B)
        s.optimizer.zero_grad(set_to_none=True)
        if state is not None:
            self._restore(s, state)
        else:
            s.optimizer = new_optimizer(s.adapter.parameters(), AdamParams().learning_rate, 0.0)
            s.step = 0

    @staticmethod
    def _restore(s: Session, state: dict[str, Any]) -> None:
        s.optimizer.load_state_dict(state["optimizer"])
        s.step = int(state["step"])
        if "dropout_rng" in state:
            s.adapter.dropout_generator.set_state(state["dropout_rng"])

    def _close(self, s: Session) -> None:
        with self._lock:
            self.sessions.pop(s.id, None)
            left, s.queue = list(s.queue), deque()
        self.model.remove_adapter(s.id)
        for op in left:
            if op.future.set_running_or_notify_cancel():
                op.future.set_exception(ValueError(f"session {s.id!r} was closed before this ran"))


def _row_seed(seed: int, k: int) -> int:
    """Sample k's generator seed: from the request's seed and k only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _example(datum: Datum) -> Example:
    """A datum as the layout's document: its inputs, then its last target (so every input position has a
    target; the extra token predicts nothing), labels shifted so position i's target is target_tokens[i]."""
    targets = datum.loss_fn_inputs.target_tokens
    return Example(
        input_ids=(*datum.model_input, targets[-1]),
        labels=(IGNORE_INDEX, *targets),
    )
