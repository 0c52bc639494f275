"""`TrainingClient`: one interactive training session on a server, Tinker's way.

`Client.create_lora_training_client(base_model, rank=...)` (or `create_training_client_from_state(...)`)
opens a session (`POST /v1/sessions`) and returns a `TrainingClient`, whose primitives each return a
`concurrent.futures.Future` at once, so a loop queues its forward_backward and optim_step before waiting
for either (they then share the server's clock cycle):

    fb = tc.forward_backward(data, "cross_entropy")
    step = tc.optim_step(AdamParams(learning_rate=1e-4))
    loss = fb.result().loss; step.result()

Every primitive has an `_async` twin returning an awaitable (`await tc.forward_backward_async(...)`).
Requests go out from a small pool of threads, each stamped with the session's next call number (`seq`),
so the server queues them in the order they were made whatever order they arrive in.

Where this differs from Tinker's client:
- The entry points are `Client` methods (Tinker: `ServiceClient`), and synchronous (they return once
  the session exists; Tinker's return a future); `create_lora_training_client(base_model, rank=32,
  alpha=, targets=, seed=)` names the modules to adapt (`targets`, default 'all-linear') where Tinker
  has `train_mlp` / `train_attn` / `train_unembed`.
- Futures are `concurrent.futures.Future` (Tinker: its `APIFuture`, also `.result()`); an `_async`
  method is awaited once for the result (Tinker's is awaited twice: the submission, then the result).
  Like Tinker's, the call is queued (numbered) when the method is called, not when it is awaited.
- Datums, params and outputs are `workers.contract.sessions`'s (Tinker's shapes; `model_input` is a
  plain list of token ids, not a `ModelInput`; a `Datum` or its dict both go).
- `forward_backward_custom(data, loss_fn)` runs a `forward`, the loss on this machine (torch), then a
  `cross_entropy` forward_backward with `weights` = -d loss / d logprobs (its gradient is the custom
  loss's); both calls are numbered together, so nothing of the session's runs between them.
- `save_state(name)` returns the server's path of the state (Tinker: a `tinker://` URI) as a `StatePath`,
  a `str` that also names the adapter the state became (`.adapter`: `project/<session id>.<name>`, a node
  of the lineage tree to branch, export or promote). `load_state` and `create_training_client_from_state`
  take either, as they take any adapter `project/name`;
  `save_state(name, close=True)` also ends the session. `close()` ends it (the server ends an idle one).
- `sample(prompt, num_samples, sampling_params)` samples the session's current weights directly (Tinker
  saves them and opens a `SamplingClient`); `prompt` is a list of token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from orchestrator.client.errors import ApiError
from orchestrator.spec.views import SessionView
from workers.contract.sessions import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnConfig,
    OptimStepOutput,
    SampleOutput,
    SamplingParams,
)

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class StatePath(str):
    """A saved state's path (a `str`, as `save_state` always returned) that also knows the adapter it
    became: `.adapter` (`project/name`) and `.path`."""

    adapter: str

    def __new__(cls, path: str, adapter: str) -> StatePath:
        made = super().__new__(cls, path)
        made.adapter = adapter
        return made

    @property
    def path(self) -> str:
        return str.__str__(self)


SENDERS = 8  # requests of one session in flight at once (the server orders them by `seq`)
# A call is answered once everything its session queued before it has run, so the last call of a loop that
# queues ahead waits for many clock cycles (minutes on a loaded CPU): far past the `Client`'s 60 s read
# timeout, which would fail a call the server still runs. Connecting and sending keep the short limits.
CALL_READ_TIMEOUT_S = 3600.0


class Transport(Protocol):
    """What a `TrainingClient` needs of its `Client`: its HTTP, with the same auth and reconnects."""

    def _call(self, method: str, path: str, **kwargs: Any) -> Any: ...

    def _request(self, method: str, path: str, **kwargs: Any) -> Any: ...


CustomLoss = Callable[[list[Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]


class TrainingClient:
    """One live session. Thread-safe: calls made from several threads are numbered in the order they
    were made (by a lock), and queued on the server in that order."""

    def __init__(self, client: Transport, view: SessionView) -> None:
        self._client, self.view = client, view
        self._seq = itertools.count()
        self._numbering = threading.Lock()
        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix=f"session-{view.id[-6:]}")

    @property
    def session_id(self) -> str:
        return self.view.id

    # ---- primitives: a future each ----

    def forward_backward(
        self,
        data: Sequence[Datum | dict[str, Any]],
        loss_fn: str = "cross_entropy",
        loss_fn_config: LossFnConfig | dict[str, float] | None = None,
    ) -> Future[ForwardBackwardOutput]:
        body = {"data": _datums(data), "loss_fn": loss_fn, "loss_fn_config": _plain(loss_fn_config)}
        return self._send("forward_backward", body, ForwardBackwardOutput.model_validate)

    def forward(
        self,
        data: Sequence[Datum | dict[str, Any]],
        loss_fn: str = "cross_entropy",
        loss_fn_config: LossFnConfig | dict[str, float] | None = None,
    ) -> Future[ForwardBackwardOutput]:
        body = {"data": _datums(data), "loss_fn": loss_fn, "loss_fn_config": _plain(loss_fn_config)}
        return self._send("forward", body, ForwardBackwardOutput.model_validate)

    def forward_backward_custom(
        self, data: Sequence[Datum | dict[str, Any]], loss_fn: CustomLoss
    ) -> Future[ForwardBackwardOutput]:
        """Any differentiable loss of the per-token logprobs: `loss_fn(data, logprobs)` -> (loss,
        metrics), run here on the logprobs of a `forward`; its gradient goes back as cross_entropy
        weights. Resolves to the forward's output with the custom loss and metrics."""
        datums = [d if isinstance(d, Datum) else Datum.model_validate(d) for d in data]
        with self._numbering:  # the forward and its backward take consecutive numbers
            first, second = next(self._seq), next(self._seq)
        forward = self._pool.submit(
            self._post, "forward", {"seq": first, "data": _datums(datums), "loss_fn": "cross_entropy"}
        )
        result: Future[ForwardBackwardOutput] = Future()

        def backward() -> None:
            sent = False
            try:
                out = ForwardBackwardOutput.model_validate(forward.result())
                weights, loss, metrics = _custom_weights(datums, out, loss_fn)
                weighted = [
                    d.model_copy(
                        update={"loss_fn_inputs": d.loss_fn_inputs.model_copy(update={"weights": w})}
                    )
                    for d, w in zip(datums, weights, strict=True)
                ]
                sent = True
                self._post("forward_backward", {"seq": second, "data": _datums(weighted)})
            except BaseException as exc:
                if not sent:
                    self._skip(second)
                result.set_exception(exc)
                return
            result.set_result(out.model_copy(update={"loss": loss, "metrics": {"loss:sum": loss, **metrics}}))

        self._pool.submit(backward)
        return result

    def optim_step(self, adam_params: AdamParams | dict[str, float] | None = None) -> Future[OptimStepOutput]:
        return self._send("optim_step", {"adam_params": _plain(adam_params)}, OptimStepOutput.model_validate)

    def sample(
        self,
        prompt: Sequence[int],
        num_samples: int = 1,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
    ) -> Future[SampleOutput]:
        body = {
            "prompt": list(prompt),
            "num_samples": num_samples,
            "sampling_params": _plain(sampling_params),
        }
        return self._send("sample", body, SampleOutput.model_validate)

    def compute_logprobs(self, tokens: Sequence[int]) -> Future[list[float | None]]:
        return self._send("compute_logprobs", {"tokens": list(tokens)}, lambda r: r["logprobs"])

    def save_state(self, name: str, close: bool = False) -> Future[StatePath]:
        """Write the adapter (a PEFT directory) and its optimizer state; resolves to its path, which also
        names the adapter it became (`StatePath.adapter`)."""
        return self._send(
            "save_state", {"name": name, "close": close}, lambda r: StatePath(r["path"], r["adapter"])
        )

    def load_state(self, path: str) -> Future[None]:
        """Replace the weights (and, from a session's save, the optimizer state) by a saved state's."""
        return self._send("load_state", {"path": path}, lambda _: None)

    # ---- the async twins: awaitables, queued when called ----

    def forward_backward_async(self, *args: Any, **kwargs: Any) -> Awaitable[ForwardBackwardOutput]:
        return asyncio.wrap_future(self.forward_backward(*args, **kwargs))

    def forward_async(self, *args: Any, **kwargs: Any) -> Awaitable[ForwardBackwardOutput]:
        return asyncio.wrap_future(self.forward(*args, **kwargs))

    def forward_backward_custom_async(self, *args: Any, **kwargs: Any) -> Awaitable[ForwardBackwardOutput]:
        return asyncio.wrap_future(self.forward_backward_custom(*args, **kwargs))

    def optim_step_async(self, *args: Any, **kwargs: Any) -> Awaitable[OptimStepOutput]:
        return asyncio.wrap_future(self.optim_step(*args, **kwargs))

    def sample_async(self, *args: Any, **kwargs: Any) -> Awaitable[SampleOutput]:
        return asyncio.wrap_future(self.sample(*args, **kwargs))

    def compute_logprobs_async(self, *args: Any, **kwargs: Any) -> Awaitable[list[float | None]]:
        return asyncio.wrap_future(self.compute_logprobs(*args, **kwargs))

    def save_state_async(self, *args: Any, **kwargs: Any) -> Awaitable[StatePath]:
        return asyncio.wrap_future(self.save_state(*args, **kwargs))

    def load_state_async(self, *args: Any, **kwargs: Any) -> Awaitable[None]:
        return asyncio.wrap_future(self.load_state(*args, **kwargs))

    # ---- the session ----

    def info(self) -> SessionView:
        self.view = SessionView.model_validate(self._client._call("GET", f"/v1/sessions/{self.session_id}"))
        return self.view

    def close(self) -> SessionView:
        """End the session (after what it queued has run) and stop sending."""
        self._pool.shutdown(wait=True)
        return SessionView.model_validate(self._client._call("DELETE", f"/v1/sessions/{self.session_id}"))

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- sending ----

    def _send(self, op: str, body: dict[str, Any], parse: Callable[[Any], T]) -> Future[T]:
        with self._numbering:
            seq = next(self._seq)
            raw = self._pool.submit(self._post, op, {"seq": seq, **body})
        result: Future[T] = Future()

        def done(f: Future[Any]) -> None:
            try:
                result.set_result(parse(f.result()))
            except BaseException as exc:
                result.set_exception(exc)

        raw.add_done_callback(done)
        return result

    def _post(self, op: str, body: dict[str, Any]) -> Any:
        response = self._client._request(
            "POST",
            f"/v1/sessions/{self.session_id}/{op}",
            json=body,
            # (connect, read, write, pool), as a tuple: any httpx-like transport takes it (a test's too)
            timeout=(60.0, CALL_READ_TIMEOUT_S, 60.0, 60.0),
        )
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", {})
            except ValueError:
                detail = {"message": response.text}
            problems = [(p["field"], p["message"]) for p in detail.get("problems", [])]
            message = detail.get("message", response.text)
            if problems:
                message += ": " + "; ".join(f"`{f}`: {m}" for f, m in problems)
            raise ApiError(response.status_code, message, problems)
        return response.json()

    def _skip(self, seq: int) -> None:
        """A reserved number whose call will not be sent: use it up, so later calls need not wait."""
        with contextlib.suppress(Exception):  # refused (422), its number used up
            self._post("compute_logprobs", {"seq": seq, "tokens": []})


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _datums(data: Sequence[Datum | dict[str, Any]]) -> list[Any]:
    return [_plain(d) for d in data]


def _custom_weights(
    data: list[Datum], out: ForwardBackwardOutput, loss_fn: CustomLoss
) -> tuple[list[list[float]], float, dict[str, float]]:
    """-d loss / d logprobs per datum (cross_entropy's gradient with respect to logprob_t is -weight_t,
    so these weights give the custom loss's gradient), with the loss and its metrics."""
    import torch

    leaves = [
        torch.tensor(o["logprobs"], dtype=torch.float32, requires_grad=True) for o in out.loss_fn_outputs
    ]
    loss, metrics = loss_fn(data, leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    weights = [
        (-g if g is not None else torch.zeros_like(leaf)).tolist()
        for g, leaf in zip(grads, leaves, strict=True)
    ]
    return weights, float(loss.detach()), {k: float(v) for k, v in metrics.items()}
