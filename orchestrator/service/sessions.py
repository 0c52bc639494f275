"""Interactive training sessions as use cases: a live LoRA adapter per session, driven call by call over
the API (Tinker's primitives, `workers.contract.sessions`), on a `SessionHost` the service keeps.

- **Placed on hosts.** A session lives on a host: one loaded base (`SessionHost`) whose cycle thread
  runs whatever its sessions queue, so they share its clock cycles. `service.session_hosts.HostPool`
  places it (the fullest host of its base with room, else a new one on a free worker; in this process or
  a Ray actor), refuses it (429 at the project's cap, 503 while every worker is busy, 422 for a base that
  never fits) and closes hosts that stay empty.
- **Survives its worker.** A host lost with its worker fails the calls it had not answered
  (`WorkerLost`, 503); the session's next call places it again and restores it from its last
  `save_state` (or `load_state`, or the state it started from): the calls since then are redone by the
  client (see `service.session_hosts`).
- **Owned by a project.** A session belongs to the project it was created in; any other project's token
  gets exactly the 404 an unknown id gets. Changing it (every primitive, close) needs a member's token.
- **Calls in the client's order.** The HTTP layer may receive one client's requests concurrently (its
  `TrainingClient` sends them from a pool), so each call carries the client's per-session sequence number
  `seq`, and a call is queued on the host only after every lower number was: one that arrives early
  waits (up to `SEQ_WAIT_S`) for the missing ones, so a forward_backward and the optim_step queued after it
  keep the user's order. A number that never comes (its request lost) is skipped after the wait; one that
  comes after that is refused (409), never run out of order. A call without `seq` is queued as it comes.
- **Validated in turn, refused alone.** A call's body is validated once it holds its turn, so a malformed
  call (`InvalidCall`: 422 naming each field, e.g. `data.3.loss_fn_inputs.weights`) still uses up its
  number and delays no one; nothing of it is queued, and its session and neighbours go on.
- **Sessions end** by `close`, by `save_state(..., close=True)`, or when idle: a session with nothing
  queued and no call for `LORAFLEET_SESSION_IDLE_SECONDS` is closed by a reaper thread, so a client that
  vanished does not hold the worker's memory.

Saved states go to `<storage>/sessions/<project>/<session>/<name>` (a PEFT checkpoint with the AdamW
state: `SessionHost.save_state`). A session can start from, or load, a state saved by its project's
sessions, a finished adapter of its project (`project/name`), or a path under the server's model roots;
the admin may name any path the server can read.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from orchestrator.service import preflight
from orchestrator.service import session_records as records
from orchestrator.service.auth import Principal, require_change
from orchestrator.service.session_hosts import Held, HostPool, NoRoom
from orchestrator.settings import Settings
from orchestrator.spec.states import JobState
from orchestrator.spec.views import SessionView
from orchestrator.store import Conflict, NotFound, Store
from workers import storage
from workers.contract.plan import DType, LoraConfig, Quantization, check_name
from workers.contract.sessions import AdamParams, ForwardBackwardInput, SamplingParams, WorkerLost

if TYPE_CHECKING:
    from workers.sessions.host import SessionHost

log = logging.getLogger(__name__)

MAX_SAMPLE_TOKENS = 4096  # new tokens one sample may ask for: a request must not hold a host for hours
SESSION_INIT_NAME = "session"  # a session's initial A is drawn for (seed, this): never for its id
SEQ_WAIT_S = 5.0  # how long a call waits for a missing lower sequence number before skipping it
ADAPTER_REF = re.compile(r"[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*")
HostKey = tuple[str, str, str]  # (base model, quantization, dtype)


class InvalidCall(ValueError):
    """A session call's body is malformed: 422, with each (field, message) at fault."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"`{f}`: {m}" for f, m in problems))


@dataclass
class _Live:
    id: str
    project: str
    key: HostKey
    held: Held  # the host it is on, as the pool keeps it
    lora: LoraConfig
    seed: int
    from_state: str | None
    created_at: datetime
    last_used_at: datetime
    last_used: float  # time.monotonic() of the last call received or answered
    turn: threading.Condition = field(default_factory=threading.Condition)
    next_seq: int = 0
    inflight: int = 0
    closed: bool = False
    # What a lost host's session is restored from: its last saved (or loaded) state, else where it began
    restore_from: str | None = None
    restore_optimizer: bool = False
    step: int = 0  # as the host last said (a lost host says nothing)
    # Calls queued since the restore point, and whether a lost host's loss reached the client (a call of
    # its failed with `WorkerLost`): a silent restore would drop those calls without a word.
    unsaved_calls: int = 0
    loss_told: bool = False

    @property
    def host(self) -> Any:
        """A `SessionHost`, or a `RayHost` with the same methods."""
        return self.held.host

    parent_id: str | None = None  # the adapter its weights last came from: its next saved state's parent
    saved: list[str] = field(default_factory=list)  # its saved states' adapters, `project/name`

    def view(self) -> SessionView:
        info = self.host.session_info(self.id)
        if info is not None:
            self.step = info[0]
        return SessionView(
            id=self.id,
            project=self.project,
            base_model=self.key[0],
            quantization=self.key[1],
            dtype=self.key[2],
            rank=self.lora.r,
            alpha=self.lora.alpha,
            target_modules=self.lora.target_modules,
            seed=self.seed,
            from_state=self.from_state,
            step=self.step,
            created_at=self.created_at,
            last_used_at=self.last_used_at,
            saved_states=list(self.saved),
        )


def _default_host(settings: Settings, key: HostKey) -> SessionHost:
    from workers.engine.model import load_base
    from workers.sessions.host import SessionHost

    base, quantization, dtype = key
    loaded = load_base(base, quantization=quantization, dtype=dtype, home=settings.home)  # type: ignore[arg-type]
    return SessionHost(loaded, base)


class Sessions:
    """The sessions of one service. `load_host(key)` builds an in-process host (default: the base loaded
    on this machine's best device); tests may give another. `on_ray` and `packs_running` tell the host
    pool whether the server runs on Ray and how many packs hold workers (`service.session_hosts`)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        allowed: preflight.Allowed,
        load_host: Callable[[HostKey], SessionHost] | None = None,
        on_ray: Callable[[], bool] = lambda: False,
        packs_running: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings, self.store, self.allowed = settings, store, allowed
        self._load_host = load_host or (lambda key: _default_host(settings, key))
        self.pool = HostPool(settings, self._load_host, on_ray, packs_running)
        self._live: dict[str, _Live] = {}
        self._creating: Counter[str] = Counter()  # per project: creates between their count and `_live`
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()
        self.records = records.SessionRecords(store)  # its job, saved states and call events in SQL

    # ---- sessions ----

    def create(
        self,
        principal: Principal,
        project: str,
        *,
        base_model: str | None = None,
        quantization: Quantization = "none",
        dtype: DType = "float32",
        lora: LoraConfig | None = None,
        seed: int = 0,
        from_state: str | None = None,
    ) -> SessionView:
        """A new session in `project`: a fresh adapter on `base_model`, or one started from a saved state
        (`from_state`: its weights, and its optimizer state if a session saved it); its base is then the
        state's, unless `base_model` says otherwise."""
        require_change(principal, project)
        location, parent_id = None, None
        if from_state is not None:
            location, record = self._state(principal, from_state, "from_state", project=project)
            parent_id = self.records.parent_of(project, record, location)
            if record is not None:
                base_model = base_model or record.base_model
                quantization, dtype = record.quantization, record.dtype  # type: ignore[assignment]
            elif base_model is None:
                from workers.training import checkpoint as ckpt

                try:
                    base_model = ckpt.read_adapter(location).base_model
                except Exception as exc:  # a saved state that does not read back: the caller's to fix
                    raise InvalidCall([("from_state", f"cannot read {from_state[:300]!r}: {exc}")]) from None
        if not base_model:
            raise InvalidCall([("base_model", "give the base model to train on (or a `from_state`)")])
        problems = preflight.model_problems("base_model", base_model, self.allowed, self.settings.home)
        if not problems and not _held_here(base_model):
            problems = [
                (
                    "base_model",
                    f"hub id {base_model!r} is not in this server's model cache: a session starts on a base "
                    "the server holds (a catalogued base it pulled, a local directory, or a cached hub "
                    "id); it never downloads one during a request",
                )
            ]
        if problems:
            raise InvalidCall(problems)
        key = (base_model, quantization, dtype)
        session_id = f"sess-{uuid.uuid4().hex[:16]}"
        with_optimizer = location is not None and _has_optimizer(location)
        with self._creating_in(project) as held_now:
            held = self._place(
                key,
                project,
                lora,
                session_id,
                held_now,
                seed=seed,
                from_state=location,
                with_optimizer=with_optimizer,
            )
            info = held.host.session_info(session_id)
            now = datetime.now(UTC)
            live = _Live(
                session_id,
                project,
                key,
                held,
                info[1] if info is not None else (lora or LoraConfig()),
                seed,
                from_state,
                created_at=now,
                last_used_at=now,
                last_used=time.monotonic(),
                restore_from=location,
                restore_optimizer=with_optimizer,
                step=info[0] if info is not None else 0,
            )
            try:
                self.records.created(live, parent_id)
            except BaseException:
                closed = held.host.close_session(session_id)  # no live session without its job row
                closed.add_done_callback(lambda _: self.pool.release(held, session_id))
                raise
            with self._lock:
                self._live[session_id] = live
            self._start_reaper()
            return live.view()

    @contextmanager
    def _creating_in(self, project: str) -> Iterator[int]:
        """The sessions `project` holds, counting the creates in flight: two creates at once each count
        the other, so together they never pass the project's cap (a create's count and its `_live` entry
        are far apart: a host may start, its job row is written)."""
        with self._lock:
            held_now = self._held_by(project) + self._creating[project]
            self._creating[project] += 1
        try:
            yield held_now
        finally:
            with self._lock:
                self._creating[project] -= 1
                if not self._creating[project]:
                    del self._creating[project]

    def _held_by(self, project: str, besides: _Live | None = None) -> int:
        """Live sessions of `project` other than `besides` (under `_lock`)."""
        return sum(1 for s in self._live.values() if s.project == project and s is not besides)

    def list(self, principal: Principal, project: str | None = None) -> list[SessionView]:
        scope = principal.scope(project)
        with self._lock:
            live = [s for s in self._live.values() if principal.sees(s.project)]
        return [s.view() for s in live if scope is None or s.project == scope]

    def get(self, principal: Principal, session_id: str) -> SessionView:
        return self._visible(principal, session_id).view()

    def close(self, principal: Principal, session_id: str) -> tuple[SessionView, Future[None]]:
        """End the session once what it queued has run; from now on its id is unknown (404)."""
        live = self._visible(principal, session_id)
        require_change(principal, live.project)
        return live.view(), self._close(live, JobState.SUCCEEDED, records.CLOSED)

    def close_idle(self, now: float | None = None) -> list[str]:
        """Close every session with nothing in flight and no call for `session_idle_seconds`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [
                s
                for s in self._live.values()
                if s.inflight == 0 and now - s.last_used > self.settings.session_idle_seconds
            ]
        for s in idle:
            log.info("closing session %s of project %s: idle", s.id, s.project)
            self._close(s, JobState.CANCELLED, records.idle_reason(self.settings.session_idle_seconds))
        return [s.id for s in idle]

    def shutdown(self) -> None:
        """Stop: every live session ends (its job says the server stopped), then the hosts."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
        with self._lock:
            live = list(self._live.values())
        ending = [self._close(s, JobState.CANCELLED, records.STOPPED) for s in live]
        for future in ending:
            try:
                future.result(timeout=30)
            except Exception as exc:  # a host that does not answer: the next start ends its jobs
                log.warning("a session did not close at shutdown: %s", exc)
        self.records.shutdown()
        self.pool.shutdown()

    # ---- primitives: each returns the host's future ----

    def forward_backward(
        self,
        principal: Principal,
        session_id: str,
        seq: int | None,
        data: Any,
        loss_fn: Any = "cross_entropy",
        loss_fn_config: Any = None,
        backward: bool = True,
    ) -> Future[Any]:
        def submit(live: _Live) -> Future[Any]:
            request = _valid(
                ForwardBackwardInput,
                {"data": data, "loss_fn": loss_fn, "loss_fn_config": loss_fn_config},
            )
            primitive = live.host.forward_backward if backward else live.host.forward
            future = _named(lambda: primitive(live.id, request.data, request.loss_fn, request.loss_fn_config))
            if backward:
                future.add_done_callback(self.records.called(live, "forward_backward"))
            return future

        return self._call(principal, session_id, seq, submit)

    def optim_step(
        self, principal: Principal, session_id: str, seq: int | None, adam_params: Any = None
    ) -> Future[Any]:
        def submit(live: _Live) -> Future[Any]:
            params = _valid(AdamParams, adam_params or {}, "adam_params")
            future = live.host.optim_step(live.id, params)
            future.add_done_callback(self.records.called(live, "optim_step"))
            return future

        return self._call(principal, session_id, seq, submit)

    def sample(
        self,
        principal: Principal,
        session_id: str,
        seq: int | None,
        prompt: Any,
        num_samples: Any = 1,
        sampling_params: Any = None,
    ) -> Future[Any]:
        def submit(live: _Live) -> Future[Any]:
            params = _valid(SamplingParams, sampling_params or {}, "sampling_params")
            if params.max_tokens > MAX_SAMPLE_TOKENS:
                raise InvalidCall(
                    [
                        (
                            "sampling_params.max_tokens",
                            f"is {params.max_tokens}: a sample holds at most {MAX_SAMPLE_TOKENS} tokens",
                        )
                    ]
                )
            tokens = _token_list(prompt, "prompt")
            if not isinstance(num_samples, int) or not 1 <= num_samples <= 64:
                raise InvalidCall([("num_samples", f"is {num_samples!r}: give a whole number 1..64")])
            return _named(lambda: live.host.sample(live.id, tokens, num_samples, params))

        return self._call(principal, session_id, seq, submit)

    def compute_logprobs(
        self, principal: Principal, session_id: str, seq: int | None, tokens: Any
    ) -> Future[Any]:
        def submit(live: _Live) -> Future[Any]:
            ids = _token_list(tokens, "tokens")
            return _named(lambda: live.host.compute_logprobs(live.id, ids))

        return self._call(principal, session_id, seq, submit)

    def save_state(
        self, principal: Principal, session_id: str, seq: int | None, name: Any, close: bool = False
    ) -> Future[Any]:
        """Write the session's adapter and optimizer state under `name`, recorded as the adapter
        `<session id>.<name>` of the session's job (`session_records`); resolves to `Saved` (its path
        and adapter). With `close`, the session ends once it is written."""

        def submit(live: _Live) -> Future[Any]:
            if not isinstance(name, str):
                raise InvalidCall([("name", f"is {name!r}: give a name such as 'step-100'")])
            _named(lambda: check_name(name, "`name`"), field="name")
            adapter = _named(lambda: self.records.check_save(live, name), field="name")
            path = storage.join(self.settings.storage_root, "sessions", live.project, live.id, name)
            future = self.records.saved(live, adapter, live.host.save_state(live.id, path))
            future.add_done_callback(lambda f: self._restore_point(live, f, path, True))
            if close:  # queued after the save; the turn's lock is reentrant
                self._close(live, JobState.SUCCEEDED, records.saved_reason(f"{live.project}/{adapter}"))
            return future

        return self._call(principal, session_id, seq, submit)

    def load_state(self, principal: Principal, session_id: str, seq: int | None, path: Any) -> Future[Any]:
        """Replace the session's weights (and, from a session's save, its optimizer state) by a saved
        state's: `path` as `from_state` takes it."""

        def submit(live: _Live) -> Future[Any]:
            if not isinstance(path, str) or not path:
                raise InvalidCall([("path", f"is {path!r}: give a saved state's path or `project/name`")])
            location, record = self._state(principal, path, "path", project=live.project)
            with_optimizer = _has_optimizer(location)
            future = live.host.load_state(live.id, location, with_optimizer=with_optimizer)
            future.add_done_callback(lambda f: self._restore_point(live, f, location, with_optimizer))
            self.records.loaded(live, self.records.parent_of(live.project, record, location), future)
            return future

        return self._call(principal, session_id, seq, submit)

    # ---- inside ----

    def _visible(self, principal: Principal, session_id: str) -> _Live:
        with self._lock:
            live = self._live.get(session_id)
        if live is None or not principal.sees(live.project):
            raise NotFound(f"session {session_id!r} not found")
        return live

    def _call(
        self, principal: Principal, session_id: str, seq: int | None, submit: Callable[[_Live], Future[Any]]
    ) -> Future[Any]:
        live = self._visible(principal, session_id)
        require_change(principal, live.project)
        with self._turn(live, seq):
            if live.closed:
                raise NotFound(f"session {session_id!r} not found")
            if live.held.lost:
                unsaved, told = live.unsaved_calls, live.loss_told
                self._restore(live)
                live.unsaved_calls, live.loss_told = 0, False
                if unsaved and not told:  # no call of the client's failed with the worker: this one says it
                    raise WorkerLost(
                        f"the worker holding session {live.id!r} was lost with the {unsaved} call(s) queued "
                        "since its last save_state; it is restored from that state now (this call was not "
                        "run)"
                    )
            try:
                future = submit(live)
            except WorkerLost:
                self.pool.forget(live.held)  # the next call restores
                live.loss_told = True
                raise
            live.unsaved_calls += 1
            with self._lock:
                live.inflight += 1
                live.last_used, live.last_used_at = time.monotonic(), datetime.now(UTC)
        future.add_done_callback(lambda f: self._answered(live, f))
        return future

    def _answered(self, live: _Live, done: Future[Any]) -> None:
        with self._lock:
            if not done.cancelled() and isinstance(done.exception(), WorkerLost):
                live.loss_told = True
            live.inflight -= 1
            live.last_used, live.last_used_at = time.monotonic(), datetime.now(UTC)

    @contextmanager
    def _turn(self, live: _Live, seq: int | None) -> Iterator[None]:
        """Hold the session's turn for call number `seq`: after every lower number was queued (or waited
        for `SEQ_WAIT_S`), and its number used up whatever the call's fate."""
        with live.turn:
            if seq is None:
                yield
                return
            deadline = time.monotonic() + SEQ_WAIT_S
            while live.next_seq < seq and not live.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "session %s: calls %d..%d never came; going on with %d",
                        live.id,
                        live.next_seq,
                        seq - 1,
                        seq,
                    )
                    break
                live.turn.wait(left)
            if seq < live.next_seq:
                raise Conflict(
                    f"call number {seq} of session {live.id!r} comes after call {live.next_seq - 1} was "
                    "queued (a repeated request, or one that arrived later than the server waits); it was "
                    "not run: every call of a session needs a new, increasing `seq`"
                )
            try:
                yield
            finally:
                live.next_seq = seq + 1
                live.turn.notify_all()

    def _close(self, live: _Live, state: JobState, reason: str) -> Future[None]:
        with self._lock:
            if self._live.get(live.id) is live:
                del self._live[live.id]
            already, live.closed = live.closed, True
        with live.turn:  # calls waiting for their turn see it closed
            live.turn.notify_all()
        if already:
            done: Future[None] = Future()
            done.set_result(None)
            return done
        held = live.held
        closed = held.host.close_session(live.id)
        closed.add_done_callback(lambda _: self.pool.release(held, live.id))
        return self.records.ended(live, state, reason, closed)

    def _place(
        self,
        key: HostKey,
        project: str,
        lora: LoraConfig | None,
        session_id: str,
        held_now: int,
        **create: Any,
    ) -> Held:
        """Create the session on the host the pool places it on (joined or started), its project holding
        `held_now` sessions besides it; `NoRoom` when there is none."""
        try:
            held, need = self.pool.acquire(key, project, held_now, lora)
        except NoRoom:
            raise
        except Exception as exc:  # what a base that passed preflight still fails with, in words
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise InvalidCall([("base_model", f"cannot load {key[0][:300]!r}: {first}")]) from exc
        try:
            held.host.create_session(session_id, lora=lora, init_name=SESSION_INIT_NAME, **create)
        except BaseException:
            self.pool.unreserve(held, need)
            raise
        self.pool.attach(held, session_id, need)
        return held

    def _restore(self, live: _Live) -> None:
        """Place a session whose host was lost again, from its last saved state (in its turn)."""
        self.pool.forget(live.held)
        log.warning(
            "session %s of project %s lost its worker; restoring it from %s",
            live.id,
            live.project,
            live.restore_from or "its starting state",
        )
        with self._lock:  # it counts once in its project, not twice
            held_now = self._held_by(live.project, besides=live)
        live.held = self._place(
            live.key,
            live.project,
            live.lora,
            live.id,
            held_now,
            seed=live.seed,
            from_state=live.restore_from,
            with_optimizer=live.restore_optimizer,
        )

    def _restore_point(self, live: _Live, done: Future[Any], location: str, with_optimizer: bool) -> None:
        """A state written or loaded is what a lost host's session comes back from."""
        if not done.cancelled() and done.exception() is None:
            with self._lock:
                live.restore_from, live.restore_optimizer = location, with_optimizer
                live.unsaved_calls = 0

    def _start_reaper(self) -> None:
        with self._lock:
            if self._reaper is not None:
                return
            self._reaper = threading.Thread(target=self._reap, name="session-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        shortest = min(self.settings.session_idle_seconds, self.settings.session_host_linger_seconds)
        period = min(5.0, max(0.05, shortest / 4))
        while not self._stop.wait(period):
            try:
                self.close_idle()
                self.pool.close_idle()
            except Exception:  # the reaper must outlive one failed close
                log.exception("closing idle sessions or hosts failed")

    def _state(
        self, principal: Principal, ref: str, field_name: str, project: str | None = None
    ) -> tuple[str, Any]:
        """Where a saved state is (and its adapter record, for an adapter `project/name`), if the caller
        may read it: see the module docstring. Anything else answers as a missing one would."""
        if ADAPTER_REF.fullmatch(ref) and not ref.startswith("."):
            owner, _, name = ref.partition("/")
            if not principal.sees(owner):
                raise NotFound(f"adapter {ref} not found")
            record = self.store.get_adapter(owner, name)
            if not record.final_checkpoint:
                raise InvalidCall([(field_name, f"adapter {ref} is {record.state}: it has no weights yet")])
            return record.final_checkpoint, record
        own = storage.join(self.settings.storage_root, "sessions", project or principal.project or "")
        if not (principal.admin or _inside(ref, own) or _inside_roots(ref, self.allowed.model_roots)):
            raise InvalidCall(
                [
                    (
                        field_name,
                        f"{ref[:300]!r} is not a state this token may read: give a path `save_state` "
                        "returned for this project, or an adapter as `project/name`",
                    )
                ]
            )
        try:
            found = storage.is_file(storage.join(ref, "adapter_config.json"))
        except (OSError, ValueError) as exc:  # a name too long, a NUL: nothing there
            raise InvalidCall([(field_name, f"{ref[:300]!r} cannot be read: {exc}")]) from None
        if not found:
            missing = f"{ref[:300]!r} holds no saved adapter (no adapter_config.json)"
            raise InvalidCall([(field_name, missing)])
        return ref, None


def _held_here(base_model: str) -> bool:
    """Whether the base is on this machine: catalogued (preflight checked it was pulled) or a path, or a
    hub id in the local Hugging Face cache."""
    from workers.bases.catalog import CATALOG, is_gguf_reference

    if base_model in CATALOG or base_model.startswith((".", "~", "/")) or is_gguf_reference(base_model):
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(base_model, "config.json"), str)
    except Exception:  # a malformed id: not held
        return False


def _inside(path: str, root: str) -> bool:
    if storage.is_remote(root):
        return path.startswith(root.rstrip("/") + "/") and ".." not in path.split("/")
    try:
        return preflight.within(Path(path), [Path(root)])
    except (OSError, RuntimeError, ValueError):
        return False


def _inside_roots(path: str, roots: Any) -> bool:
    return roots is not None and not storage.is_remote(path) and any(_inside(path, str(r)) for r in roots)


def _has_optimizer(location: str) -> bool:
    """Whether a state holds a session's optimizer (a pack's checkpoint holds a pack's, not one to load)."""
    from workers.training import checkpoint as ckpt

    return "session" in ckpt.read_meta(location) and storage.is_file(
        storage.join(location, ckpt.TRAINING_STATE)
    )


def _valid(model: Any, value: Any, prefix: str | None = None) -> Any:
    """`model.model_validate(value)`, its errors as `InvalidCall` with dotted field paths."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(error["loc"]))
            message = str(error["msg"]).removeprefix("Value error, ")[:500]
            problems.append((_located(loc, _field_of(message)), message))
        raise InvalidCall(problems) from None


def _located(loc: str, named: str | None) -> str:
    """The most precise field: pydantic's location, completed by the field the message names (a
    model's own check is located at the model, `data.3`, and names `loss_fn_inputs.weights`)."""
    if not loc:
        return named or "body"
    if named is None:
        return loc
    parts = loc.split(".")
    head = named.split(".")[0]
    if head == parts[0]:
        return named  # already the full path (`data.0.loss_fn_inputs.logprobs`)
    if head not in parts:
        return f"{loc}.{named}"
    return loc


def _field_of(message: str) -> str | None:
    """The field a worker's message names first (`data[3].model_input` -> `data.3.model_input`)."""
    match = re.search(r"`([A-Za-z_][\w.\[\]]*)`", message)
    return re.sub(r"\[(\d+)\]", r".\1", match.group(1)) if match else None


def _named(call: Callable[[], Any], field: str | None = None) -> Any:
    """`call()`, a `ValueError` it raises (the host's checks) turned into an `InvalidCall` on the field
    its message names."""
    try:
        return call()
    except ValueError as exc:
        message = str(exc)[:500]
        raise InvalidCall([(field or _field_of(message) or "body", message)]) from None


def _token_list(value: Any, field_name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidCall([(field_name, "give a list of token ids (whole numbers)")])
    return value
