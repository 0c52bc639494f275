"""A session host in a Ray actor, and `RayHost`, the proxy the service drives it through.

`SessionHostActor` is an async Ray actor that loads one base and keeps one `SessionHost` on it, its cycle
thread started, so every session on the actor still shares its clock cycles: the actor only moves calls
in and results out. `RayHost` has the methods the service uses on a `SessionHost` (`create_session`,
`forward_backward`, `forward`, `optim_step`, `sample`, `compute_logprobs`, `save_state`, `load_state`,
`close_session`, `session_info`, `shutdown`), each primitive returning a `concurrent.futures.Future`.

**Two steps a call.** A primitive is first *queued* (`submit`, waited for: the host validates the call
there and a bad datum raises its `ValueError` in the caller, as a local host's does, and calls queue in
the order the caller sends them), then its *result* is awaited without blocking anyone (`result`, an
`ObjectRef` turned into the returned future). Queuing costs one round trip; the cycle is the actor's.

**A lost worker.** When the actor dies (`ray.kill`, its node lost, its process killed for memory) every
unanswered call's future fails with `WorkerLost`, and so does every later call on this proxy
(`lost` says why). The proxy never restarts anything: the service starts a new host and restores the
sessions from their last saved state (`orchestrator.service.session_hosts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from workers.contract.plan import LoraConfig
from workers.contract.sessions import WorkerLost


class HostNotStarted(RuntimeError):
    """A host's actor was not up in time (`RayHost.start`): the service answers 503, retry later."""


class SessionHostActor:
    """One base and its `SessionHost` (made a Ray actor by `RayHost.start`)."""

    def __init__(self, base_model: str, quantization: str, dtype: str, home: str | None) -> None:
        from workers.engine.model import load_base
        from workers.sessions.host import SessionHost

        loaded = load_base(
            base_model,
            quantization=quantization,  # type: ignore[arg-type]
            dtype=dtype,  # type: ignore[arg-type]
            home=Path(home) if home else None,  # crossed Ray as a str
        )
        self.host = SessionHost(loaded, base_model)
        self.host.start()
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count()

    async def create_session(self, kwargs: dict[str, Any]) -> str:
        # off the event loop: it reads a checkpoint and waits for the running cycle to attach an adapter
        return await asyncio.to_thread(lambda: self.host.create_session(**kwargs))

    async def submit(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """Queue one primitive on the host (validated now: a bad call raises here); a token for
        `result`. The host's methods only validate and append, so the event loop is not held."""
        future = getattr(self.host, method)(*args, **kwargs)
        token = next(self._ids)
        self._pending[token] = future
        return token

    async def result(self, token: int) -> Any:
        return await asyncio.wrap_future(self._pending.pop(token))

    async def session_info(self, session: str) -> tuple[int, LoraConfig] | None:
        return self.host.session_info(session)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.host.shutdown)


class RayHost:
    """A `SessionHost` in a Ray actor, seen through the same methods (see the module docstring)."""

    def __init__(self, actor: Any, base_model: str) -> None:
        self._actor = actor
        self.base_model = base_model
        self.lost: str | None = None  # why the actor is gone; None while it lives

    @classmethod
    def start(
        cls,
        base_model: str,
        quantization: str,
        dtype: str,
        home: str | None,
        *,
        resources: dict[str, float],
        name: str | None = None,
        timeout_s: float | None = None,
    ) -> RayHost:
        """Start an actor on a node with `resources` (`{"CPU": 1}`, or `{"CPU": 1, "GPU": 1}`) and wait
        until its base is loaded; a base that fails to load raises here, with its cause. An actor not up
        within `timeout_s` (no node had the resources free, or the load hangs) is killed and
        `HostNotStarted` raised: a create never waits forever on a cluster whose workers are held."""
        remote = ray.remote(SessionHostActor).options(  # type: ignore[attr-defined]
            num_cpus=resources.get("CPU", 1),
            num_gpus=resources.get("GPU", 0),
            name=name,
            max_restarts=0,  # a restarted actor would have lost its sessions anyway: the service restores
            max_concurrency=1000,
        )
        actor = remote.remote(base_model, quantization, dtype, home)
        host = cls(actor, base_model)
        try:
            ray.get(actor.session_info.remote(""), timeout=timeout_s)  # once __init__ (the load) is done
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor, no_restart=True)
            raise HostNotStarted(
                f"no session host for {base_model!r} was up within {timeout_s:g} s: no worker had "
                f"{resources} free (Ray has {ray.available_resources()} available), or its base's load "
                "hung"
            ) from None
        except RayActorError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise RuntimeError(_cause_line(cause)) from exc
        return host

    @property
    def actor(self) -> Any:
        return self._actor

    # ---- like SessionHost ----

    def start_cycles(self) -> None:
        """Nothing to do: the actor's host runs its cycles from the start."""

    def create_session(
        self,
        name: str | None = None,
        lora: LoraConfig | None = None,
        seed: int = 0,
        from_state: str | None = None,
        with_optimizer: bool = False,
        init_name: str | None = None,
    ) -> str:
        kwargs = {
            "name": name,
            "lora": lora,
            "seed": seed,
            "from_state": from_state,
            "with_optimizer": with_optimizer,
            "init_name": init_name,
        }
        return self._get(self._actor.create_session.remote(kwargs), "creating a session")

    def session_info(self, session: str) -> tuple[int, LoraConfig] | None:
        if self.lost is not None:
            return None
        try:
            return self._get(self._actor.session_info.remote(session), "reading a session", timeout=10)
        except (WorkerLost, ray.exceptions.GetTimeoutError):
            return None

    def forward_backward(self, session: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._call("forward_backward", session, *args, **kwargs)

    def forward(self, session: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._call("forward", session, *args, **kwargs)

    def optim_step(self, session: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._call("optim_step", session, *args, **kwargs)

    def sample(self, session: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._call("sample", session, *args, **kwargs)

    def compute_logprobs(self, session: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._call("compute_logprobs", session, *args, **kwargs)

    def save_state(self, session: str, path: str) -> Future[Any]:
        return self._call("save_state", session, path)

    def load_state(self, session: str, path: str, with_optimizer: bool = True) -> Future[Any]:
        return self._call("load_state", session, path, with_optimizer=with_optimizer)

    def close_session(self, session: str) -> Future[Any]:
        if self.lost is not None:  # nothing left to close
            done: Future[Any] = Future()
            done.set_result(None)
            return done
        return self._call("close_session", session)

    def shutdown(self) -> None:
        """Stop the host's cycles, then end the actor (a lost one is already gone)."""
        if self.lost is None:
            with contextlib.suppress(Exception):  # dying or stuck: it is killed below either way
                ray.get(self._actor.shutdown.remote(), timeout=30)
        ray.kill(self._actor, no_restart=True)
        self.lost = self.lost or "the host was shut down"

    # ---- inside ----

    def _lose(self, exc: BaseException) -> WorkerLost:
        if self.lost is None:
            why = _first_line(exc)
            self.lost = f"the worker holding base {self.base_model!r}'s sessions was lost ({why})"
        return WorkerLost(self.lost)

    def _get(self, ref: Any, doing: str, timeout: float | None = None) -> Any:
        if self.lost is not None:
            raise WorkerLost(self.lost)
        try:
            return ray.get(ref, timeout=timeout)
        except RayActorError as exc:
            raise self._lose(exc) from None
        except RayTaskError as exc:
            raise _cause(exc) from None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        token = self._get(self._actor.submit.remote(method, args, kwargs), method)
        answer: Future[Any] = Future()
        ref = self._actor.result.remote(token)

        def settle(done: Future[Any]) -> None:
            try:
                answer.set_result(done.result())
            except RayActorError as exc:
                answer.set_exception(self._lose(exc))
            except RayTaskError as exc:
                answer.set_exception(_cause(exc))
            except BaseException as exc:  # e.g. the object lost with its node
                answer.set_exception(self._lose(exc))

        ref.future().add_done_callback(settle)
        return answer


def _cause(exc: RayTaskError) -> BaseException:
    """The exception the host raised (a `ValueError` naming the field), not Ray's wrapper of it."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _cause_line(exc: BaseException) -> str:
    """What a failed creation task raised: the last line of its traceback (`TypeError: ...`), not Ray's
    "the actor died because of an error raised in its creation task" header."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


__all__ = ["HostNotStarted", "RayHost", "SessionHostActor"]
