"""What a training session leaves in SQL (and, through the event log, in MLflow): `Sessions` keeps the live
adapters, this module keeps their record.

- **A session is a job** of kind `session` (`JobKind.SESSION`), its id the session's, `running` from its
  creation until it ends: `succeeded` when its client closes it (or saves it with `close`), `cancelled`
  when the server ends it (idle, or a server that stopped or restarted), with `end_reason` saying which.
  It belongs to its project like any job, so tokens, `lorafleet jobs` and the MLflow experiment apply.
- **A saved state is an adapter of that job**, `trained`, named `<session id>.<name>` (unique in the
  project: two sessions may both save `step-100`), its `final_checkpoint` the saved files. Its parent is
  the state the session's weights last came from: its previous saved state, else the state it loaded or
  started from when that is an adapter, so the lineage tree shows the chain and `branch`, `export` and
  `promote` take it as any trained adapter. The files are written first and the row after, in one
  transaction with its checkpoint and its `done` event; a row that cannot be written removes the files,
  so there is neither a row without files nor a save that answered with an error but left them.
- **Each call's metrics are events** (`kind="session"`, `step` the optimizer step they belong to:
  a forward_backward's the step its gradients go into, an optim_step's the step it made), kept in memory
  and written in batches by a thread of their own: a call never waits for SQL, and a database outage
  delays them as the controller's events are delayed, never losing what fits the buffer. The MLflow mirror
  (`tracking.mirror`) turns them into the session's run, as it does a job's.

SQL writes that follow a host's work (a save, a close) run on one thread of this module's, in the order
they were asked, never on the host's cycle thread: a slow database must not stall every session's cycle.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.spec.states import JobKind, JobState
from orchestrator.store import Conflict, DatabaseUnavailable, NewEvent, NotFound, Store
from orchestrator.store.errors import StoreError
from workers import storage
from workers.contract.plan import check_name

if TYPE_CHECKING:
    from orchestrator.service.sessions import _Live

log = logging.getLogger(__name__)

FLUSH_S = 0.5  # how often buffered call events are written
MAX_BUFFERED = 100_000  # call events kept while the database is down; the oldest go first beyond
RESTARTED = "the server restarted; its saved states remain"
STOPPED = "the server stopped; its saved states remain"
CLOSED = "closed by its client"


def idle_reason(seconds: float) -> str:
    return f"idle for over {seconds:g} s (LORAFLEET_SESSION_IDLE_SECONDS); its saved states remain"


def saved_reason(adapter: str) -> str:
    return f"saved as {adapter} and closed by its client"


def adapter_name(session_id: str, name: str) -> str:
    """The adapter a session's state `name` becomes: unique in the project, and its session in sight."""
    return f"{session_id}.{name}"


def session_spec(live: _Live) -> dict[str, Any]:
    """What a session job's `spec` holds: how it was created (not a `JobSpec`: it has no adapters and no
    data; `JobRecord.job_spec` answers defaults for it)."""
    base, quantization, dtype = live.key
    return {
        "kind": "session",
        "base_model": base,
        "quantization": quantization,
        "dtype": dtype,
        "lora": live.lora.model_dump(mode="json"),
        "seed": live.seed,
        "from_state": live.from_state,
    }


@dataclass(frozen=True)
class Saved:
    """A saved state: where its files are, and the adapter (`project/name`) it became."""

    path: str
    adapter: str


class SessionRecords:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._events: deque[NewEvent] = deque(maxlen=MAX_BUFFERED)
        self._events_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one batch in flight: the flusher's and a save's
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="session-records")
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    # ---- the session's job ----

    def created(self, live: _Live, parent_id: str | None) -> None:
        """Write the session's job row; raises what the store raises (the caller drops the session)."""
        live.parent_id = parent_id
        self.store.create_session_job(live.project, live.id, session_spec(live))
        self._start()

    def ended(self, live: _Live, state: JobState, reason: str, closed: Future[None]) -> Future[None]:
        """Once the host has closed the session (`closed`), end its job with `reason`; the future
        resolves when that is written. A database that fails it leaves the job running, which the next
        start of the server ends (`end_orphans`): the close itself is done either way."""
        out: Future[None] = Future()

        def write() -> None:
            try:
                self.flush()
                self.store.end_session_job(live.id, state, reason)
            except Exception:
                log.exception("session %s: its job could not be ended (%s)", live.id, reason)
            out.set_result(None)

        closed.add_done_callback(lambda _: self._writes.submit(write))
        return out

    def end_orphans(self, reason: str = RESTARTED) -> list[str]:
        """End every session job still `running` from an earlier life of the server: its adapter was in
        that process's memory and is gone. Returns their ids."""
        ended = []
        for job in self.store.list_jobs(states=[JobState.RUNNING], kind=JobKind.SESSION):
            if self.store.end_session_job(job.id, JobState.CANCELLED, reason) is not None:
                log.info("session %s of project %s ended: %s", job.id, job.project, reason)
                ended.append(job.id)
        return ended

    # ---- saved states ----

    def check_save(self, live: _Live, name: str) -> str:
        """The adapter name a save of `name` takes, refused now if it cannot be recorded (too long, or
        taken): nothing is written for a save that could not become an adapter."""
        adapter = adapter_name(live.id, name)
        try:
            check_name(adapter, "`name`")
        except ValueError as exc:
            raise ValueError(f"{exc} (a state is recorded as the adapter `{live.id}.<name>`)") from None
        try:
            self.store.get_adapter(live.project, adapter)
        except NotFound:
            return adapter
        raise Conflict(f"session {live.id!r} already saved a state named {name!r}; choose another name")

    def saved(self, live: _Live, adapter: str, written: Future[str]) -> Future[Saved]:
        """Once the host has written the state (`written`), record it as an adapter; the future resolves
        to `Saved` when both are done, or fails (with no row and no files left) if either did."""
        out: Future[Saved] = Future()

        def record(path: str, step: int) -> None:
            try:
                self.flush()  # the steps before the state, in the event log before it
                row = self.store.add_saved_state(live.id, adapter, path, step, live.lora, live.parent_id)
            except BaseException as exc:
                _remove(path)
                out.set_exception(exc)
                return
            live.parent_id = row.id
            live.saved.append(row.qualified_name)
            out.set_result(Saved(path=path, adapter=row.qualified_name))

        def done(f: Future[str]) -> None:
            error = f.exception()
            if error is not None:
                out.set_exception(error)
                return
            path = f.result()
            self._writes.submit(record, path, _saved_step(path))

        written.add_done_callback(done)
        return out

    def loaded(self, live: _Live, parent_id: str | None, done: Future[Any]) -> None:
        """After a load_state from an adapter, that adapter is the parent of the next saved state."""
        if parent_id is not None:
            done.add_done_callback(lambda f: f.exception() is None and setattr(live, "parent_id", parent_id))

    def parent_of(self, project: str, record: Any, location: str) -> str | None:
        """The adapter a state comes from: the record `project/name` named, else the adapter of this
        project whose final weights are at `location` (a path a save returned)."""
        if record is not None:
            return str(record.id)
        try:
            found = self.store.adapter_at(project, location)
        except StoreError:
            return None
        return found.id if found is not None else None

    # ---- call events ----

    def called(self, live: _Live, call: str) -> Callable[[Future[Any]], None]:
        """A done-callback recording a call's metrics as an event of the session's job."""

        def record(f: Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            result = f.result()
            step = getattr(result, "step", None)
            if step is None:  # a forward_backward: its gradients go into the next step
                step = live.step + 1
            else:  # an optim_step: the session's step now (its host may be a Ray actor, out of reach here)
                live.step = max(live.step, int(step))
            metrics = dict(getattr(result, "metrics", None) or {})
            if not metrics:
                return
            payload = {"call": call, "metrics": metrics, "at": time.time()}
            event = NewEvent(live.id, "session", None, int(step), payload, uuid.uuid4().hex)
            with self._events_lock:
                self._events.append(event)

        return record

    def flush(self) -> None:
        """Write the buffered call events; on a database error they stay buffered for the next try."""
        with self._flush_lock:
            with self._events_lock:
                batch = list(self._events)
                self._events.clear()
            if not batch:
                return
            try:
                self.store.record_events(batch)  # event ids make a batch written twice land once
            except BaseException:
                with self._events_lock:  # back in front of what came meanwhile, in order
                    self._events.extendleft(reversed(batch))
                raise

    def shutdown(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        self._writes.shutdown(wait=True)
        try:
            self.flush()
        except Exception as exc:
            log.warning("session events not written at shutdown: %s", exc)

    def _start(self) -> None:
        with self._events_lock:
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._loop, name="session-events", daemon=True)
                self._flusher.start()

    def _loop(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self.flush()
            except DatabaseUnavailable as exc:
                log.warning("session events wait for the database: %s", exc)
            except Exception:
                log.exception("writing session events failed; they are tried again")


def _saved_step(path: str) -> int:
    """The optimizer steps a saved state holds, read from its files: the host may be a Ray actor (its
    sessions are not in this process), and the state, not the host's step now, is what was saved."""
    from workers.training import checkpoint as ckpt

    return int(ckpt.read_meta(path).get("step", 0))


def _remove(path: str) -> None:
    try:
        storage.remove(path)
    except OSError as exc:  # a remote store refusing: the files stay, said
        log.warning("could not remove %s after its state was not recorded: %s", path, exc)
