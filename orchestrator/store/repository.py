"""The store: every read and write of lorafleet's SQL state, one transaction per method.

Shaped like MLflow's SQL store: one class, rows that turn into immutable records (`to_entity()`) before
the session closes, and one managed session (`_session`) that commits on success, rolls back on any
error, and turns database errors into typed ones (`Conflict`, `DatabaseUnavailable`). Lookups that miss
raise `NotFound`; state changes are checked against `orchestrator.spec.states` and raise `InvalidTransition`.

Concurrency: on PostgreSQL a row about to change state is read `FOR UPDATE`, and FIFO numbers come from a
counter row bumped by an UPDATE (which holds the row lock until commit), so two submitters never share a
number. On SQLite writes take the database lock at BEGIN (see engine.py), which serialises them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import uuid
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Self

from sqlalchemy import Engine, bindparam, case, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, defer, sessionmaker

from orchestrator.spec.states import (
    ADAPTER_FINISHED,
    AdapterState,
    InvalidTransition,
    JobKind,
    JobState,
    PackState,
    check_transition,
)
from orchestrator.store import migrate
from orchestrator.store.engine import ensure_sqlite_dir, make_engine, writer
from orchestrator.store.errors import Conflict, DatabaseRefused, DatabaseUnavailable, NotFound, StoreError
from orchestrator.store.models import (
    AdapterRow,
    CheckpointRow,
    EventRow,
    JobRow,
    MetricSummaryRow,
    PackMemberRow,
    PackRow,
    ProjectRow,
    RegistryEntryRow,
    SequenceRow,
    TokenRow,
)
from orchestrator.store.records import (
    UNSET,
    AdapterChange,
    AdapterRecord,
    CheckpointRecord,
    EventRecord,
    JobRecord,
    MetricRecord,
    NewAdapter,
    NewEvent,
    PackMemberRecord,
    PackRecord,
    RegistryRecord,
    TokenRecord,
    Unset,
    config_hash,
    utc,
)
from workers.contract.plan import DataConfig, LoraConfig, TrainConfig

log = logging.getLogger(__name__)

ADAPTER_SEQ = "adapter_seq"  # the counter row seeded by the initial migration
REGISTRY_DECISIONS = (AdapterState.PROMOTED, AdapterState.REJECTED)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def default_lower_is_better(key: str) -> bool:
    """Losses and perplexities improve downwards; any other metric upwards."""
    return key.endswith(("loss", "perplexity"))


class Store:
    """lorafleet's SQL state on SQLite (`sqlite:///path`) or PostgreSQL (`postgresql+psycopg://...`).

    Construction refuses a database whose schema is not at the Alembic head (`SchemaOutOfDate`, with
    the command to run); `Store.open(url)` migrates first, as the embedded default does.
    """

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine if engine is not None else make_engine(url)
        try:
            migrate.check_schema(self.engine, url)
        except BaseException:
            self.engine.dispose()
            raise
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(writer(self.engine), expire_on_commit=False)

    @classmethod
    def open(cls, url: str, upgrade: bool = True) -> Self:
        """A store on `url`, migrated to the head first when `upgrade` (SQLite: the file's directory too)."""
        ensure_sqlite_dir(url)
        engine = make_engine(url)
        try:
            if upgrade:
                migrate.upgrade_engine(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(url, engine=engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def _session(self, what: str, write: bool = False) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error; database errors become typed errors."""
        session = (self._write if write else self._read)()
        try:
            yield session
            session.commit()
        except IntegrityError as exc:
            session.rollback()
            raise Conflict(f"{what}: conflicts with existing data ({_first_line(exc.orig)})") from exc
        except DBAPIError as exc:
            _rollback_quietly(session)
            if _unreachable(exc):
                raise DatabaseUnavailable(
                    f"{what}: the database is unreachable ({_first_line(exc.orig)})"
                ) from exc
            raise DatabaseRefused(f"{what}: database error ({_first_line(exc.orig)})") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # ---- jobs ----

    def create_job(
        self,
        project: str,
        name: str,
        spec: dict[str, Any],
        adapters: Sequence[NewAdapter],
        idempotency_key: str | None = None,
        parent_projects: Collection[str] | None = None,
    ) -> tuple[JobRecord, list[AdapterRecord], bool]:
        """Create a job and its adapters (and the project, if new), all or nothing.

        A `parent_id` outside the job must be an adapter of one of `parent_projects` (None: any project):
        one of another project is `NotFound`, exactly as an unknown id, so a caller that may read only
        some projects can never start from, or learn of, another's weights.

        Returns `(job, adapters, created)`. With an `idempotency_key` already used in this project for the
        same name and spec, returns that job and `created=False`; the same key for a different job of this
        project is a `Conflict`. Keys are per project: another project's use of a key is never seen.
        A name already taken in the project (or repeated in `adapters`) is a `Conflict` that names it,
        and nothing is written.
        """
        what = f"create job {name!r} in project {project!r}"
        try:
            with self._session(what, write=True) as s:
                if idempotency_key is not None:
                    existing = self._job_for_key(s, idempotency_key, project, name, spec)
                    if existing is not None:
                        return existing
                return self._create_job(s, project, name, spec, adapters, idempotency_key, parent_projects)
        except Conflict:
            if idempotency_key is None:
                raise
            with self._session(what) as s:  # a concurrent submit with the same key won the race
                existing = self._job_for_key(s, idempotency_key, project, name, spec)
            if existing is None:
                raise
            return existing

    def _job_for_key(
        self, s: Session, key: str, project: str, name: str, spec: dict[str, Any]
    ) -> tuple[JobRecord, list[AdapterRecord], bool] | None:
        row = s.scalars(
            select(JobRow).where(JobRow.project == project, JobRow.idempotency_key == key)
        ).one_or_none()
        if row is None:
            return None
        if (row.name, row.spec) != (name, spec):
            raise Conflict(
                f"idempotency key {key!r} was already used for job {row.id} ({row.project}/{row.name}) "
                "with a different spec; use a new key for a new job"
            )
        adapters = s.scalars(select(AdapterRow).where(AdapterRow.job_id == row.id).order_by(AdapterRow.seq))
        return row.to_entity(), [a.to_entity() for a in adapters], False

    def _create_job(
        self,
        s: Session,
        project: str,
        name: str,
        spec: dict[str, Any],
        adapters: Sequence[NewAdapter],
        idempotency_key: str | None,
        parent_projects: Collection[str] | None,
    ) -> tuple[JobRecord, list[AdapterRecord], bool]:
        names = [a.name for a in adapters]
        repeated = sorted(n for n, count in Counter(names).items() if count > 1)
        if repeated:
            raise Conflict(f"job {name!r} names the same adapter more than once: {repeated}")
        taken = s.execute(
            select(AdapterRow.name, AdapterRow.job_id)
            .where(AdapterRow.project == project, AdapterRow.name.in_(names))
            .order_by(AdapterRow.name)
        ).all()
        if taken:
            listed = ", ".join(f"{project}/{n} (job {j})" for n, j in taken)
            raise Conflict(
                f"adapter name already taken in project {project!r}: {listed}; choose another name, "
                "branch from it with `parent`, train it again (`lorafleet retry NAME`) or delete it "
                "(`lorafleet delete NAME`)"
            )
        now = _now()
        self._ensure_project(s, project, now)
        job = JobRow(
            id=_new_id(),
            project=project,
            name=name,
            spec=spec,
            state=JobState.PENDING.value,
            idempotency_key=idempotency_key,
            created_at=now,
            updated_at=now,
            kind=JobKind.TRAIN.value,
        )
        s.add(job)
        s.flush()  # the job row exists before adapters reference it
        ids = {a.name: _new_id() for a in adapters}
        lineage = self._lineage(s, adapters, ids, parent_projects)
        first = self._next_seq(s, len(adapters))
        rows = []
        for i, a in enumerate(adapters):
            parent_id, root_id, depth = lineage[a.name]
            rows.append(
                dict(
                    id=ids[a.name],
                    project=project,
                    name=a.name,
                    job_id=job.id,
                    state=AdapterState.QUEUED.value,
                    priority=a.priority,
                    seq=first + i,
                    base_model=a.base_model,
                    quantization=a.quantization,
                    dtype=a.dtype,
                    lora=a.lora.model_dump(mode="json"),
                    train=a.train.model_dump(mode="json"),
                    data=a.data.model_dump(mode="json"),
                    parent_id=parent_id,
                    root_id=root_id,
                    depth=depth,
                    config_hash=a.config_hash
                    or config_hash(a.base_model, a.quantization, a.dtype, a.lora, a.train, a.data),
                    output_dir=a.output_dir,
                    step=0,
                    created_at=now,
                    updated_at=now,
                )
            )
        # One multi-row INSERT, not one per adapter (a 1,000-adapter job was 1,000 round trips);
        # parents of the same job are inserted first.
        if rows:  # an empty parameter list would be one INSERT of defaults, not none
            s.execute(insert(AdapterRow), sorted(rows, key=lambda row: row["depth"]))
        return job.to_entity(), [AdapterRow(**row).to_entity() for row in rows], True

    @staticmethod
    def _lineage(
        s: Session,
        adapters: Sequence[NewAdapter],
        ids: Mapping[str, str],
        parent_projects: Collection[str] | None,
    ) -> dict[str, tuple[str | None, str, int]]:
        """(parent_id, root_id, depth) per new adapter, from an existing parent row or one in this job."""
        by_name = {a.name: a for a in adapters}
        external = {a.parent_id for a in adapters if a.parent_id is not None}
        query = select(AdapterRow).where(AdapterRow.id.in_(external))
        if parent_projects is not None:
            query = query.where(AdapterRow.project.in_(list(parent_projects)))
        parents = {row.id: row for row in s.scalars(query)}
        resolved: dict[str, tuple[str | None, str, int]] = {}

        def resolve(a: NewAdapter, trail: tuple[str, ...]) -> tuple[str | None, str, int]:
            if a.name in resolved:
                return resolved[a.name]
            if a.parent_id is not None and a.parent_name is not None:
                raise StoreError(f"adapter {a.name!r}: give `parent_id` or `parent_name`, not both")
            if a.parent_id is not None:
                parent = parents.get(a.parent_id)
                if parent is None:
                    raise NotFound(f"parent adapter id {a.parent_id!r} of adapter {a.name!r} not found")
                result: tuple[str | None, str, int] = (parent.id, parent.root_id, parent.depth + 1)
            elif a.parent_name is not None:
                if a.parent_name not in by_name:
                    raise NotFound(f"parent {a.parent_name!r} of adapter {a.name!r} is not in this job")
                if a.parent_name in (*trail, a.name):
                    raise StoreError(
                        f"adapter {a.name!r} is its own ancestor: {' -> '.join((*trail, a.name))}"
                    )
                _, root_id, depth = resolve(by_name[a.parent_name], (*trail, a.name))
                result = (ids[a.parent_name], root_id, depth + 1)
            else:
                result = (None, ids[a.name], 0)
            resolved[a.name] = result
            return result

        for a in adapters:
            resolve(a, ())
        return resolved

    @staticmethod
    def _ensure_project(s: Session, project: str, now: datetime) -> None:
        dialect = s.get_bind().dialect.name
        if dialect in ("postgresql", "sqlite"):
            dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            stmt = dialect_insert(ProjectRow).values(name=project, created_at=now)
            s.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
        elif s.get(ProjectRow, project) is None:
            s.add(ProjectRow(name=project, created_at=now))

    @staticmethod
    def _next_seq(s: Session, count: int) -> int:
        """Reserve `count` FIFO numbers; returns the first. The UPDATE locks the counter until commit."""
        bumped = s.execute(
            update(SequenceRow).where(SequenceRow.name == ADAPTER_SEQ).values(value=SequenceRow.value + count)
        )
        if bumped.rowcount != 1:  # type: ignore[attr-defined]
            raise StoreError(f"the {ADAPTER_SEQ!r} counter row is missing; was the database migrated?")
        last = s.scalar(select(SequenceRow.value).where(SequenceRow.name == ADAPTER_SEQ))
        assert last is not None
        return last - count + 1

    def get_job(self, job_id: str) -> JobRecord:
        with self._session(f"get job {job_id!r}") as s:
            return self._job(s, job_id).to_entity()

    def list_jobs(
        self,
        project: str | None = None,
        states: Collection[JobState] | None = None,
        kind: JobKind | None = None,
    ) -> list[JobRecord]:
        """Jobs (of one kind, or all), newest first."""
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id)
        if project is not None:
            query = query.where(JobRow.project == project)
        if states is not None:
            query = query.where(JobRow.state.in_([str(x) for x in states]))
        if kind is not None:
            query = query.where(JobRow.kind == JobKind(kind).value)
        with self._session("list jobs") as s:
            return [row.to_entity() for row in s.scalars(query)]

    def job_states(self, states: Collection[JobState], kind: JobKind | None = None) -> dict[str, JobState]:
        """`{job id: state}` of the jobs in `states` (of one kind, or all), without their specs: what a
        controller tick reads of every open job (decoding 200 jobs' specs each tick once cost it more
        than its writes)."""
        query = select(JobRow.id, JobRow.state).where(JobRow.state.in_([str(x) for x in states]))
        if kind is not None:
            query = query.where(JobRow.kind == JobKind(kind).value)
        with self._session("list job states") as s:
            rows = s.execute(query.order_by(JobRow.created_at, JobRow.id)).tuples()
            return {job_id: JobState(state) for job_id, state in rows}

    def update_job(
        self,
        job_id: str,
        state: JobState | None = None,
        *,
        error: str | Unset | None = UNSET,
        mlflow_run_id: str | Unset | None = UNSET,
    ) -> JobRecord:
        """Move a job to `state` (checked against the job lifecycle) and/or set `error`, `mlflow_run_id`
        (each left UNSET is kept)."""
        with self._session(f"update job {job_id!r}", write=True) as s:
            row = self._job(s, job_id, lock=True)
            if state is not None:
                check_transition("job", row.state, state, entity=job_id)
                row.state = JobState(state).value
            if not isinstance(error, Unset):
                row.error = error
            if not isinstance(mlflow_run_id, Unset):
                row.mlflow_run_id = mlflow_run_id
            row.updated_at = _now()
            s.flush()
            return row.to_entity()

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None) -> JobRecord:
        """Move a job to `state`; `error` (if given) says why it failed."""
        return self.update_job(job_id, state, error=UNSET if error is None else error)

    # ---- sessions: jobs of kind `session`, their saved states adapters of them ----

    def create_session_job(self, project: str, job_id: str, spec: dict[str, Any]) -> JobRecord:
        """The job row of a new training session (and its project, if new): `running` from the start,
        its id the session's, so the session's calls, events and saved states all name it."""
        now = _now()
        with self._session(f"create session job {job_id!r} in project {project!r}", write=True) as s:
            self._ensure_project(s, project, now)
            row = JobRow(
                id=job_id,
                project=project,
                name=job_id,
                spec=spec,
                state=JobState.RUNNING.value,
                kind=JobKind.SESSION.value,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            s.flush()
            return row.to_entity()

    def end_session_job(self, job_id: str, state: JobState, reason: str) -> JobRecord | None:
        """End a running session's job in `state`, saying why; None if it had already ended (a close
        racing the idle reaper ends it once, with the first reason)."""
        with self._session(f"end session job {job_id!r}", write=True) as s:
            row = self._job(s, job_id, lock=True)
            if row.kind != JobKind.SESSION.value:
                raise StoreError(f"job {job_id!r} is a {row.kind} job, not a session")
            if row.state != JobState.RUNNING.value:
                return None
            check_transition("job", row.state, state, entity=job_id)
            row.state = JobState(state).value
            row.end_reason = reason
            row.updated_at = _now()
            s.flush()
            return row.to_entity()

    def add_saved_state(
        self,
        job_id: str,
        name: str,
        path: str,
        step: int,
        lora: LoraConfig,
        parent_id: str | None,
        payload: Mapping[str, Any] | None = None,
    ) -> AdapterRecord:
        """A session's saved state as a finished (`trained`) adapter of its job, all in one transaction:
        the adapter row (its base from the job, `final_checkpoint` the saved files, its parent the state
        its weights came from), its final checkpoint row and the `done` event the MLflow mirror uploads it
        from. A name taken in the project is a `Conflict` and nothing is written. The caller writes the
        files first: there is never a row without them."""
        now = _now()
        with self._session(f"record saved state {name!r} of session {job_id!r}", write=True) as s:
            job = self._job(s, job_id)
            if job.kind != JobKind.SESSION.value:
                raise StoreError(f"job {job_id!r} is a {job.kind} job, not a session")
            taken = s.scalars(
                select(AdapterRow.job_id).where(AdapterRow.project == job.project, AdapterRow.name == name)
            ).first()
            if taken is not None:
                raise Conflict(
                    f"adapter name already taken in project {job.project!r}: {job.project}/{name} "
                    f"(job {taken}); save the state under another name"
                )
            spec = job.spec
            adapter_id = _new_id()
            root_id, depth = adapter_id, 0
            if parent_id is not None:
                parent = self._adapter(s, parent_id)
                root_id, depth = parent.root_id, parent.depth + 1
            train = TrainConfig(steps=step, seed=int(spec.get("seed") or 0))
            data = DataConfig(path=f"session:{job_id}")  # what it learnt came call by call from a client
            base, quantization, dtype = spec["base_model"], spec["quantization"], spec["dtype"]
            row = AdapterRow(
                id=adapter_id,
                project=job.project,
                name=name,
                job_id=job_id,
                state=AdapterState.TRAINED.value,
                priority=0,
                seq=self._next_seq(s, 1),
                base_model=base,
                quantization=quantization,
                dtype=dtype,
                lora=lora.model_dump(mode="json"),
                train=train.model_dump(mode="json"),
                data=data.model_dump(mode="json"),
                parent_id=parent_id,
                root_id=root_id,
                depth=depth,
                config_hash=config_hash(base, quantization, dtype, lora, train, data),
                output_dir=path,
                final_checkpoint=path,
                step=step,
                created_at=now,
                updated_at=now,
                started_at=job.created_at,
                finished_at=now,
            )
            s.add(row)
            s.flush()
            s.add(CheckpointRow(adapter_id=adapter_id, step=step, path=path, final=True, created_at=now))
            done = {"status": "trained", "final_dir": path, "adapter": name, "step": step, **(payload or {})}
            s.add(
                EventRow(
                    job_id=job_id,
                    adapter_id=adapter_id,
                    kind="done",
                    step=step,
                    payload=_finite(done),
                    created_at=now,
                )
            )
            s.flush()
            return row.to_entity()

    @staticmethod
    def _job(s: Session, job_id: str, lock: bool = False) -> JobRow:
        row = s.get(JobRow, job_id, with_for_update=lock)
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return row

    # ---- adapters ----

    def get_adapter(self, project: str, name: str) -> AdapterRecord:
        with self._session(f"get adapter {project}/{name}") as s:
            row = s.scalars(
                select(AdapterRow).where(AdapterRow.project == project, AdapterRow.name == name)
            ).one_or_none()
            if row is None:
                raise NotFound(f"adapter {project}/{name} not found")
            return row.to_entity()

    def adapter_at(self, project: str, final_checkpoint: str) -> AdapterRecord | None:
        """The adapter of `project` whose final weights are at `final_checkpoint`, if one is (a path a
        session's save returned names the adapter it became)."""
        query = select(AdapterRow).where(
            AdapterRow.project == project, AdapterRow.final_checkpoint == final_checkpoint
        )
        with self._session(f"find the adapter at {final_checkpoint[:200]!r}") as s:
            row = s.scalars(query.order_by(AdapterRow.seq).limit(1)).one_or_none()
            return row.to_entity() if row is not None else None

    def get_adapter_by_id(self, adapter_id: str) -> AdapterRecord:
        with self._session(f"get adapter {adapter_id!r}") as s:
            return self._adapter(s, adapter_id).to_entity()

    def list_adapters(
        self,
        project: str | None = None,
        job_id: str | None = None,
        states: Collection[AdapterState] | None = None,
    ) -> list[AdapterRecord]:
        """Adapters in scheduling order: higher priority first, then first come first served (`seq`)."""
        query = select(AdapterRow).order_by(AdapterRow.priority.desc(), AdapterRow.seq)
        if project is not None:
            query = query.where(AdapterRow.project == project)
        if job_id is not None:
            query = query.where(AdapterRow.job_id == job_id)
        if states is not None:
            query = query.where(AdapterRow.state.in_([str(x) for x in states]))
        with self._session("list adapters") as s:
            return [row.to_entity() for row in s.scalars(query)]

    def adapters_by_id(self, adapter_ids: Collection[str]) -> dict[str, AdapterRecord]:
        """Many adapters by id, in one query per 500 ids; ids not found are absent."""
        found: dict[str, AdapterRecord] = {}
        with self._session("get adapters by id") as s:
            for chunk in _chunks(list(set(adapter_ids))):
                found.update(
                    {
                        row.id: row.to_entity()
                        for row in s.scalars(select(AdapterRow).where(AdapterRow.id.in_(chunk)))
                    }
                )
        return found

    def adapter_page(
        self,
        project: str | None = None,
        job_id: str | None = None,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[AdapterRecord]:
        """At most `limit` adapters with `seq` > `after_seq`, first come first (page with the last
        `seq`): the order of submission never changes, so pages neither skip nor repeat an adapter
        whose priority or state changes between two pages."""
        query = select(AdapterRow).where(AdapterRow.seq > after_seq)
        if project is not None:
            query = query.where(AdapterRow.project == project)
        if job_id is not None:
            query = query.where(AdapterRow.job_id == job_id)
        with self._session("list a page of adapters") as s:
            return [row.to_entity() for row in s.scalars(query.order_by(AdapterRow.seq).limit(limit))]

    def adapter_counts(self, job_ids: Collection[str]) -> dict[str, dict[AdapterState, int]]:
        """How many adapters of each job are in each state, in one query: `{job_id: {state: count}}`."""
        counts: dict[str, dict[AdapterState, int]] = {job_id: {} for job_id in job_ids}
        with self._session("count adapters by state") as s:
            for chunk in _chunks(list(job_ids)):
                query = (
                    select(AdapterRow.job_id, AdapterRow.state, func.count())
                    .where(AdapterRow.job_id.in_(chunk))
                    .group_by(AdapterRow.job_id, AdapterRow.state)
                )
                for job_id, state, count in s.execute(query):
                    counts[job_id][AdapterState(state)] = count
        return counts

    def qualified_names(self, adapter_ids: Collection[str]) -> dict[str, str]:
        """`project/name` of each adapter id, in one query per 500 ids (what views show for parents)."""
        names: dict[str, str] = {}
        with self._session("look up adapter names") as s:
            for chunk in _chunks(list(set(adapter_ids))):
                query = select(AdapterRow.id, AdapterRow.project, AdapterRow.name).where(
                    AdapterRow.id.in_(chunk)
                )
                names.update({i: f"{p}/{n}" for i, p, n in s.execute(query)})
        return names

    def job_specs(self, job_ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """The stored spec of each job id, in one query per 500 ids (what views read scorers from)."""
        specs: dict[str, dict[str, Any]] = {}
        with self._session("look up job specs") as s:
            for chunk in _chunks(list(set(job_ids))):
                rows = s.execute(select(JobRow.id, JobRow.spec).where(JobRow.id.in_(chunk)))
                specs.update({job_id: spec for job_id, spec in rows})
        return specs

    def update_adapter(self, change: AdapterChange) -> AdapterRecord:
        """Apply one change to its adapter, as `apply_changes` does, but a move its lifecycle does not
        allow raises `InvalidTransition` (nothing written), and the adapter's record comes back.

        Leaving `queued` clears `waiting` (the reason it waited); entering `training` stamps
        `started_at` (the first time); leaving queued/training for good stamps `finished_at`; leaving
        `training` closes the adapter's open pack attempt with the new state as its outcome.
        """
        with self._session(f"update adapter {change.adapter_id!r}", write=True) as s:
            row = self._adapter(s, change.adapter_id, lock=True)
            now = _now()
            if change.state is not None:
                self._transition(s, row, change.state, now)
            for key, value in change.fields.items():
                setattr(row, key, value)
            row.updated_at = now
            s.flush()
            self._fold_metrics(s, [change], now)
            self._add_checkpoints(s, [change], now)
            return row.to_entity()

    def queued_bases(self) -> list[tuple[str, str, str]]:
        """The distinct (base_model, quantization, dtype) of queued adapters: the base models whose
        configs the next schedule needs (the controller loads new ones before it takes its lock)."""
        query = (
            select(AdapterRow.base_model, AdapterRow.quantization, AdapterRow.dtype)
            .where(AdapterRow.state == AdapterState.QUEUED.value)
            .distinct()
        )
        with self._session("list the bases of queued adapters") as s:
            return [(b, q, d) for b, q, d in s.execute(query)]

    def queued_versions(self) -> dict[str, datetime]:
        """`{id: updated_at}` of the queued adapters: a reader that keeps their records re-reads only
        the rows that are new or changed (every write to an adapter moves its `updated_at`)."""
        query = select(AdapterRow.id, AdapterRow.updated_at).where(
            AdapterRow.state == AdapterState.QUEUED.value
        )
        with self._session("list queued adapters' versions") as s:
            return {adapter_id: utc(at) for adapter_id, at in s.execute(query)}

    def adapter_states(self, adapter_ids: Collection[str]) -> dict[str, AdapterState]:
        """The state of each adapter, in one query per 500 ids (ids not found are absent): what the
        controller's decisions about events read, without the cost of whole rows."""
        states: dict[str, AdapterState] = {}
        with self._session("read adapter states") as s:
            for chunk in _chunks(sorted(set(adapter_ids))):
                query = select(AdapterRow.id, AdapterRow.state).where(AdapterRow.id.in_(chunk))
                states.update({i: AdapterState(state) for i, state in s.execute(query).tuples()})
        return states

    def apply_changes(self, changes: Sequence[AdapterChange]) -> list[AdapterRecord]:
        """Apply adapter changes in order, in one transaction, as `update_adapter`, `upsert_metrics` and
        `add_checkpoint` would one by one, but in a few statements whatever their number (1,000 adapters
        reporting a step each once cost a tick 3,000 transactions). A change its adapter's lifecycle no
        longer allows (it moved on meanwhile, e.g. a cancel raced a finish) is skipped whole: it is moot,
        not an error.

        Adapters whose state changes are locked and moved through their lifecycle one change at a time;
        the others (the common case: a step, an eval) get their newest fields in one UPDATE per set of
        fields. Metric values are folded per adapter and key in order, then upserted; checkpoints
        already recorded (an event re-applied after an outage) are not added twice.

        Returns the records, right after their change, of the applied changes that `announce` (the
        controller logs a `done` event for each)."""
        if not changes:
            return []
        moving = sorted({c.adapter_id for c in changes if c.state is not None})
        with self._session(f"apply {len(changes)} adapter changes", write=True) as s:
            if missing := {c.adapter_id for c in changes} - self._existing_adapters(s, changes):
                raise NotFound(f"adapters not found: {sorted(missing)}")
            rows: dict[str, AdapterRow] = {}
            for chunk in _chunks(
                moving
            ):  # locked in id order: two writers never wait on each other in a cycle
                query = select(AdapterRow).where(AdapterRow.id.in_(chunk)).order_by(AdapterRow.id)
                query = query.options(defer(AdapterRow.lora), defer(AdapterRow.train), defer(AdapterRow.data))
                rows.update({row.id: row for row in s.scalars(query.with_for_update())})
            now = _now()
            applied: list[AdapterChange] = []
            announced: list[AdapterRecord] = []
            newest: dict[str, dict[str, Any]] = {}  # adapters that keep their state: fields to set
            for change in changes:
                row = rows.get(change.adapter_id)
                if row is None:
                    newest.setdefault(change.adapter_id, {}).update(change.fields)
                    applied.append(change)
                    continue
                if change.state is not None:
                    try:
                        self._transition(s, row, change.state, now)
                    except InvalidTransition as exc:
                        log.debug("skipped a moot change: %s", exc)
                        continue
                for key, value in change.fields.items():
                    setattr(row, key, value)
                row.updated_at = now
                applied.append(change)
                if change.announce:
                    announced.append(row.to_entity())
            s.flush()
            self._set_fields(s, newest, now)
            self._fold_metrics(s, applied, now)
            self._add_checkpoints(s, applied, now)
            return announced

    @staticmethod
    def _existing_adapters(s: Session, changes: Sequence[AdapterChange]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted({c.adapter_id for c in changes})):
            found.update(s.scalars(select(AdapterRow.id).where(AdapterRow.id.in_(chunk))))
        return found

    @staticmethod
    def _set_fields(s: Session, newest: Mapping[str, Mapping[str, Any]], now: datetime) -> None:
        """One executemany UPDATE per set of field names (most ticks: one, `step`)."""
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for adapter_id, fields in newest.items():
            if fields:
                keys = tuple(sorted(fields))
                by_keys.setdefault(keys, []).append({"_id": adapter_id, **{f"_{k}": fields[k] for k in keys}})
        table = AdapterRow.__table__
        for keys, params in by_keys.items():
            if s.get_bind().dialect.name == "postgresql":  # one statement, whatever the number of rows
                rows = [{"id": p["_id"], **{k: p[f"_{k}"] for k in keys}} for p in params]
                sets = ", ".join(f"{k} = v.{k}" for k in keys)
                source = _recordset(s, table, ["id", *keys])
                sql = (
                    f"UPDATE {table.name} AS a SET {sets}, updated_at = :now FROM {source} WHERE a.id = v.id"
                )
                s.execute(text(sql), {"rows": _rows_json(rows), "now": now})
                continue
            values = {k: bindparam(f"_{k}") for k in keys} | {"updated_at": now}
            s.execute(update(table).where(table.c.id == bindparam("_id")).values(values), params)

    @staticmethod
    def _fold_metrics(s: Session, applied: Sequence[AdapterChange], now: datetime) -> None:
        """Each (adapter, key)'s values in this batch folded in order (last value and step, best value),
        then upserted into its summary in one statement per direction (as `upsert_metrics`)."""
        folded: dict[tuple[str, str], dict[str, Any]] = {}
        for change in applied:
            for key, (value, step) in change.metrics.items():
                value = float(value)
                if math.isnan(value):
                    continue
                row = folded.setdefault((change.adapter_id, key), {"best_value": value})
                better = min if default_lower_is_better(key) else max
                row.update(last_value=value, step=int(step), best_value=better(row["best_value"], value))
        if not folded:
            return
        dialect = s.get_bind().dialect.name
        if dialect not in ("postgresql", "sqlite"):  # no upsert: one summary at a time
            for (adapter_id, key), row in folded.items():
                Store._fold_one(s, adapter_id, key, row, now)
            return
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        table = MetricSummaryRow.__table__
        for lower in (True, False):
            rows = [
                {"adapter_id": adapter_id, "key": key, **row, "updated_at": now}
                for (adapter_id, key), row in folded.items()
                if default_lower_is_better(key) == lower
            ]
            if not rows:
                continue
            if dialect == "postgresql":  # one statement for the batch
                columns = list(rows[0])
                better = "<" if lower else ">"
                sql = (
                    f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {', '.join(columns)} "
                    f"FROM {_recordset(s, table, columns)} ON CONFLICT (adapter_id, key) DO UPDATE SET "
                    "last_value = EXCLUDED.last_value, step = EXCLUDED.step, "
                    "updated_at = EXCLUDED.updated_at, "
                    f"best_value = CASE WHEN EXCLUDED.best_value {better} {table.name}.best_value "
                    f"THEN EXCLUDED.best_value ELSE {table.name}.best_value END"
                )
                s.execute(text(sql), {"rows": _rows_json(rows)})
                continue
            stmt = dialect_insert(table)
            new = stmt.excluded.best_value
            improves = new < table.c.best_value if lower else new > table.c.best_value
            stmt = stmt.on_conflict_do_update(
                index_elements=["adapter_id", "key"],
                set_={
                    "last_value": stmt.excluded.last_value,
                    "step": stmt.excluded.step,
                    "updated_at": stmt.excluded.updated_at,
                    "best_value": case((improves, new), else_=table.c.best_value),
                },
            )
            s.execute(stmt, rows)  # executemany: compiled once, sent in batches (insertmanyvalues)

    @staticmethod
    def _fold_one(s: Session, adapter_id: str, key: str, folded: Mapping[str, Any], now: datetime) -> None:
        row = s.get(MetricSummaryRow, (adapter_id, key), with_for_update=True)
        if row is None:
            s.add(MetricSummaryRow(adapter_id=adapter_id, key=key, **folded, updated_at=now))
            return
        better = min if default_lower_is_better(key) else max
        row.best_value = better(row.best_value, folded["best_value"])
        row.last_value, row.step, row.updated_at = folded["last_value"], folded["step"], now

    @staticmethod
    def _add_checkpoints(s: Session, applied: Sequence[AdapterChange], now: datetime) -> None:
        wanted = {
            (c.adapter_id, c.checkpoint[0], str(c.checkpoint[1]), c.checkpoint[2]): None
            for c in applied
            if c.checkpoint is not None
        }
        if not wanted:
            return
        ids = sorted({adapter_id for adapter_id, *_ in wanted})
        steps = sorted({step for _, step, *_ in wanted})
        for chunk in _chunks(ids):
            query = select(
                CheckpointRow.adapter_id, CheckpointRow.step, CheckpointRow.path, CheckpointRow.final
            )
            query = query.where(CheckpointRow.adapter_id.in_(chunk), CheckpointRow.step.in_(steps))
            for known in s.execute(query).tuples():
                wanted.pop(tuple(known), None)  # type: ignore[arg-type]
        rows = [
            {"adapter_id": a, "step": step, "path": path, "final": final, "created_at": now}
            for a, step, path, final in wanted
        ]
        if rows:
            s.execute(insert(CheckpointRow), rows)

    def transition_adapters(self, adapter_ids: Sequence[str], state: AdapterState) -> list[AdapterRecord]:
        """Move many adapters to `state` in one transaction (rows read and written in batches, not one
        transaction per adapter: cancelling 2,000 once took 56 s under the controller's lock). An
        adapter the lifecycle no longer lets move (it finished meanwhile) is left as it is; returns
        those that moved."""
        what = f"move {len(adapter_ids)} adapters to {state}"
        moved = []
        with self._session(what, write=True) as s:
            now = _now()
            for chunk in _chunks(list(dict.fromkeys(adapter_ids))):
                rows = s.scalars(
                    select(AdapterRow)
                    .where(AdapterRow.id.in_(chunk))
                    .order_by(AdapterRow.seq)
                    .with_for_update()
                ).all()
                for row in rows:
                    try:
                        self._transition(s, row, state, now)
                    except InvalidTransition:
                        continue
                    row.updated_at = now
                    moved.append(row)
            s.flush()
            return [row.to_entity() for row in moved]

    @staticmethod
    def _transition(s: Session, row: AdapterRow, state: AdapterState, now: datetime) -> None:
        check_transition("adapter", row.state, state, entity=f"{row.project}/{row.name}")
        state = AdapterState(state)
        old, row.state = row.state, state.value
        if state != AdapterState.QUEUED:
            row.waiting = None
        if state == AdapterState.TRAINING and row.started_at is None:
            row.started_at = now
        if state in ADAPTER_FINISHED and old not in ADAPTER_FINISHED:
            row.finished_at = now
        if old == AdapterState.TRAINING:
            s.execute(
                update(PackMemberRow)
                .where(PackMemberRow.adapter_id == row.id, PackMemberRow.left_at.is_(None))
                .values(left_at=now, outcome=state)
            )

    @staticmethod
    def _adapter(s: Session, adapter_id: str, lock: bool = False) -> AdapterRow:
        row = s.get(AdapterRow, adapter_id, with_for_update=lock)
        if row is None:
            raise NotFound(f"adapter {adapter_id!r} not found")
        return row

    # ---- lineage ----

    def children(self, adapter_id: str) -> list[AdapterRecord]:
        """Adapters branched directly from `adapter_id`, oldest first."""
        with self._session(f"children of adapter {adapter_id!r}") as s:
            self._adapter(s, adapter_id)
            rows = s.scalars(
                select(AdapterRow).where(AdapterRow.parent_id == adapter_id).order_by(AdapterRow.seq)
            )
            return [row.to_entity() for row in rows]

    def ancestors(self, adapter_id: str) -> list[AdapterRecord]:
        """The chain of parents of `adapter_id`, root first (empty for a root). One recursive query."""
        with self._session(f"ancestors of adapter {adapter_id!r}") as s:
            self._adapter(s, adapter_id)
            chain = select(AdapterRow.id, AdapterRow.parent_id).where(AdapterRow.id == adapter_id)
            chain = chain.cte("chain", recursive=True)
            chain = chain.union_all(
                select(AdapterRow.id, AdapterRow.parent_id).where(AdapterRow.id == chain.c.parent_id)
            )
            rows = s.scalars(
                select(AdapterRow)
                .where(AdapterRow.id.in_(select(chain.c.id)), AdapterRow.id != adapter_id)
                .order_by(AdapterRow.depth)
            )
            return [row.to_entity() for row in rows]

    def subtree(self, root_id: str) -> list[AdapterRecord]:
        """Every adapter of the lineage tree rooted at `root_id` (the root included), by depth then age."""
        with self._session(f"lineage tree of adapter {root_id!r}") as s:
            rows = s.scalars(
                select(AdapterRow)
                .where(AdapterRow.root_id == root_id)
                .order_by(AdapterRow.depth, AdapterRow.seq)
            ).all()
            if not rows:
                raise NotFound(f"no lineage tree rooted at adapter {root_id!r}")
            return [row.to_entity() for row in rows]

    # ---- a person's retry and delete of one adapter ----

    def projects_with_adapter(self, name: str) -> list[str]:
        """The projects holding an adapter called `name`, sorted (to say where a name lives when it is
        looked up in the wrong project; the caller filters out the projects its reader may not see)."""
        with self._session(f"projects with an adapter {name!r}") as s:
            return sorted(s.scalars(select(AdapterRow.project).where(AdapterRow.name == name)))

    def forget_progress(self, adapter_id: str) -> AdapterRecord:
        """Reset an adapter that will train again from step 0 (its data changed): no step, no
        checkpoints, no metrics, no final weights, no MLflow run (the mirror opens a new one, so the
        new steps are logged rather than skipped as repeats of the old ones), in one transaction. Its
        files must be gone first: a crash between the two leaves SQL naming files that are not there,
        which a second retry resets again."""
        with self._session(f"forget the progress of adapter {adapter_id!r}", write=True) as s:
            row = self._adapter(s, adapter_id, lock=True)
            s.execute(delete(CheckpointRow).where(CheckpointRow.adapter_id == adapter_id))
            s.execute(delete(MetricSummaryRow).where(MetricSummaryRow.adapter_id == adapter_id))
            row.step, row.eval_loss, row.final_checkpoint, row.data_fingerprint = 0, None, None, None
            row.mlflow_run_id, row.updated_at = None, _now()
            s.flush()
            return row.to_entity()

    def delete_adapter(self, adapter_id: str, deletable: Collection[str]) -> AdapterRecord:
        """Delete an adapter's rows in one transaction, freeing its name; returns what was deleted.

        Refused (`Conflict`, nothing written) unless its state is still one of `deletable` and no adapter
        names it as parent, both checked under the row's lock (a branch or a retry may have come in
        since the caller looked). Its checkpoints, metric summaries, pack memberships and registry
        decisions go with it. Its events stay: the event log is the job's append-only history, so they
        are only detached (`adapter_id` null; their payload still names the adapter) and a `deleted`
        event says when it went. The job stays too, even with no adapter left: its spec and history
        are what a person reads to learn what was tried."""
        with self._session(f"delete adapter {adapter_id!r}", write=True) as s:
            row = self._adapter(s, adapter_id, lock=True)
            who = f"adapter {row.project}/{row.name}"
            if row.state not in deletable:
                raise Conflict(f"{who} is {row.state} now; it can no longer be deleted")
            child = s.scalars(select(AdapterRow.name).where(AdapterRow.parent_id == adapter_id)).first()
            if child is not None:
                raise Conflict(f"{who} has a child ({row.project}/{child}) now; delete it first")
            record = row.to_entity()
            s.execute(update(EventRow).where(EventRow.adapter_id == adapter_id).values(adapter_id=None))
            for table in (CheckpointRow, MetricSummaryRow, PackMemberRow, RegistryEntryRow):
                s.execute(delete(table).where(table.adapter_id == adapter_id))
            s.delete(row)
            s.add(
                EventRow(
                    job_id=record.job_id,
                    adapter_id=None,
                    kind="deleted",
                    step=record.step,
                    payload={"adapter": record.name, "project": record.project, "state": record.state},
                    created_at=_now(),
                )
            )
            s.flush()
            return record

    # ---- packs ----

    def create_pack(
        self,
        pack_id: str | None = None,
        *,
        base_model: str,
        quantization: str = "none",
        dtype: str = "float32",
        resources: Mapping[str, Any] | None = None,
        ray_run_name: str | None = None,
    ) -> PackRecord:
        """Record a pack the controller is launching (state `running`)."""
        row = PackRow(
            id=pack_id or _new_id(),
            base_model=base_model,
            quantization=quantization,
            dtype=dtype,
            resources=dict(resources or {}),
            state=PackState.RUNNING.value,
            ray_run_name=ray_run_name,
            created_at=_now(),
        )
        with self._session(f"create pack {row.id!r}", write=True) as s:
            s.add(row)
            s.flush()
            return row.to_entity()

    def finish_pack(self, pack_id: str, state: PackState, error: str | None = None) -> PackRecord:
        """End a pack (`succeeded`, `failed` or `cancelled`); attempts still open end with that outcome."""
        with self._session(f"finish pack {pack_id!r}", write=True) as s:
            row = self._pack(s, pack_id, lock=True)
            check_transition("pack", row.state, state, entity=pack_id)
            now = _now()
            row.state, row.error, row.finished_at = str(state), error, now
            s.execute(
                update(PackMemberRow)
                .where(PackMemberRow.pack_id == pack_id, PackMemberRow.left_at.is_(None))
                .values(left_at=now, outcome=str(state))
            )
            s.flush()
            return row.to_entity()

    def get_pack(self, pack_id: str) -> PackRecord:
        with self._session(f"get pack {pack_id!r}") as s:
            return self._pack(s, pack_id).to_entity()

    def list_packs(self, states: Collection[PackState] | None = None) -> list[PackRecord]:
        """Packs, oldest first."""
        query = select(PackRow).order_by(PackRow.created_at, PackRow.id)
        if states is not None:
            query = query.where(PackRow.state.in_([str(x) for x in states]))
        with self._session("list packs") as s:
            return [row.to_entity() for row in s.scalars(query)]

    def add_pack_member(self, pack_id: str, adapter_id: str) -> PackMemberRecord:
        """Record that `adapter_id` joined the running pack `pack_id`: its next attempt (1, 2, ...)."""
        with self._session(f"add adapter {adapter_id!r} to pack {pack_id!r}", write=True) as s:
            pack = self._pack(s, pack_id)
            if pack.state != PackState.RUNNING:
                raise Conflict(f"pack {pack_id!r} is {pack.state}; only a running pack takes adapters")
            self._adapter(s, adapter_id)
            last = s.scalar(
                select(func.max(PackMemberRow.attempt)).where(PackMemberRow.adapter_id == adapter_id)
            )
            row = PackMemberRow(
                pack_id=pack_id, adapter_id=adapter_id, attempt=(last or 0) + 1, joined_at=_now()
            )
            s.add(row)
            s.flush()
            return row.to_entity()

    def list_pack_members(
        self, pack_id: str | None = None, adapter_id: str | None = None
    ) -> list[PackMemberRecord]:
        """Attempts of a pack, or of an adapter (its history across packs), in joining order."""
        query = select(PackMemberRow).order_by(PackMemberRow.joined_at, PackMemberRow.id)
        if pack_id is not None:
            query = query.where(PackMemberRow.pack_id == pack_id)
        if adapter_id is not None:
            query = query.where(PackMemberRow.adapter_id == adapter_id)
        with self._session("list pack members") as s:
            return [row.to_entity() for row in s.scalars(query)]

    @staticmethod
    def _pack(s: Session, pack_id: str, lock: bool = False) -> PackRow:
        row = s.get(PackRow, pack_id, with_for_update=lock)
        if row is None:
            raise NotFound(f"pack {pack_id!r} not found")
        return row

    # ---- checkpoints ----

    def add_checkpoint(self, adapter_id: str, step: int, path: str, final: bool = False) -> CheckpointRecord:
        """Add a checkpoint; the same one again (an event re-applied after a write failed half-way through
        an outage) is the row already there, not a second one."""
        with self._session(f"add checkpoint of adapter {adapter_id!r} at step {step}", write=True) as s:
            self._adapter(s, adapter_id)
            same = s.scalars(
                select(CheckpointRow).where(
                    CheckpointRow.adapter_id == adapter_id,
                    CheckpointRow.step == step,
                    CheckpointRow.path == str(path),
                    CheckpointRow.final == final,
                )
            ).first()
            if same is not None:
                return same.to_entity()
            row = CheckpointRow(
                adapter_id=adapter_id, step=step, path=str(path), final=final, created_at=_now()
            )
            s.add(row)
            s.flush()
            return row.to_entity()

    def latest_checkpoint(self, adapter_id: str) -> CheckpointRecord | None:
        """The checkpoint at the highest step (the newest one if a resumed run wrote that step again)."""
        with self._session(f"latest checkpoint of adapter {adapter_id!r}") as s:
            row = s.scalars(
                select(CheckpointRow)
                .where(CheckpointRow.adapter_id == adapter_id)
                .order_by(CheckpointRow.step.desc(), CheckpointRow.id.desc())
                .limit(1)
            ).one_or_none()
            return None if row is None else row.to_entity()

    def list_checkpoints(self, adapter_id: str) -> list[CheckpointRecord]:
        with self._session(f"checkpoints of adapter {adapter_id!r}") as s:
            rows = s.scalars(
                select(CheckpointRow)
                .where(CheckpointRow.adapter_id == adapter_id)
                .order_by(CheckpointRow.step, CheckpointRow.id)
            )
            return [row.to_entity() for row in rows]

    # ---- events ----

    def record_events(self, events: Sequence[NewEvent]) -> int:
        """Insert a batch of progress events in one statement and one transaction; returns how many.

        An event whose `event_id` is already recorded (or repeated in the batch) is skipped: the engine's
        durable event log may be replayed after a controller died, and what was recorded stays once.
        Non-finite floats in payloads (NaN, inf) are stored as null: JSON cannot spell them and
        PostgreSQL refuses them.
        """
        if not events:
            return 0
        now = _now()
        with self._session(f"record {len(events)} events", write=True) as s:
            job_ids = {e.job_id for e in events}
            missing = job_ids - set(s.scalars(select(JobRow.id).where(JobRow.id.in_(job_ids))))
            if missing:
                raise NotFound(f"events name unknown jobs: {sorted(missing)}")
            seen = self._recorded_ids(s, [e.event_id for e in events if e.event_id])
            rows = []
            for e in events:
                if e.event_id is not None:
                    if e.event_id in seen:
                        continue
                    seen.add(e.event_id)
                rows.append(
                    {
                        "job_id": e.job_id,
                        "adapter_id": e.adapter_id,
                        "kind": e.kind,
                        "step": e.step,
                        "payload": _finite(e.payload),
                        "created_at": now,
                        "event_id": e.event_id,
                    }
                )
            _insert_many(s, EventRow.__table__, rows)
        return len(rows)

    def unrecorded(self, event_ids: Sequence[str]) -> set[str]:
        """Which of these engine event ids are not in the event log yet."""
        with self._session("look up event ids") as s:
            return set(event_ids) - self._recorded_ids(s, event_ids)

    @staticmethod
    def _recorded_ids(s: Session, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        ids = list(dict.fromkeys(event_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            found |= set(s.scalars(select(EventRow.event_id).where(EventRow.event_id.in_(chunk))))
        return found

    def list_events(self, job_id: str | None, after_id: int = 0, limit: int = 1000) -> list[EventRecord]:
        """Events with id > `after_id` (of one job, or of all with None), oldest first, at most `limit`.

        Page with the last id. Ids grow in commit order because one controller writes them all, which
        is what lets a projection such as the MLflow mirror keep a single cursor.
        """
        query = select(EventRow).where(EventRow.id > after_id)
        if job_id is not None:
            query = query.where(EventRow.job_id == job_id)
        with self._session(f"list events of job {job_id!r}") as s:
            rows = s.scalars(query.order_by(EventRow.id).limit(limit))
            return [row.to_entity() for row in rows]

    def final_eval(self, adapter: AdapterRecord) -> EventRecord | None:
        """The adapter's latest final eval event (its scores and judged samples live in the event log;
        rare reads, such as an export's model card, find them there rather than in a table of their own)."""
        query = (
            select(EventRow)
            .where(
                EventRow.job_id == adapter.job_id, EventRow.adapter_id == adapter.id, EventRow.kind == "eval"
            )
            .order_by(EventRow.id.desc())
        )
        with self._session(f"final eval of adapter {adapter.id!r}") as s:
            for row in s.scalars(query):
                if row.payload.get("final"):
                    return row.to_entity()
        return None

    # ---- cursors ----

    def get_cursor(self, name: str) -> int:
        """A named position (e.g. the last event mirrored to MLflow); 0 if never set."""
        with self._session(f"read cursor {name!r}") as s:
            return s.scalar(select(SequenceRow.value).where(SequenceRow.name == f"cursor:{name}")) or 0

    def set_cursor(self, name: str, value: int) -> None:
        key = f"cursor:{name}"
        with self._session(f"move cursor {name!r}", write=True) as s:
            row = s.get(SequenceRow, key)
            if row is None:
                s.add(SequenceRow(name=key, value=value))
            else:
                row.value = value

    # ---- metrics ----

    def upsert_metrics(
        self,
        adapter_id: str,
        values: Mapping[str, tuple[float, int]],
        lower_is_better: Collection[str] | None = None,
    ) -> list[MetricRecord]:
        """Fold `{key: (value, step)}` into the adapter's summaries: last value and step, best value.

        `lower_is_better` names the keys that improve downwards; default: keys ending in `loss` or
        `perplexity`. NaN values are skipped (they are neither a last nor a best value worth keeping).
        """
        lower = default_lower_is_better if lower_is_better is None else set(lower_is_better).__contains__
        clean = {k: (float(v), int(step)) for k, (v, step) in values.items() if not math.isnan(v)}
        with self._session(f"upsert metrics of adapter {adapter_id!r}", write=True) as s:
            self._adapter(s, adapter_id, lock=True)  # one writer per adapter: two first inserts never race
            existing = {
                row.key: row
                for row in s.scalars(
                    select(MetricSummaryRow)
                    .where(MetricSummaryRow.adapter_id == adapter_id, MetricSummaryRow.key.in_(clean))
                    .with_for_update()
                )
            }
            now = _now()
            out = []
            for key, (value, step) in sorted(clean.items()):
                row = existing.get(key)
                if row is None:
                    row = MetricSummaryRow(adapter_id=adapter_id, key=key, best_value=value)
                    s.add(row)
                else:
                    row.best_value = min(row.best_value, value) if lower(key) else max(row.best_value, value)
                row.last_value, row.step, row.updated_at = value, step, now
                out.append(row)
            s.flush()
            return [row.to_entity() for row in out]

    def last_metrics(self, adapter_ids: Collection[str]) -> dict[str, dict[str, float]]:
        """`{adapter_id: {key: last value}}` for many adapters, in one query per 500 ids (a view of a
        job once asked once per adapter)."""
        out: dict[str, dict[str, float]] = {adapter_id: {} for adapter_id in adapter_ids}
        with self._session("metrics of adapters") as s:
            for chunk in _chunks(list(out)):
                query = (
                    select(MetricSummaryRow.adapter_id, MetricSummaryRow.key, MetricSummaryRow.last_value)
                    .where(MetricSummaryRow.adapter_id.in_(chunk))
                    .order_by(MetricSummaryRow.adapter_id, MetricSummaryRow.key)
                )
                for adapter_id, key, value in s.execute(query):
                    out[adapter_id][key] = value
        return out

    def get_metrics(self, adapter_id: str) -> list[MetricRecord]:
        with self._session(f"metrics of adapter {adapter_id!r}") as s:
            rows = s.scalars(
                select(MetricSummaryRow)
                .where(MetricSummaryRow.adapter_id == adapter_id)
                .order_by(MetricSummaryRow.key)
            )
            return [row.to_entity() for row in rows]

    # ---- registry ----

    def record_registry_decision(
        self,
        adapter_id: str,
        decision: AdapterState,
        *,
        model_name: str | None = None,
        version: int | None = None,
        alias: str | None = None,
        metric: str | None = None,
        value: float | None = None,
        reason: str | None = None,
        transition: bool = True,
    ) -> RegistryRecord:
        """Keep a promotion gate's decision and why; with `transition`, move the adapter to `decision`
        (`promoted` or `rejected`) in the same transaction, so state and history never disagree."""
        if decision not in REGISTRY_DECISIONS:
            allowed = [d.value for d in REGISTRY_DECISIONS]
            raise ValueError(f"registry `decision` must be one of {allowed}; got {str(decision)!r}")
        with self._session(f"record {decision} decision for adapter {adapter_id!r}", write=True) as s:
            adapter = self._adapter(s, adapter_id, lock=transition)
            now = _now()
            if transition:
                self._transition(s, adapter, decision, now)
                adapter.updated_at = now
            row = RegistryEntryRow(
                adapter_id=adapter_id,
                decision=str(decision),
                model_name=model_name,
                version=version,
                alias=alias,
                metric=metric,
                value=value,
                reason=reason,
                created_at=now,
            )
            s.add(row)
            s.flush()
            return row.to_entity()

    def registry_history(self, adapter_id: str) -> list[RegistryRecord]:
        """Every decision about the adapter, oldest first."""
        with self._session(f"registry history of adapter {adapter_id!r}") as s:
            rows = s.scalars(
                select(RegistryEntryRow)
                .where(RegistryEntryRow.adapter_id == adapter_id)
                .order_by(RegistryEntryRow.id)
            )
            return [row.to_entity() for row in rows]

    # ---- tokens ----

    def create_token(
        self, project: str, role: str = "member", name: str | None = None
    ) -> tuple[TokenRecord, str]:
        """A new project token; returns its record and the token itself, which is not kept (only its
        sha256 is), so this is the one time anyone sees it."""
        if role not in TOKEN_ROLES:
            raise ValueError(f"token `role` must be one of {TOKEN_ROLES}; got {role!r}")
        secret = "lft_" + secrets.token_urlsafe(32)
        with self._session(f"create a token for project {project!r}", write=True) as s:
            row = TokenRow(
                id=_new_id(),
                project=project,
                role=role,
                name=name,
                token_hash=token_hash(secret),
                created_at=_now(),
                revoked_at=None,
            )
            s.add(row)
            s.flush()
            return row.to_entity(), secret

    def find_token(self, secret: str) -> TokenRecord | None:
        """The active token whose secret this is, or None."""
        with self._session("look up a token") as s:
            row = s.scalars(select(TokenRow).where(TokenRow.token_hash == token_hash(secret))).one_or_none()
            return row.to_entity() if row is not None and row.revoked_at is None else None

    def list_tokens(self, project: str | None = None) -> list[TokenRecord]:
        with self._session("list tokens") as s:
            query = select(TokenRow).order_by(TokenRow.created_at)
            if project is not None:
                query = query.where(TokenRow.project == project)
            return [row.to_entity() for row in s.scalars(query)]

    def revoke_token(self, token_id: str) -> TokenRecord:
        with self._session(f"revoke token {token_id!r}", write=True) as s:
            row = s.get(TokenRow, token_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no token {token_id!r}; `lorafleet token list` shows the ids")
            if row.revoked_at is None:
                row.revoked_at = _now()
            s.flush()
            return row.to_entity()


TOKEN_ROLES = ("reader", "member")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _chunks(items: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    """Bounded `IN (...)` lists: SQLite caps bound parameters, and a huge list plans badly anywhere."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _unreachable(exc: DBAPIError) -> bool:
    """A connection that failed or died (the server is down, restarting, or out of connections), or a
    transient refusal (SQLite busy, a deadlock): the same request may work later. Anything else (a value
    the database refuses) will fail again however long one waits."""
    return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)


def _rollback_quietly(session: Session) -> None:
    """Roll back; on a connection that just died the rollback fails too, and the error that matters is
    the first one (the pool discards the dead connection either way)."""
    try:
        session.rollback()
    except DBAPIError:
        log.debug("rollback after a database error failed as well", exc_info=True)


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _recordset(s: Session, table: Any, columns: Sequence[str]) -> str:
    """`json_to_recordset(:rows) AS v(c type, ...)`: a batch of rows as one JSON parameter (PostgreSQL),
    so a batch is one statement, not one per row (psycopg's executemany sends each row on its own)."""
    dialect = s.get_bind().dialect
    types = ", ".join(f"{c} {table.c[c].type.compile(dialect=dialect)}" for c in columns)
    return f"json_to_recordset(CAST(:rows AS json)) AS v({types})"


def _rows_json(rows: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(list(rows), default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


def _insert_many(s: Session, table: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows: on PostgreSQL one `INSERT ... SELECT FROM json_to_recordset(...)` per 10,000,
    elsewhere an executemany."""
    if not rows:
        return
    if s.get_bind().dialect.name != "postgresql":
        s.execute(insert(table), rows)
        return
    columns = list(rows[0])
    for chunk in _chunks(rows, 10_000):
        sql = f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {', '.join(columns)}"
        s.execute(text(f"{sql} FROM {_recordset(s, table, columns)}"), {"rows": _rows_json(chunk)})


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as None (checked first in C: almost every payload has none)."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except ValueError:
        return _finite_walk(value)
    except TypeError:  # not JSON as is (e.g. a tuple key): walked, as before
        return _finite_walk(value)


def _finite_walk(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_walk(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_walk(v) for v in value]
    return value
