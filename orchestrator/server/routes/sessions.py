"""`/v1/sessions`: interactive training sessions (Tinker's primitives), one live adapter each.

Each primitive answers with its result once the session's host has run it: the service queues the call
(in the client's `seq` order, `service.sessions`) and hands back a future, which the route awaits off the
event loop, so a slow clock cycle holds no server thread. Bodies are validated by the service, in the
call's turn, so a malformed call uses up its number and is answered 422 naming each field
(`data.3.loss_fn_inputs.weights`) while its session goes on.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from orchestrator.server.deps import MAX_EVENT_ID, Caller, Svc
from orchestrator.spec.views import SessionView
from workers.contract.plan import DType, LoraConfig, Quantization
from workers.contract.sessions import ForwardBackwardOutput, OptimStepOutput, SampleOutput

router = APIRouter()

Seq = Annotated[
    int | None,
    Field(
        ge=0,
        le=MAX_EVENT_ID,
        description="The client's number for this call (0, 1, 2... per session): calls are queued in "
        "this order, whatever order they arrive in. Absent: queued as it arrives.",
    ),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSession(_Body):
    project: str | None = Field(default=None, max_length=100, description="Default: the token's project.")
    base_model: str | None = Field(
        default=None, max_length=4096, description="Default with `from_state`: the state's base."
    )
    quantization: Quantization = "none"
    dtype: DType = "float32"
    rank: int = Field(default=32, gt=0, le=4096)
    alpha: float | None = Field(default=None, gt=0, description="Default: 2 x rank.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[Annotated[str, Field(min_length=1, max_length=200)]] | Literal["all-linear"] = Field(
        default="all-linear", description="Linear module names (dotted suffixes) or 'all-linear'."
    )
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    from_state: str | None = Field(
        default=None,
        max_length=4096,
        description="Start from a saved state: an adapter `project/name` of the caller's project, or a "
        "path `save_state` returned (weights, and a session's optimizer state).",
    )


class ForwardBackwardRequest(_Body):
    seq: Seq = None
    data: list[Any] = Field(description="Datums (`workers.contract.sessions.Datum`).")
    loss_fn: Any = "cross_entropy"
    loss_fn_config: Any = None


class OptimStepRequest(_Body):
    seq: Seq = None
    adam_params: Any = None


class SampleRequest(_Body):
    seq: Seq = None
    prompt: Any = Field(description="Token ids.")
    num_samples: Any = 1
    sampling_params: Any = None


class LogprobsRequest(_Body):
    seq: Seq = None
    tokens: Any = Field(description="Token ids.")


class SaveStateRequest(_Body):
    seq: Seq = None
    name: Any = Field(description="A name for this state, e.g. 'step-100'.")
    close: bool = Field(default=False, description="End the session once the state is written.")


class LoadStateRequest(_Body):
    seq: Seq = None
    path: Any = Field(description="A path `save_state` returned, or an adapter `project/name`.")


class SavedState(BaseModel):
    path: str
    adapter: str = Field(description="The adapter `project/name` the state became (lineage, export...).")


class Logprobs(BaseModel):
    logprobs: list[float | None]


async def _result(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Queue the call (in a worker thread: it may wait for its turn), then await its future without
    holding a thread."""
    future: Future[Any] = await run_in_threadpool(call, *args, **kwargs)
    return await asyncio.wrap_future(future)


@router.post("/v1/sessions", status_code=201)
async def create_session(body: CreateSession, service: Svc, caller: Caller) -> SessionView:
    """A new session: a fresh LoRA adapter on `base_model` (loaded on first use), or one started from a
    saved state. It lives until closed, saved with `close`, or idle past the server's timeout."""
    lora = LoraConfig(
        r=body.rank,
        alpha=body.alpha if body.alpha is not None else 2.0 * body.rank,
        dropout=body.dropout,
        target_modules=body.targets,
    )
    return await run_in_threadpool(
        service.sessions.create,
        caller,
        body.project or caller.project or "default",
        base_model=body.base_model,
        quantization=body.quantization,
        dtype=body.dtype,
        lora=lora,
        seed=body.seed,
        from_state=body.from_state,
    )


@router.get("/v1/sessions")
def sessions(
    service: Svc, caller: Caller, project: Annotated[str | None, Query(max_length=100)] = None
) -> list[SessionView]:
    """The caller's live sessions (the admin's: all, or one project's)."""
    return service.sessions.list(caller, project)


@router.get("/v1/sessions/{session_id}")
def session(session_id: str, service: Svc, caller: Caller) -> SessionView:
    return service.sessions.get(caller, session_id)


@router.delete("/v1/sessions/{session_id}")
async def close_session(session_id: str, service: Svc, caller: Caller) -> SessionView:
    """End the session once what it queued has run; answers what it was."""
    view, future = await run_in_threadpool(service.sessions.close, caller, session_id)
    await asyncio.wrap_future(future)
    return view


@router.post("/v1/sessions/{session_id}/forward_backward")
async def forward_backward(
    session_id: str, body: ForwardBackwardRequest, service: Svc, caller: Caller
) -> ForwardBackwardOutput:
    """Loss, per-token logprobs and gradients (kept until the next optim_step)."""
    return await _result(
        service.sessions.forward_backward, caller, session_id, body.seq, body.data, body.loss_fn,
        body.loss_fn_config,
    )  # fmt: skip


@router.post("/v1/sessions/{session_id}/forward")
async def forward(
    session_id: str, body: ForwardBackwardRequest, service: Svc, caller: Caller
) -> ForwardBackwardOutput:
    """As forward_backward, without gradients."""
    return await _result(
        service.sessions.forward_backward, caller, session_id, body.seq, body.data, body.loss_fn,
        body.loss_fn_config, backward=False,
    )  # fmt: skip


@router.post("/v1/sessions/{session_id}/optim_step")
async def optim_step(
    session_id: str, body: OptimStepRequest, service: Svc, caller: Caller
) -> OptimStepOutput:
    """One AdamW step with the gradients accumulated since the last one."""
    return await _result(service.sessions.optim_step, caller, session_id, body.seq, body.adam_params)


@router.post("/v1/sessions/{session_id}/sample")
async def sample(session_id: str, body: SampleRequest, service: Svc, caller: Caller) -> SampleOutput:
    """`num_samples` continuations of `prompt` with the session's weights at this point of its queue."""
    return await _result(
        service.sessions.sample, caller, session_id, body.seq, body.prompt, body.num_samples,
        body.sampling_params,
    )  # fmt: skip


@router.post("/v1/sessions/{session_id}/compute_logprobs")
async def compute_logprobs(session_id: str, body: LogprobsRequest, service: Svc, caller: Caller) -> Logprobs:
    """log p(tokens[i] | tokens[:i]) for every i (null for the first)."""
    values = await _result(service.sessions.compute_logprobs, caller, session_id, body.seq, body.tokens)
    return Logprobs(logprobs=values)


@router.post("/v1/sessions/{session_id}/save_state")
async def save_state(session_id: str, body: SaveStateRequest, service: Svc, caller: Caller) -> SavedState:
    """Write the adapter (PEFT) and its optimizer state, recorded as the adapter `<session id>.<name>`
    of the session's job; answers where, and that adapter."""
    saved = await _result(service.sessions.save_state, caller, session_id, body.seq, body.name, body.close)
    return SavedState(path=saved.path, adapter=saved.adapter)


@router.post("/v1/sessions/{session_id}/load_state")
async def load_state(session_id: str, body: LoadStateRequest, service: Svc, caller: Caller) -> dict[str, str]:
    """Replace the session's weights (and a session's optimizer state) by a saved state's."""
    await _result(service.sessions.load_state, caller, session_id, body.seq, body.path)
    return {}
